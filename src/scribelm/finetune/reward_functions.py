"""Where rewards come from: plain Python functions or a trained reward model, weighted and summed.

A reward spec is one of

    my_rewards:ends_with_full_stop     a function in an importable module (the current directory counts)
    path/to/rewards.py:short_answers   a function in a Python file
    runs/rm/model                      a reward model saved by `scribe finetune reward`

A function takes (prompt, completion) — both text — and returns a number:

    def ends_with_full_stop(prompt: str, completion: str) -> float:
        return 1.0 if completion.rstrip().endswith(".") else 0.0

Several specs are summed with weights (1 each by default). A function that
raises, or returns something that is not a finite number, does not stop
the run: that completion's reward is NaN — it is left out of the group's
statistics and gets no advantage — and counted (`reward_failed`). If most
completions of a batch fail the run stops with the first error, since the
rewards then say nothing.

A reward model scores the text of the completion: policy and reward model
may use different tokenizers, because the text is retokenized with the
reward model's own (and rendered with its chat template, as it was trained).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scribelm.errors import ConfigError, ScribeError


@dataclass
class RewardSource:
    """One named reward: scores a batch of (prompt, completion) texts, NaN where it failed."""

    name: str
    weight: float
    score_batch: Callable[[Sequence[str], Sequence[str]], list[float]]
    failures: int = 0
    first_error: str | None = None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.score_batch(prompts, completions)


def _per_sample(fn: Callable[[str, str], float], source: "RewardSource") -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        values = []
        for prompt, completion in zip(prompts, completions):
            try:
                value = fn(prompt, completion)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"returned {value!r}, not a finite number")
                values.append(float(value))
            except Exception as err:  # noqa: BLE001 — a user's function may fail in any way; the sample is skipped
                source.failures += 1
                if source.first_error is None:
                    source.first_error = f"{type(err).__name__}: {err}"
                values.append(float("nan"))
        return values

    return score


def _import_function(spec: str) -> Callable[[str, str], float]:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ConfigError(f"reward {spec!r}: write MODULE:FUNCTION, FILE.py:FUNCTION or a reward-model directory")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"reward {spec!r}: {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # the user's own modules, as `python -c` would find them
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 — importing user code can fail in any way
        raise ConfigError(f"reward {spec!r}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {module_name} has no function {function_name}")
    return fn


def load_reward_sources(specs: Sequence[str | Callable[[str, str], float]], weights: Sequence[float] | None = None,
                        device: str | torch.device = "cpu") -> list[RewardSource]:
    """Reward specs (strings as in the module docstring, or callables) -> RewardSources."""
    if not specs:
        raise ConfigError("give at least one reward (--reward MODULE:FUNCTION or a reward-model directory)")
    weights = list(weights) if weights is not None else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ConfigError(f"{len(specs)} rewards but {len(weights)} weights")
    sources = []
    for spec, weight in zip(specs, weights):
        if callable(spec):
            source = RewardSource(getattr(spec, "__name__", "reward"), float(weight), lambda p, c: [])
            source.score_batch = _per_sample(spec, source)
        elif Path(spec).is_dir():
            from scribelm.finetune.reward import load_reward_model, score_texts

            model, tokenizer = load_reward_model(spec, device=device)
            source = RewardSource(Path(spec).name or spec, float(weight),
                                  lambda p, c, m=model, t=tokenizer: score_texts(m, t, p, c))
        else:
            source = RewardSource(spec.rpartition(":")[2], float(weight), lambda p, c: [])
            source.score_batch = _per_sample(_import_function(spec), source)
        sources.append(source)
    return sources


def combined_rewards(sources: Sequence[RewardSource], prompts: Sequence[str],
                     completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum (N,), each source's rewards (N, K)); a completion any source failed on is NaN."""
    per_source = torch.tensor([source(prompts, completions) for source in sources], dtype=torch.float32).T  # (N, K)
    weights = torch.tensor([s.weight for s in sources], dtype=torch.float32)
    return (per_source * weights).sum(1), per_source


def check_failures(rewards: torch.Tensor, sources: Sequence[RewardSource]) -> int:
    """How many completions could not be scored; an error when most could not."""
    failed = int(torch.isnan(rewards).sum())
    if failed * 2 > len(rewards):
        errors = "; ".join(f"{s.name}: {s.first_error}" for s in sources if s.first_error)
        raise ScribeError(f"{failed} of {len(rewards)} completions could not be scored, so the rewards say nothing; "
                          f"fix the reward function ({errors or 'it returned no finite number'})")
    return failed
