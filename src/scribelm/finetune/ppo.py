"""PPO: RLHF's classic loop, with a value head and a KL-penalised reward.

Proximal Policy Optimization (Schulman et al. 2017) as InstructGPT used it
(Ziegler et al. 2019, Ouyang et al. 2022). Each rollout batch:

    completions  = sample(π, prompts)                       # batched, one KV cache
    score        = Σ_k w_k · reward_k(prompt, completion)    # functions and/or reward models
    log π_old, V_old, log π_ref  per completion token       # no gradients
    r_t          = −β·(log π_old − log π_ref)_t  (+ score on the last token)
    A, R         = GAE(r, V_old; γ, λ);  A whitened over the batch
    β            ← adaptive: nudged so the KL tracks a target (or fixed)
    for epoch in ppo_epochs:                                # each minibatch: one Trainer step
        for minibatch in shuffled(batch):
            L = L_clip(π; A, ε) + c_v · L_V(V; R, ε_v)       # `rl_losses.ppo_policy_loss`, `ppo_value_loss`

The value head is a linear layer (C → 1) on the policy's own final hidden
states — one transformer, two outputs, as TRL's original PPO trainer did
(`AutoModelForCausalLMWithValueHead`) — so PPO costs no second model.
With LoRA the adapters serve both, and the reference is the base with the
adapters switched off. Completions no reward could score are dropped from
the batch and counted; a KL beyond `max_kl` stops the run with the last
good checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scribelm.errors import ConfigError
from scribelm.finetune.reward_functions import RewardSource, check_failures, combined_rewards
from scribelm.finetune.rl_losses import (
    AdaptiveKLController, gae, kl_penalised_rewards, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss,
    token_logps_and_entropy,
)
from scribelm.finetune.rollouts import sample_rollouts
from scribelm.train.config import TrainingDiverged

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOOptions:
    """The RL side of a PPO run (optimizer, steps, LoRA: `FinetuneOptions`)."""

    rollouts_per_batch: int = 16  # completions sampled per rollout batch
    minibatches: int = 2  # per epoch; each is one optimizer step
    ppo_epochs: int = 2  # passes over each rollout batch
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.05  # β in the reward
    kl_target: float | None = None  # set: adaptive β (Ziegler et al.) tracking this KL per sequence
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    clip_value: float = 0.2
    value_coef: float = 0.1
    whiten_rewards: bool = False
    max_kl: float | None = 10.0  # per token; above it the run stops
    sample_every: int = 10
    chat: bool | None = None
    reward_weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.minibatches < 1 or self.ppo_epochs < 1 or self.max_new_tokens < 1:
            raise ConfigError("minibatches, ppo_epochs and max_new_tokens must be at least 1")
        if self.rollouts_per_batch < 2 * self.minibatches:
            raise ConfigError(f"{self.rollouts_per_batch} rollouts cannot fill {self.minibatches} minibatches of at "
                              "least 2; raise rollouts_per_batch")
        if self.kl_coef < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("kl_coef must be >= 0 and gamma, lam in [0, 1]")


class PolicyWithValue(nn.Module):
    """The policy transformer and a value head on its final hidden states: ids -> (logits, values)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.d_model, 1, bias=True).to(next(policy.parameters()).device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy.hidden_states(ids)  # (B, T, C)
        return self.policy.unembedding(hidden), self.value_head(hidden.float()).squeeze(-1)  # (B, T, V), (B, T)


def value_head_bytes(model: PolicyWithValue) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()})


def load_value_head(path: Path, model: PolicyWithValue) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / VALUE_HEAD_FILE))
    with torch.no_grad():
        for k, v in model.value_head.state_dict().items():
            v.copy_(state[k])


def _policy_outputs(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(log π(target), entropy, V) per position (B, T), 0 where there is no target."""
    logits, values = model(ids)
    if temperature != 1.0:
        logits = logits / temperature
    mask = targets != -100
    logps, entropy = token_logps_and_entropy(logits, targets.clamp(min=0))
    return logps * mask, entropy * mask, values * mask


class PPORolloutLoader:
    """Rollout batches cut into minibatches for `ppo_epochs` passes, for the Trainer; resumable
    at rollout-batch boundaries (a resume mid-batch samples a fresh batch)."""

    def __init__(self, lm, actor: PolicyWithValue, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
                 sources: Sequence[RewardSource], options: PPOOptions, *,
                 reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], seed: int = 0,
                 samples_path: Path | None = None, extra_stop_ids: Sequence[int] = ()) -> None:
        from scribelm.sampling import SamplingSettings

        self.lm, self.actor, self.prompts, self.prompt_ids = lm, actor, list(prompts), list(prompt_ids)
        self.sources, self.options, self.reference, self.seed = list(sources), options, reference, seed
        self.samples_path, self.extra_stop_ids = samples_path, list(extra_stop_ids)
        self.settings = SamplingSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                         top_p=options.top_p, top_k=options.top_k)
        self.kl = AdaptiveKLController(options.kl_coef, options.kl_target, options.kl_horizon) \
            if options.kl_target else None
        self.kl_coef = options.kl_coef
        self.draws, self.cursor = 0, 0
        self.sequence_length = max(len(p) for p in self.prompt_ids) + options.max_new_tokens

    def __len__(self) -> int:
        """Optimizer steps per pass over the prompts."""
        o = self.options
        return -(-len(self.prompts) // o.rollouts_per_batch) * o.ppo_epochs * o.minibatches

    def __iter__(self):
        o = self.options
        while True:
            batch = self.draw()
            B = batch["ids"].shape[0]
            generator = torch.Generator().manual_seed(self.seed * 7919 + self.draws)
            for _ in range(o.ppo_epochs):
                order = torch.randperm(B, generator=generator)
                for part in order.chunk(o.minibatches):
                    yield {k: (v[part] if v.dim() and v.shape[0] == B else v) for k, v in batch.items()}

    def _next_prompts(self) -> list[int]:
        n = len(self.prompts)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.cursor // n))
        chosen = []
        for _ in range(self.options.rollouts_per_batch):
            chosen.append(int(order[self.cursor % n]))
            self.cursor += 1
            if self.cursor % n == 0:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.cursor // n))
        return chosen

    @torch.no_grad()
    def draw(self) -> dict[str, torch.Tensor]:
        o, model = self.options, self.lm.model
        chosen = self._next_prompts()
        rows = [self.prompt_ids[i] for i in chosen]
        texts = [self.prompts[i] for i in chosen]
        rollouts = sample_rollouts(model, self.lm.tokenizer, rows, self.settings, seed=self.seed * 7919 + self.draws,
                                   pad_id=self.lm.tokenizer.pad_id or 0, extra_stop_ids=self.extra_stop_ids)
        self.draws += 1
        scores, _ = combined_rewards(self.sources, texts, rollouts.completion_texts)
        failed = check_failures(scores, self.sources)
        keep = ~torch.isnan(scores)  # unscored completions leave the batch
        device = next(model.parameters()).device
        ids, targets, scores = rollouts.ids[keep].to(device), rollouts.targets[keep].to(device), scores[keep].to(device)
        mask = targets != -100
        was_training = self.actor.training
        self.actor.eval()
        try:
            old_logps, _, old_values = _policy_outputs(self.actor, ids, targets, o.temperature)
        finally:
            self.actor.train(was_training)
        ref_logps = self.reference(ids, targets)
        rewards, kl = kl_penalised_rewards(scores, old_logps, ref_logps, mask, self.kl_coef)
        if o.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, old_values, mask, o.gamma, o.lam)
        advantages = masked_whiten(advantages, mask) * mask
        kl_per_sequence = float(kl.sum(1).mean())
        stats = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                 "reward_failed": float(failed), "kl": float(masked_mean(kl, mask)), "kl_coef": self.kl_coef,
                 "completion_length": float(rollouts.completion_lengths[keep].float().mean()),
                 "truncated_fraction": float(rollouts.truncated[keep].float().mean())}
        if self.kl is not None:
            self.kl_coef = self.kl.update(kl_per_sequence, len(scores))
        self._write_samples(texts, rollouts.completion_texts, scores, keep)
        batch = {"ids": ids, "targets": targets, "old_logps": old_logps, "old_values": old_values,
                 "advantages": advantages, "returns": returns}
        return {k: v.cpu() for k, v in batch.items()} | {f"stat_{k}": torch.tensor(v) for k, v in stats.items()}

    def _write_samples(self, prompts, completions, scores, keep) -> None:
        import json

        every = self.options.sample_every
        if not every or self.samples_path is None or (self.draws - 1) % every:
            return
        kept = [i for i in range(len(prompts)) if keep[i]][:2]
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for j, i in enumerate(kept):
                f.write(json.dumps({"draw": self.draws, "prompt": prompts[i], "completion": completions[i],
                                    "reward": float(scores[j])}) + "\n")

    def state_dict(self) -> dict[str, float]:
        return {"draws": self.draws, "cursor": self.cursor, "seed": self.seed, "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.draws, self.cursor, self.seed = int(state["draws"]), int(state["cursor"]), int(state["seed"])
        self.kl_coef = float(state["kl_coef"])
        if self.kl is not None:
            self.kl.value = self.kl_coef


class PPOObjective:
    """`objective(actor, minibatch) -> (loss, metrics)`: clipped policy loss + c_v · clipped value loss."""

    def __init__(self, options: PPOOptions) -> None:
        self.options = options
        self.last_checkpoint: Callable[[], Path | None] = lambda: None

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.options
        metrics = {k.removeprefix("stat_"): float(v) for k, v in batch.items() if k.startswith("stat_")}
        if o.max_kl is not None and not metrics["kl"] <= o.max_kl:
            last = self.last_checkpoint()
            raise TrainingDiverged(
                f"the KL to the reference reached {metrics['kl']:.3g} per token (limit {o.max_kl:g}); "
                + (f"the last good checkpoint is {last}; " if last else "no checkpoint was written yet; ")
                + "lower the learning rate or raise the KL coefficient"
            )
        mask = batch["targets"] != -100
        logps, entropy, values = _policy_outputs(model, batch["ids"], batch["targets"], o.temperature)
        policy_loss, policy_stats = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, o.clip)
        value_loss, value_stats = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, o.clip_value)
        with torch.no_grad():
            metrics.update(policy_loss=float(policy_loss), value_loss=float(value_loss),
                           clip_fraction=float(policy_stats["clip_fraction"]),
                           approx_kl=float(policy_stats["approx_kl"]),
                           value_clip_fraction=float(value_stats["value_clip_fraction"]),
                           entropy=float(masked_mean(entropy, mask)))
        return policy_loss + o.value_coef * value_loss, metrics
