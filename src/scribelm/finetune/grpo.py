"""GRPO: reinforcement learning from rewards without a value model.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath). For
each prompt the policy samples G completions; each is scored; a
completion's advantage is how much better it did than its own group
(`rl_losses.group_advantages`), so no value network has to learn a
baseline. Every token of the completion then gets that advantage in PPO's
clipped objective, optionally with β·KL to the frozen reference (β = 0 by
default, as current practice):

    for step in range(max_steps):                              # the shared Trainer's loop
        prompts  = next P prompts, each repeated G times
        rollouts = sample(π, prompts)                           # batched, one KV cache
        rewards  = Σ_k w_k · reward_k(prompt, completion)
        A        = (r − mean_group) / (std_group + 1e-4)
        loss     = aggregate(−min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·KL)   # grpo | bnpo | dr_grpo | dapo
        (with `iterations` μ > 1 the same rollouts train μ steps, ρ against the sampling policy)

The Trainer owns the rest (optimizer, checkpoints and resume, metrics.jsonl,
loss.png); this module supplies the batches (`RolloutLoader`: generation,
scoring, advantages) and the objective (`GRPOObjective`). Logged each step:
reward mean and std (and each reward's own mean), completions that could
not be scored, KL to the reference, entropy, clip fraction, completion
length, the share cut off by max_new_tokens, and rollout tokens/s. Every `sample_every` steps
a few completions with their rewards go to `samples.jsonl`.

A KL that explodes (mean per-token KL above `max_kl`) stops the run with
the last good checkpoint, like a NaN loss does. With beta 0 the KL is only
measured, which costs a forward pass of the reference per batch: `kl_every`
measures it on every n-th batch (0: never, and no reference is kept, as TRL
does at beta 0).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scribelm.errors import ConfigError
from scribelm.finetune.reward_functions import RewardSource, check_failures, combined_rewards
from scribelm.finetune.rl_losses import (
    AGGREGATIONS, STD_SCALES, aggregate_loss, group_advantages, grpo_per_token_loss, masked_mean,
)
from scribelm.finetune.rollouts import completion_logps, completion_token_logps, sample_rollouts
from scribelm.train.config import TrainingDiverged

SAMPLES_FILE = "samples.jsonl"


@dataclass
class GRPOOptions:
    """The RL side of a GRPO run (optimizer, steps, LoRA: `FinetuneOptions`)."""

    num_generations: int = 4  # G completions per prompt
    prompts_per_step: int = 4  # P prompts per optimizer step: P·G rollouts
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0  # KL coefficient in the loss (0: KL only measured)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (DAPO's clip-higher when larger)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo (TRL's default)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO: none)
    iterations: int = 1  # μ: optimizer steps on each batch of rollouts
    max_kl: float | None = 10.0  # stop when the mean per-token KL to the reference exceeds this (None: never)
    kl_every: int = 1  # with beta 0, measure the KL to the reference on every n-th batch (0: never)
    sample_every: int = 10  # steps between samples written to samples.jsonl (0: never)
    chat: bool | None = None  # None: the chat template if the model is chat-tuned
    reward_weights: Sequence[float] | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether a reference model is kept: for a KL term in the loss, or to measure the KL."""
        return self.beta > 0 or self.kl_every > 0

    def measures_kl(self, draw: int) -> bool:
        """Whether batch number `draw` (from 0) gets the reference's log-probs: always when the
        loss has a KL term, else every `kl_every` batches."""
        return self.beta > 0 or (self.kl_every > 0 and draw % self.kl_every == 0)

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"GRPO compares completions within a group: num_generations must be >= 2, got "
                              f"{self.num_generations}")
        if self.loss_type not in AGGREGATIONS:
            raise ConfigError(f"loss type must be one of {', '.join(AGGREGATIONS)}, got {self.loss_type!r}")
        if self.kl_every < 0:
            raise ConfigError(f"kl_every counts batches: 0 (never) or more, got {self.kl_every}")
        if self.scale_rewards not in STD_SCALES:
            raise ConfigError(f"scale_rewards must be one of {', '.join(STD_SCALES)}, got {self.scale_rewards!r}")
        for name in ("prompts_per_step", "max_new_tokens", "iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.beta < 0 or self.epsilon <= 0:
            raise ConfigError("beta must be >= 0 and epsilon > 0")


def _prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


class RolloutLoader:
    """Batches of scored rollouts from the current policy, for the Trainer; resumable.

    `reference(ids, targets)` gives the reference's per-token log-probs (B, T), or is None."""

    def __init__(self, lm, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]], sources: Sequence[RewardSource],
                 options: GRPOOptions, *, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                 seed: int = 0, samples_path: Path | None = None, extra_stop_ids: Sequence[int] = ()) -> None:
        from scribelm.sampling import SamplingSettings

        self.lm, self.prompts, self.prompt_ids, self.sources = lm, list(prompts), list(prompt_ids), list(sources)
        self.options, self.reference, self.seed, self.samples_path = options, reference, seed, samples_path
        self.extra_stop_ids = list(extra_stop_ids)
        self.settings = SamplingSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                         top_p=options.top_p, top_k=options.top_k)
        self.epoch, self.index, self.draws = 0, 0, 0
        self.sequence_length = max(len(p) for p in self.prompt_ids) + options.max_new_tokens

    def __len__(self) -> int:
        """Optimizer steps per pass over the prompts."""
        return -(-len(self.prompts) // self.options.prompts_per_step) * self.options.iterations

    def _next_prompts(self) -> list[int]:
        chosen = []
        while len(chosen) < self.options.prompts_per_step:
            order = _prompt_order(len(self.prompts), self.seed, self.epoch)
            take = order[self.index: self.index + self.options.prompts_per_step - len(chosen)]
            chosen += take
            self.index += len(take)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return chosen

    def __iter__(self):
        while True:
            batch = self.draw()
            for _ in range(self.options.iterations):
                yield batch

    @torch.no_grad()
    def draw(self) -> dict[str, torch.Tensor]:
        """Sample, score and lay out one batch of P·G rollouts."""
        G, model = self.options.num_generations, self.lm.model
        chosen = self._next_prompts()
        rows = [self.prompt_ids[i] for i in chosen for _ in range(G)]
        texts = [self.prompts[i] for i in chosen for _ in range(G)]
        pad = self.lm.tokenizer.pad_id or 0
        started = time.perf_counter()
        rollouts = sample_rollouts(model, self.lm.tokenizer, rows, self.settings, seed=self.seed * 7919 + self.draws,
                                   pad_id=pad, extra_stop_ids=self.extra_stop_ids)
        generation_s = time.perf_counter() - started
        self.draws += 1
        rewards, per_source = combined_rewards(self.sources, texts, rollouts.completion_texts)  # (N,), (N, K)
        failed = check_failures(rewards, self.sources)
        advantages, _ = group_advantages(rewards, G, self.options.scale_rewards)
        device = next(model.parameters()).device
        batch = {"ids": rollouts.ids, "targets": rollouts.targets, "advantages": advantages}
        if self.reference is not None and self.options.measures_kl(self.draws - 1):
            batch["ref_logps"] = self.reference(rollouts.ids.to(device), rollouts.targets.to(device)).cpu()
        if self.options.iterations > 1:  # ρ must compare with the policy that sampled, not the one being stepped
            was_training = model.training
            model.eval()
            batch["old_logps"] = completion_logps(model, rollouts.ids.to(device), rollouts.targets.to(device),
                                                  self.options.temperature).cpu()
            model.train(was_training)
        grouped = rewards.view(-1, G)
        stats = {"reward_mean": torch.nanmean(rewards), "reward_std": torch.nanmean(_row_std(grouped)),
                 "reward_failed": float(failed), "completion_length": rollouts.completion_lengths.float().mean(),
                 "truncated_fraction": rollouts.truncated.float().mean(),
                 "rollout_tokens_per_s": rollouts.completion_lengths.sum() / max(generation_s, 1e-9)}
        if len(self.sources) > 1:
            for k, source in enumerate(self.sources):
                stats[f"reward_{source.name}"] = torch.nanmean(per_source[:, k])
        batch.update({f"stat_{k}": torch.as_tensor(float(v)) for k, v in stats.items()})
        self._write_samples(texts, rollouts.completion_texts, rewards)
        return batch

    def _write_samples(self, prompts: list[str], completions: list[str], rewards: torch.Tensor) -> None:
        every = self.options.sample_every
        if not every or self.samples_path is None or (self.draws - 1) % every:
            return
        G = self.options.num_generations
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for i in range(0, min(len(prompts), 2 * G), G):  # the first two groups, best completion first
                best = max(range(i, i + G), key=lambda j: float("-inf") if rewards[j] != rewards[j] else rewards[j])
                f.write(json.dumps({"draw": self.draws, "prompt": prompts[best], "completion": completions[best],
                                    "reward": float(rewards[best]),
                                    "group_rewards": [float(r) for r in rewards[i: i + G]]}) + "\n")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self.draws, self.seed = (int(state[k]) for k in ("epoch", "index", "draws", "seed"))


def _row_std(grouped: torch.Tensor) -> torch.Tensor:
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(1)
    return torch.sqrt(torch.nansum((grouped - mean) ** 2, dim=1) / (count - 1).clamp(min=1))


class GRPOObjective:
    """`objective(model, batch) -> (loss, metrics)` on a batch from `RolloutLoader`."""

    def __init__(self, options: GRPOOptions) -> None:
        self.options = options
        self.last_checkpoint: Callable[[], Path | None] = lambda: None  # set by the run: where to resume from

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.options
        targets = batch["targets"]
        mask = targets != -100  # (B, T)
        logps, entropy = completion_token_logps(model, batch["ids"], targets, o.temperature)  # (B, T) each
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old  # one step per rollout batch: π_old is π itself
        ref = batch.get("ref_logps")
        per_token, stats = grpo_per_token_loss(logps, old, batch["advantages"], o.epsilon, o.epsilon_high,
                                               beta=o.beta if ref is not None else 0.0, ref_logps=ref)
        loss = aggregate_loss(per_token, mask, o.loss_type, max_completion_length=o.max_new_tokens)
        metrics = {k.removeprefix("stat_"): float(v) for k, v in batch.items() if k.startswith("stat_")}
        with torch.no_grad():
            metrics["entropy"] = float(masked_mean(entropy, mask))
            clipped = (stats["low_clipped"] | stats["high_clipped"]).expand_as(mask)
            metrics["clip_fraction"] = float(masked_mean(clipped.float(), mask))
            if ref is not None:
                delta = ref - logps.detach()
                kl = float(masked_mean(torch.exp(delta) - delta - 1, mask))  # k3, as in the loss
                metrics["kl"] = kl
                if o.max_kl is not None and not kl <= o.max_kl:
                    last = self.last_checkpoint()
                    raise TrainingDiverged(
                        f"the KL to the reference reached {kl:.3g} per token (limit {o.max_kl:g}); "
                        + (f"the last good checkpoint is {last}; " if last else "no checkpoint was written yet; ")
                        + "lower the learning rate or raise beta"
                    )
        return loss, metrics


@torch.no_grad()
def evaluate_rewards(lm, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]], sources: Sequence[RewardSource],
                     options: GRPOOptions, *, seed: int = 12345, samples: int = 1,
                     extra_stop_ids: Sequence[int] = ()) -> dict[str, float]:
    """Mean and std of the reward of `samples` sampled completions per prompt (fixed seed), and
    their mean length: the held-out figure before and after training."""
    from scribelm.sampling import SamplingSettings

    settings = SamplingSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                top_p=options.top_p, top_k=options.top_k)
    rows = [ids for ids in prompt_ids for _ in range(samples)]
    texts = [t for t in prompts for _ in range(samples)]
    rollouts = sample_rollouts(lm.model, lm.tokenizer, rows, replace(settings), seed=seed,
                               pad_id=lm.tokenizer.pad_id or 0, extra_stop_ids=extra_stop_ids)
    rewards, _ = combined_rewards(sources, texts, rollouts.completion_texts)
    return {"reward_mean": float(torch.nanmean(rewards)), "reward_std": float(_row_std(rewards.view(1, -1))[0]),
            "completion_length": float(rollouts.completion_lengths.float().mean()),
            "failed": float(torch.isnan(rewards).sum()), "completions": float(len(rows))}
