"""The RL loss arithmetic against TRL's own trainers, on identical tensors.

A tiny scribelm model is exported to Hugging Face; TRL's GRPOTrainer and
RewardTrainer are built around it, and their loss methods run on batches we
make. Our pure functions get the same log-probs (computed from the same
transformers model) and must agree within 1e-6.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import scribelm
from scribelm.finetune.rl_losses import (
    aggregate_loss,
    gae,
    group_advantages,
    grpo_per_token_loss,
    kl_penalised_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reward_pair_loss,
    token_logps_and_entropy,
)
from tests.conftest import CORPUS, tiny_config

G = 4
MAX_COMPLETION = 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from scribelm.interop.hf.save import save_hf
    from scribelm.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train(CORPUS, vocab_size=400, min_frequency=2)
    lm = scribelm.LM(scribelm.Transformer(tiny_config()).eval(), tok)
    return save_hf(lm, tmp_path_factory.mktemp("rl") / "hf")


@pytest.fixture(scope="module")
def grpo_trainer(hf_dir, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=2 * G,
                      num_generations=G, max_completion_length=MAX_COMPLETION, report_to=[], use_cpu=True,
                      beta=0.04, epsilon=0.2, epsilon_high=0.28, logging_steps=1, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_list([{"prompt": "It was the"}] * 8),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()  # the "train" metrics; this Llama has no dropout, so nothing else changes
    return trainer


def _batch(trainer, seed: int):
    """prompt + completion ids with ragged completion masks, and per-token old/reference log-probs
    near the model's own, so some ratios fall outside the clip range and some inside."""
    g = torch.Generator().manual_seed(seed)
    B, P = 2 * G, 3
    prompt_ids = torch.randint(5, 400, (B, P), generator=g)
    completion_ids = torch.randint(5, 400, (B, MAX_COMPLETION), generator=g)
    lengths = torch.randint(1, MAX_COMPLETION + 1, (B,), generator=g)
    completion_mask = (torch.arange(MAX_COMPLETION)[None] < lengths[:, None]).long()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, P - 1:-1]  # (B, C, V)
    logps, entropy = token_logps_and_entropy(logits, completion_ids)
    old = logps + 0.3 * torch.randn(logps.shape, generator=g)
    ref = logps + 0.5 * torch.randn(logps.shape, generator=g)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": completion_mask.sum() + 5}  # the whole generation batch counts more tokens
    return inputs, logps, entropy


@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_and_metrics_equal_trl(grpo_trainer, mode, one_thread):
    trainer = grpo_trainer
    trainer.loss_type = mode
    inputs, logps, entropy = _batch(trainer, seed=len(mode))
    advantages = torch.randn(2 * G, generator=torch.Generator().manual_seed(1))
    inputs["advantages"] = advantages
    trainer._metrics["train"].clear()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs)
    mask = inputs["completion_mask"]
    per_token, stats = grpo_per_token_loss(logps, inputs["old_per_token_logps"], advantages, 0.2, 0.28, beta=0.04,
                                           ref_logps=inputs["ref_per_token_logps"])
    ours = aggregate_loss(per_token, mask, mode, max_completion_length=MAX_COMPLETION,
                          total_tokens=inputs["num_items_in_batch"])
    assert abs(float(ours) - float(theirs)) < 1e-6
    metrics = trainer._metrics["train"]
    region = (stats["low_clipped"] | stats["high_clipped"]).float()
    assert 0 < float((region * mask).sum()) < float(mask.sum())  # both sides of the clip are exercised
    assert abs(float((region * mask).sum() / mask.sum()) - metrics["clip_ratio/region_mean"][-1]) < 1e-6
    assert abs(float((stats["kl"] * mask).sum() / mask.sum()) - metrics["kl"][-1]) < 1e-6
    assert abs(float((entropy * mask).sum() / mask.sum()) - metrics["entropy"][-1]) < 1e-5


def test_ppo_clipped_policy_loss_equals_trl_token_level_objective(grpo_trainer, one_thread):
    """TRL's PPO trainer is gone from TRL 1.x; its clipped surrogate lives on in GRPOTrainer, which
    takes per-token advantages (B, T) and with `bnpo` averages over all tokens: PPO's L_π."""
    trainer = grpo_trainer
    trainer.loss_type, trainer.beta = "bnpo", 0.0
    try:
        inputs, logps, _ = _batch(trainer, seed=7)
        advantages = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        inputs["advantages"] = advantages
        trainer.epsilon_high = trainer.epsilon_low  # PPO clips symmetrically
        with torch.no_grad():
            theirs = trainer._compute_loss(trainer.model, inputs)
        ours, stats = ppo_policy_loss(logps, inputs["old_per_token_logps"], advantages, inputs["completion_mask"], 0.2)
        assert abs(float(ours) - float(theirs)) < 1e-6
        assert 0 < float(stats["clip_fraction"]) < 1
    finally:
        trainer.beta, trainer.epsilon_high = 0.04, 0.28


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(grpo_trainer, scale, one_thread):
    """TRL samples and scores real completions; we recompute advantages from the rewards it saw,
    including a completion no reward function could score (None -> NaN -> advantage 0)."""
    trainer = grpo_trainer
    seen = []

    def reward(completions, **kw):
        rewards = [float(len(c) % 5) if i != 2 else None for i, c in enumerate(completions)]
        seen.append(rewards)
        return rewards

    trainer.reward_funcs, trainer.scale_rewards = [reward], scale
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer._generate_and_score_completions([{"prompt": "It was the"}] * G + [{"prompt": "In the"}] * G)
    rewards = torch.tensor([float("nan") if r is None else r for r in seen[-1]])
    ours, _ = group_advantages(rewards, G, scale)
    assert torch.allclose(ours, out["advantages"], atol=1e-6, rtol=0)
    assert ours[2] == 0 and ours.abs().sum() > 0


def test_reward_pair_loss_equals_trl_reward_trainer(hf_dir, tmp_path, one_thread):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, center_rewards_coefficient=0.01, bf16=False)
    data = Dataset.from_list([{"chosen": "It was the best of times", "rejected": "the worst"}] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (6, 7), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    ids[1, 5:] = tokenizer.pad_token_id
    margin = torch.rand(3, generator=g)
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=attention).logits.squeeze(-1)  # (6,)
        for with_margin in (False, True):
            inputs = {"input_ids": ids, "attention_mask": attention} | ({"margin": margin} if with_margin else {})
            theirs = trainer.compute_loss(model, inputs)
            ours = reward_pair_loss(scores[:3], scores[3:], margin if with_margin else None, 0.01)
            assert abs(float(ours) - float(theirs)) < 1e-6


# --------------------------------------------------------------------------- PPO arithmetic, in closed form
# (TRL 1.x ships no PPO trainer to compare against; these hold the definitions themselves.)


def test_gae_equals_discounted_sum_of_td_errors():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 3, 6, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 1])
    mask = torch.arange(T)[None] < lengths[:, None]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(lengths[b])
        v = torch.cat([values[b, :n], torch.zeros(1, dtype=torch.float64)])
        delta = rewards[b, :n] + gamma * v[1:] - v[:-1]
        for t in range(n):
            expected = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert abs(float(advantages[b, t]) - float(expected)) < 1e-12
        assert torch.all(advantages[b, n:] == 0) and torch.all(returns[b, n:] == 0)
    # λ = 1: the return is the discounted reward to go, whatever the values
    _, returns = gae(rewards, values, mask, gamma, 1.0)
    togo = sum(gamma ** k * rewards[0, k] for k in range(T))
    assert abs(float(returns[0, 0]) - float(togo)) < 1e-12


def test_whitening_kl_rewards_and_value_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.3
    white = masked_whiten(x, mask)
    selected = white[mask]
    assert abs(float(selected.mean())) < 1e-12 and abs(float(selected.std()) - 1) < 1e-6
    kept = masked_whiten(x, mask, shift_mean=False)[mask]
    assert abs(float(kept.mean() - x[mask].mean())) < 1e-12

    logps, ref = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards[0, :2], -0.1 * (logps - ref)[0, :2])
    assert abs(float(rewards[0, 2]) - float(-0.1 * (logps - ref)[0, 2] + 2.0)) < 1e-6
    assert abs(float(rewards[1, 0]) - float(-0.1 * (logps - ref)[1, 0] - 1.0)) < 1e-6
    assert torch.all(rewards[0, 3:] == 0) and torch.all(kl[1, 1:] == 0)

    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 2.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-0.5)²=0.25, clipped (0.2-0.5)²=0.09 -> 0.25; token 1: 4 both ways
    assert abs(float(loss) - 0.5 * (0.25 + 4.0) / 2) < 1e-7 and float(stats["value_clip_fraction"]) == 0
