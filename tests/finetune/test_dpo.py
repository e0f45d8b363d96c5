import math

import pytest
import torch

from scribelm.adapters import LoRAConfig, apply_lora
from scribelm.data.preference import PreferenceDataset, collate_pairs
from scribelm.finetune.dpo import (
    DPOObjective,
    dpo_loss,
    evaluate_preferences,
    precompute_reference_logps,
    sequence_logps,
)
from scribelm.model import Transformer
from tests.conftest import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_loss_matches_a_hand_computation():
    pc, pr = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -7.0])
    rc, rr = torch.tensor([-5.0, -9.0]), torch.tensor([-5.0, -8.0])
    beta = 0.5
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: chosen reward 0.5·(−4+5)=0.5, rejected 0.5·(−6+5)=−0.5, z=1.0
    # pair 2: chosen 0.5·(−10+9)=−0.5, rejected 0.5·(−7+8)=0.5, z=−1.0
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_chosen"] == pytest.approx(0.0) and m["reward_rejected"] == pytest.approx(0.0)
    assert m["reward_margin"] == pytest.approx(0.0) and m["reward_accuracy"] == pytest.approx(0.5)
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    by_hand = sum(-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)) for z in (1.0, -1.0)) / 2
    assert smoothed.item() == pytest.approx(by_hand, rel=1e-6)


def test_sequence_logps_sum_only_counted_targets():
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[1, -100, 3, -100], [-100, -100, 6, 0]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 0, 1] + logp[0, 2, 3], logp[1, 2, 6] + logp[1, 3, 0]])
    torch.testing.assert_close(sequence_logps(logits, targets), expected)


def toy_pairs(tokenizer):
    # the chosen reply repeats the prompt's word; the rejected one says something else
    words = ["best", "times", "worst", "wisdom", "earth", "heaven", "money", "fox", "dog", "lazy", "quick", "brown"]
    records = [{"prompt": f"say {w}", "chosen": w, "rejected": "no"} for w in words]
    return PreferenceDataset.from_records(records, tokenizer, max_length=32)


@pytest.mark.parametrize("reference", ["precomputed", "frozen-model", "adapters-off"])
def test_a_few_dpo_steps_raise_the_chosen_over_rejected_margin(tokenizer, reference):
    torch.manual_seed(0)
    data = toy_pairs(tokenizer)
    model = Transformer(tiny_config())
    reference_model = None
    if reference == "frozen-model":
        reference_model = Transformer(tiny_config()).eval()
        reference_model.load_state_dict(model.state_dict())
    if reference == "adapters-off":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all-linear"))
    if reference == "precomputed":
        precompute_reference_logps(model, data)
        assert all(p.reference_logps is not None for p in data.pairs)
    objective = DPOObjective(beta=0.5, reference_model=reference_model)
    before = evaluate_preferences(model, data, beta=0.5, reference_model=reference_model)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3 if reference == "adapters-off" else 2e-3)
    batch = collate_pairs(data.pairs)
    model.train()
    for _ in range(8):
        loss, metrics = objective(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate_preferences(model, data, beta=0.5, reference_model=reference_model)
    assert after["reward_margin"] > 0.5
    assert after["reward_accuracy"] > 0.9
    assert after["loss"] < before["loss"] - 0.1


def test_precomputed_reference_equals_running_the_reference(tokenizer):
    torch.manual_seed(0)
    data = toy_pairs(tokenizer)
    model = Transformer(tiny_config()).eval()
    precompute_reference_logps(model, data, batch_size=5)
    batch = collate_pairs(data.pairs)
    with torch.no_grad():
        direct = sequence_logps(model(batch["ids"]), batch["targets"])
    torch.testing.assert_close(batch["reference_logps"], direct, atol=1e-4, rtol=1e-5)


def test_dpo_without_any_reference_is_refused(tokenizer):
    data = toy_pairs(tokenizer)
    with pytest.raises(Exception, match="DPO needs a reference"):
        DPOObjective()(Transformer(tiny_config()), collate_pairs(data.pairs))
    with pytest.raises(Exception, match="beta must be positive"):
        DPOObjective(beta=0)
