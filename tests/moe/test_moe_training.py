"""Training a mixture of experts: the objective adds router_aux_loss_coef · load-balancing loss,
the Trainer logs the loss and each expert's share, and the balance loss pulls routing even."""

import json

import torch
import torch.nn.functional as F

from scribelm.model import MLP, Transformer
from scribelm.moe import MoE, expert_share, load_balancing_loss, router_logits
from scribelm.train import NextTokenObjective, TrainConfig, Trainer
from tests.conftest import tiny_config
from tests.train.test_train import ListLoader, random_batches


def moe_tiny(**overrides):
    return tiny_config(n_experts=4, experts_per_token=2, d_expert=32, **overrides)


def test_objective_adds_the_weighted_balance_loss():
    torch.manual_seed(0)
    model = Transformer(moe_tiny(router_aux_loss_coef=0.5)).train()
    batch = random_batches(1, 2)[0]
    batch["attention_mask"] = torch.ones_like(batch["ids"])
    batch["attention_mask"][0, :3] = 0
    loss, metrics = NextTokenObjective()(model, batch)
    logits = model(batch["ids"], attention_mask=batch["attention_mask"])
    cross_entropy = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["targets"].reshape(-1))
    aux = load_balancing_loss(router_logits(model), 4, 2, batch["attention_mask"])
    assert torch.allclose(loss, cross_entropy + 0.5 * aux, atol=1e-6)
    assert metrics["router_aux_loss"] == float(aux.detach()) and len(metrics["expert_share"]) == 4


def test_trainer_logs_expert_share_and_balance_loss(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=0, plot=False)
    Trainer(Transformer(moe_tiny()), None, ListLoader(random_batches(6, 2)), None, cfg, tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert r["router_aux_loss"] >= 2.0 - 1e-6  # E · Σ f·P is at least top_k, reached when balanced
        assert len(r["expert_share"]) == 4 and abs(sum(r["expert_share"]) - 1) < 1e-6


def test_balance_loss_evens_out_a_collapsed_router():
    """Only the balance term is trained: a router that sends every token to experts 0 and 1 spreads
    its probability over all four (E · Σ f·P falls to its floor, top_k = 2, when P is uniform)."""
    torch.manual_seed(0)
    config = moe_tiny()
    layer = MoE(config, lambda width: MLP(config, width))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:2] = 0.1  # inputs centred at +1: experts 0 and 1 win for every token
    x = torch.randn(4, 16, config.d_model) + 1
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        layer(x)
        aux = load_balancing_loss([layer.router_logits], 4, 2)
        losses.append(float(aux.detach()))
        if len(losses) == 1:
            assert expert_share([layer.router_logits.detach()], 4, 2) == [0.5, 0.5, 0.0, 0.0]
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
    assert losses[0] > 3.5 and losses[-1] < 2.3
    mean_probability = torch.softmax(layer.router_logits.detach(), -1).mean(0)
    assert mean_probability.min() > 0.15
