"""The mixture-of-experts layer on its own: what routing computes, where gradients go,
and which configs are refused."""

import pytest
import torch

from scribelm.config import ModelConfig
from scribelm.errors import ConfigError
from scribelm.model import MLP, Transformer
from scribelm.moe import MoE, expert_share, load_balancing_loss, router_logits


def moe_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, context_length=64, d_model=32, n_layers=2, n_heads=4, d_mlp=48, activation="swiglu",
                norm="rmsnorm", position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                n_experts=4, experts_per_token=2)
    return ModelConfig(**{**base, **overrides})


def make_moe(config: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(config, lambda width: MLP(config, width))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_all_experts_with_equal_router_is_the_dense_average():
    config = moe_config(experts_per_token=4)
    layer = make_moe(config)
    torch.nn.init.zeros_(layer.router.weight)  # equal logits: every expert weighs 1/E
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        average = torch.stack([expert(x) for expert in layer.experts]).mean(0)  # (B, T, C)
        assert torch.allclose(layer(x), average, atol=1e-6)


def test_dispatch_equals_the_per_token_definition():
    """Sorted, grouped dispatch gives Σ_j w_j · Expert_j(x) token by token, with and without renormalising."""
    for normalize in (True, False):
        config = moe_config(n_experts=5, experts_per_token=2, normalize_top_k=normalize, d_shared_expert=24)
        layer = make_moe(config, seed=1)
        x = torch.randn(3, 7, 32)
        with torch.no_grad():
            got = layer(x).reshape(-1, 32)
            for n, token in enumerate(x.reshape(-1, 32)):
                probs = torch.softmax(layer.router(token), -1)
                top, chosen = probs.topk(2)
                if normalize:
                    top = top / top.sum()
                want = sum(w * layer.experts[int(e)](token) for w, e in zip(top, chosen))
                want = want + torch.sigmoid(layer.shared_expert_gate(token)) * layer.shared_expert(token)
                assert torch.allclose(got[n], want, atol=1e-5), n


def test_gradients_reach_only_the_chosen_experts():
    config = moe_config(n_experts=4, experts_per_token=2)
    layer = make_moe(config)
    with torch.no_grad():  # positive inputs; expert 3's router row pushes it to the bottom for every token
        layer.router.weight[3] = -5.0
    x = torch.rand(2, 6, 32)
    layer(x).square().sum().backward()
    chosen = set(torch.softmax(layer.router_logits, -1).topk(2).indices.flatten().tolist())
    assert 3 not in chosen and chosen
    for i, expert in enumerate(layer.experts):
        grads = [p.grad for p in expert.parameters()]
        if i in chosen:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None for g in grads), i
    assert layer.router.weight.grad.abs().sum() > 0  # the router learns through the routing weights


def test_router_jitter_only_in_training():
    config = moe_config(router_jitter=0.5)
    layer = make_moe(config)
    x = torch.randn(1, 8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    assert not torch.allclose(noisy, layer.eval()(x))


def test_model_with_experts_trains_and_counts_balance():
    config = moe_config()
    model = Transformer(config)
    ids = torch.randint(0, 64, (2, 16))
    model(ids)
    logits = router_logits(model)
    assert [t.shape for t in logits] == [(32, 4)] * 2
    share = expert_share(logits, 4, 2)
    assert abs(sum(share) - 1.0) < 1e-6
    # perfectly uniform routing scores top_k (the minimum of E · Σ f·P with Σ f = k, P = 1/E)
    uniform = [torch.zeros(32, 4)]
    assert abs(float(load_balancing_loss(uniform, 4, 2)) - 2.0) < 1e-6


@pytest.mark.parametrize("overrides, message", [
    (dict(n_experts=4, experts_per_token=5), "experts_per_token=5 must be between 1 and n_experts=4"),
    (dict(n_experts=4, experts_per_token=0), "experts_per_token=0"),
    (dict(n_experts=-1), "n_experts must be between 0"),
    (dict(router_jitter=1.5), "router_jitter must be in [0, 1)"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    (dict(d_shared_expert=-3), "d_shared_expert"),
])
def test_bad_expert_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        moe_config(**overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dense_config_is_unchanged():
    dense = Transformer(moe_config(n_experts=0))
    assert not any("router" in name or "experts" in name for name, _ in dense.named_parameters())
