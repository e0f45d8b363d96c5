"""The arithmetic of RL from feedback, as pure functions on tensors.

Reward model (Bradley–Terry). A scalar r(x, y) scores a reply; for a pair
where y_w was preferred to y_l,

    loss = −log σ(r_w − r_l − margin)  +  c · mean((r_w + r_l)²)

the second term (reward centring, c ≥ 0) keeps scores near zero, since the
pairwise loss only sees differences.

PPO (Schulman et al. 2017, as RLHF uses it: Ziegler 2019, Ouyang 2022).
Per generated token t: the policy's log-prob, the frozen reference's, a
value estimate V_t. The reward is the KL penalty on every token plus the
scalar score on the last:

    r_t = −β·(log π − log π_ref)_t  (+ score at the last token)
    δ_t = r_t + γ·V_{t+1} − V_t                          temporal difference
    A_t = δ_t + γλ·A_{t+1}                               GAE (V and A are 0 past the end)
    R_t = A_t + V_t                                      the value head's target
    A   ← (A − mean) / std   over real tokens            whitening
    ρ_t = exp(log π − log π_old)
    L_π = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))
    L_V = ½·mean(max((V − R)², (clip(V, V_old ± ε_v) − R)²))

GRPO (Shao et al. 2024). No value model: sample G completions per prompt,
and each one's advantage is its reward against its group's,

    A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)     (std optional)

applied to every token of completion i, in the same clipped objective, plus
β·KL(π‖π_ref) per token (the k3 estimator exp(q−p) − (q−p) − 1 with
q = log π_ref, p = log π; β = 0 by default, as current practice). The
per-token losses are then aggregated:

    grpo     mean over each sequence's tokens, then over sequences
    bnpo     mean over all tokens of the batch
    dr_grpo  sum over all tokens / (sequences · max_completion_length)  (Dr. GRPO: no length bias)
    dapo     sum over all tokens / tokens in the whole generation batch  (DAPO token level)

Where these follow TRL rather than the papers, on purpose (the tests hold us
to TRL within 1e-6): the group std is the unbiased one (n−1) with 1e-4
added, not the paper's plain std; the KL in PPO's reward is the k1 estimate
log π − log π_ref per token (old TRL PPO), while GRPO's loss uses k3; the
value loss carries the factor ½; whitening uses the unbiased variance and
adds the mean back for rewards (`shift_mean=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_SCALES = ("group", "batch", "none")


# --------------------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (over `dim`, or all)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is true; unbiased (n−1) by default."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("an unbiased variance needs at least two values")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over masked entries; `shift_mean=False` keeps the mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# --------------------------------------------------------------------------- reward model


def reward_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                     center_coefficient: float | None = None) -> torch.Tensor:
    """Bradley–Terry loss of scores (B,) for chosen and rejected replies; optional margin (B,) and centring."""
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


# --------------------------------------------------------------------------- token log-probs


def token_logps_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and the entropy of the distribution at each position. logits (B, T, V), tokens (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return chosen, entropy


# --------------------------------------------------------------------------- PPO


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): −β·(log π − log π_ref) on each real token, the score (B,) added
    at each row's last real token. Returns (rewards, per-token KL), both 0 on padding."""
    kl = (logps - ref_logps) * mask  # (B, T), k1 estimate
    rewards = -kl_coef * kl
    last = (mask.long().sum(1) - 1).clamp(min=0)  # (B,)
    has_tokens = mask.any(1)
    rows = torch.arange(len(scores), device=scores.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) right-padded rows: (advantages, returns),
    neither whitened. Values and advantages past a row's end count as 0."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, mean over real tokens. All (B, T). Returns (loss, {clip_fraction, approx_kl})."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(0.5 * (logps - old_logps) ** 2, mask).detach(),
    }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½·mean(max((V−R)², (clip(V, V_old±ε)−R)²)) over real tokens. Returns (loss, {value_clip_fraction})."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, {"value_clip_fraction": masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()}


class AdaptiveKLController:
    """Ziegler et al. (2019): move β so the observed KL tracks a target, proportionally and clipped."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# --------------------------------------------------------------------------- GRPO


def _nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaNs (rewards that could not be computed)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True) if dim is not None else torch.nanmean(values)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) if dim is not None \
        else torch.nanmean((values - mean) ** 2)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(values)).sum()
    variance = variance * count / (count - 1)
    std = torch.sqrt(variance)
    return std if keepdim or dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (N·G,), G consecutive completions per prompt -> (advantages (N·G,), std used (N·G,)).
    NaN rewards (failed scoring) stay out of the statistics and get advantage 0."""
    if scale not in STD_SCALES:
        raise ValueError(f"std scaling must be one of {', '.join(STD_SCALES)}, got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (N, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif group_size > 1:
        std = _nanstd(grouped, dim=1).repeat_interleave(group_size)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def grpo_per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                        ref_logps: torch.Tensor | None = None,
                        kl_importance_correction: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped loss (B, T) (+ β·k3 KL). advantages (B,) per sequence or (B, T) per token.
    With `kl_importance_correction` the KL of tokens sampled from π_old is weighted by the ratio
    π/π_old (TRL's default), which makes it unbiased once the policy has moved.
    Returns (loss, {ratio, kl (or None), low_clipped, high_clipped})."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("a KL term (beta != 0) needs the reference log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_importance_correction:
            kl = kl * ratio
        loss = loss + beta * kl
    stats = {"ratio": ratio, "kl": kl, "low_clipped": (ratio < 1 - epsilon_low) & (advantages < 0),
             "high_clipped": (ratio > 1 + epsilon_high) & (advantages > 0)}
    return loss, stats


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "grpo", *,
                   max_completion_length: int | None = None, total_tokens: float | None = None) -> torch.Tensor:
    """Per-token losses (B, T) -> a scalar, by `mode` (see the module docstring). `dr_grpo` needs
    `max_completion_length`; `dapo` divides by `total_tokens` (default: this batch's real tokens)."""
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if mode == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo aggregation needs max_completion_length")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if mode == "dapo":
        total = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=mask.dtype)
        return masked.sum() / total.clamp(min=1.0)
    raise ValueError(f"loss aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")
