"""Direct Preference Optimization: learn from pairs of better and worse replies.

DPO (Rafailov et al. 2023) skips the reward model and the reinforcement
learning loop of RLHF. For a prompt x with a chosen reply y_w and a rejected
one y_l, the policy π (the model being tuned) and a frozen reference π_ref
(the model before tuning) each give a log-probability of each reply, and

    reward(y)  = β · (log π(y|x) − log π_ref(y|x))          the implicit reward
    loss       = −log σ(reward(y_w) − reward(y_l))

pushes the chosen reply's probability up relative to the rejected one,
measured against the reference so the policy does not drift arbitrarily far
(β sets how far: small β, weak tether). With `label_smoothing` ε the target
is softened for noisy labels (cDPO): −(1−ε)·log σ(z) − ε·log σ(−z).

The reference costs a second model in memory; it can instead be run once
over the data before training (`precompute_reference_logps`) and its
log-probabilities stored with each pair. With LoRA the reference is free:
the base model with the adapters switched off.

Reported: reward_chosen, reward_rejected, reward_margin (their difference)
and reward_accuracy (share of pairs where the chosen reply wins).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from scribelm.errors import ScribeError

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of log p(target) over each row's counted positions. logits (N, T, V), targets (N, T) -> (N,)."""
    N, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index,
                          reduction="none")  # (N·T,), 0 where ignored
    return -nll.view(N, T).sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of a batch of sequence log-probs (each (B,)) and its reward metrics."""
    chosen_reward = beta * (policy_chosen - reference_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - reference_rejected)  # (B,)
    z = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    metrics = {
        "reward_chosen": float(chosen_reward.mean()),
        "reward_rejected": float(rejected_reward.mean()),
        "reward_margin": float((chosen_reward - rejected_reward).mean()),
        "reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
    }
    return losses.mean(), metrics


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model, for as long as the block runs (LoRA adapters switched off)."""
    from scribelm.adapters.lora import lora_modules

    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


class DPOObjective:
    """`objective(model, batch) -> (loss, metrics)` for the Trainer.

    The batch stacks chosen rows (first half) over rejected rows (second half),
    as `scribelm.data.preference.collate_pairs` makes it. Reference log-probs
    come from the batch (`reference_logps`, precomputed), else from
    `reference_model`, else from the policy itself with its LoRA adapters off.
    """

    def __init__(self, beta: float = 0.1, reference_model: torch.nn.Module | None = None,
                 label_smoothing: float = 0.0) -> None:
        if beta <= 0:
            raise ScribeError(f"DPO beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ScribeError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.reference_model, self.label_smoothing = beta, reference_model, label_smoothing

    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        with torch.no_grad():
            if self.reference_model is not None:
                return sequence_logps(self.reference_model(batch["ids"]), batch["targets"])
            from scribelm.adapters.lora import lora_modules

            inner = getattr(model, "module", model)  # DDP keeps the model in .module
            if not lora_modules(inner):
                raise ScribeError("DPO needs a reference: precompute reference log-probs, pass a frozen reference "
                                  "model, or train LoRA adapters (the base without them is the reference)")
            with adapters_disabled(inner):
                return sequence_logps(inner(batch["ids"]), batch["targets"])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, targets = batch["ids"], batch["targets"]  # (2B, T) each
        B = ids.shape[0] // 2
        policy = sequence_logps(model(ids), targets)  # (2B,)
        reference = self.reference_logps(model, batch).to(policy)
        loss, metrics = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], self.beta, self.label_smoothing)
        metrics["pairs"] = float(B)
        return loss, metrics


@torch.no_grad()
def precompute_reference_logps(model: torch.nn.Module, dataset, batch_size: int = 8,
                               device: torch.device | str | None = None) -> None:
    """Run the reference once over every pair and store (log π_ref(chosen), log π_ref(rejected)) with it."""
    from scribelm.data.preference import collate_pairs

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset.pairs), batch_size):
            pairs = dataset.pairs[start: start + batch_size]
            for p in pairs:
                p.reference_logps = None
            batch = collate_pairs(pairs)
            logps = sequence_logps(model(batch["ids"].to(device)), batch["targets"].to(device)).cpu()  # (2B,)
            B = len(pairs)
            for i, p in enumerate(pairs):
                p.reference_logps = (float(logps[i]), float(logps[B + i]))
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_preferences(model: torch.nn.Module, dataset, beta: float = 0.1, batch_size: int = 8,
                         reference_model: torch.nn.Module | None = None,
                         device: torch.device | str | None = None) -> dict[str, float]:
    """DPO loss, reward margin and accuracy over a whole (held-out) preference set."""
    from scribelm.data.preference import collate_pairs

    objective = DPOObjective(beta, reference_model)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0}
    n = 0
    try:
        for start in range(0, len(dataset.pairs), batch_size):
            pairs = dataset.pairs[start: start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(pairs).items()}
            loss, metrics = objective(model, batch)
            totals["loss"] += float(loss) * len(pairs)
            for k in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
                totals[k] += metrics[k] * len(pairs)
            n += len(pairs)
    finally:
        model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()} | {"pairs": float(n)}
