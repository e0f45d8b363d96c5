"""Run tasks on a model: documents -> requests -> scores -> metrics with standard errors.

    results = evaluate(lm, load_tasks(["capitals"]), num_fewshot=2, limit=100)
    results[0].metrics          # {"acc": (0.61, 0.049), "acc_norm": (0.64, 0.048)}
    results[0].samples          # per document: prompt, choices, log-likelihoods, scores

`model` is an `LM` (scored in process by `scribelm.evaluate.scoring`) or
anything with the same three methods: `loglikelihood(pairs, ...)`,
`rolling_loglikelihood(texts, ...)`, `generate_until(requests, ...)` — for
instance `CompletionsBackend`, a model behind an OpenAI-compatible server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scribelm.evaluate import metrics as M
from scribelm.evaluate import scoring
from scribelm.evaluate.tasks import Request, Task

ProgressFn = Callable[[int, int], None]  # (requests just finished, total requests)


class LocalBackend:
    """An `LM` scored in this process."""

    def __init__(self, lm, *, batch_size: int = 16, share_prefix: bool | None = None) -> None:
        self.lm, self.batch_size, self.share_prefix = lm, batch_size, share_prefix

    def loglikelihood(self, pairs, progress=None):
        return scoring.loglikelihood(self.lm, pairs, batch_size=self.batch_size, share_prefix=self.share_prefix,
                                     progress=progress)

    def rolling_loglikelihood(self, texts, progress=None):
        return scoring.rolling_loglikelihood(self.lm, texts, batch_size=self.batch_size, progress=progress)

    def generate_until(self, requests, progress=None):
        return scoring.generate_until(self.lm, requests, batch_size=self.batch_size, progress=progress)


@dataclass
class TaskResult:
    name: str
    output_type: str
    num_fewshot: int
    samples_count: int
    metrics: dict[str, tuple[float, float]]  # name -> (value, standard error)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, "output_type": self.output_type, "num_fewshot": self.num_fewshot,
                "samples": self.samples_count,
                "metrics": {m: {"value": v, "stderr": s} for m, (v, s) in self.metrics.items()}}


def _backend(model, batch_size: int):
    if hasattr(model, "loglikelihood") and hasattr(model, "rolling_loglikelihood"):
        return model
    return LocalBackend(model, batch_size=batch_size)


def _request_count(r: Request) -> int:
    if r.kind == "multiple_choice":
        return len(r.continuations) * (2 if r.unconditional else 1)
    return 1


def evaluate(
    model,
    tasks: Sequence[Task],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
    requests: Sequence[list[Request]] | None = None,
) -> list[TaskResult]:
    """Score each task on `model` (an `LM` or a backend) and aggregate its metrics.
    `requests`: each task's `Task.requests(num_fewshot, limit)` when already made (to find
    mistakes in the data before a model loads, or to score several models on the same ones)."""
    backend = _backend(model, batch_size)
    if requests is None:
        requests = [task.requests(num_fewshot, limit) for task in tasks]
    planned = list(zip(tasks, requests))
    total = sum(_request_count(r) for _, requests in planned for r in requests)
    advance = (lambda n: progress(n, total)) if progress else None
    return [_run_task(backend, task, requests, num_fewshot, advance) for task, requests in planned]


def _run_task(backend, task: Task, requests: list[Request], num_fewshot: int | None, advance) -> TaskResult:
    kind = task.output_type
    samples: list[dict[str, Any]] = []
    items: dict[str, list[Any]] = {m: [] for m, _ in task.metrics}
    if kind in ("multiple_choice", "loglikelihood"):
        pairs = [(r.context, c) for r in requests for c in r.continuations]
        pairs += [("", c) for r in requests if r.unconditional for c in r.continuations]  # after nothing
        scores = backend.loglikelihood(pairs, progress=advance) if pairs else []
        at, unconditional_at = 0, sum(len(r.continuations) for r in requests)
        for r in requests:
            got = scores[at:at + len(r.continuations)]
            at += len(r.continuations)
            sample: dict[str, Any] = {"doc_id": r.doc_index, "context": r.context, "continuations": r.continuations,
                                      "loglikelihoods": [ll for ll, _ in got], "is_greedy": [g for _, g in got],
                                      "target": r.target}
            if kind == "multiple_choice":
                uncond = None
                if r.unconditional:
                    uncond = [ll for ll, _ in scores[unconditional_at:unconditional_at + len(r.choices)]]
                    unconditional_at += len(r.choices)
                per = M.multiple_choice_scores([ll for ll, _ in got], r.choices, r.target, uncond)
            else:
                ll, greedy = got[0]
                per = {"perplexity": ll, "acc": float(greedy)}
            for m in items:
                items[m].append(per[m])
            sample["scores"] = {m: per[m] for m in items}
            samples.append(sample)
    elif kind == "loglikelihood_rolling":
        scores = backend.rolling_loglikelihood([r.text for r in requests], progress=advance) if requests else []
        for r, s in zip(requests, scores):
            per = {"word_perplexity": (s.loglikelihood, s.words), "byte_perplexity": (s.loglikelihood, s.bytes),
                   "bits_per_byte": (s.loglikelihood, s.bytes), "token_perplexity": (s.loglikelihood, s.tokens)}
            for m in items:
                items[m].append(per[m])
            samples.append({"doc_id": r.doc_index, "text": r.text, "loglikelihood": s.loglikelihood,
                            "tokens": s.tokens, "words": s.words, "bytes": s.bytes})
    else:
        outputs = backend.generate_until([(r.context, r.generation_kwargs) for r in requests], progress=advance) if requests else []
        options = dict(task.metrics)
        for r, text in zip(requests, outputs):
            per = {}
            for m in items:
                if m == "exact_match":
                    per[m] = max(M.exact_match(text, g, **options[m]) for g in r.target)
                elif m == "squad_exact_match":
                    per[m] = M.squad_exact_match(text, r.target)
                else:
                    per[m] = M.squad_f1(text, r.target)
                items[m].append(per[m])
            samples.append({"doc_id": r.doc_index, "context": r.context, "generation": text, "target": r.target,
                            "scores": per})
    shots = num_fewshot if num_fewshot is not None else int(task.config.get("num_fewshot") or 0)
    if kind == "loglikelihood_rolling":
        shots = 0
    metrics = {m: M.aggregate(m, values) for m, values in items.items() if values}
    return TaskResult(task.name, kind, shots, len(requests), metrics, samples)
