import itertools
import math

import pytest
import torch

from scribelm.cache import ContextOverflowError, KVCache
from scribelm.config import ModelConfig
from scribelm.model import Transformer, rope_inverse_frequencies
from tests.conftest import tiny_config

OPTIONS = {
    "position": ["learned", "sinusoidal", "rope", "none"],
    "activation": ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"],
    "norm": ["layernorm", "rmsnorm"],
    "norm_position": ["pre", "post"],
    "tie_embeddings": [True, False],
}


def variants():
    # every value of every option at least once, plus the cross product of the structural ones
    seen = []
    for pos, norm, where in itertools.product(OPTIONS["position"], OPTIONS["norm"], OPTIONS["norm_position"]):
        seen.append(dict(position=pos, norm=norm, norm_position=where))
    for act in OPTIONS["activation"]:
        seen.append(dict(activation=act))
    seen.append(dict(tie_embeddings=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm="layernorm"))
    seen.append(dict(n_kv_heads=1))  # multi-query
    seen.append(dict(n_kv_heads=4))  # multi-head
    seen.append(dict(head_dim=16))  # head_dim * n_heads != d_model
    seen.append(dict(dropout=0.1))
    seen.append(dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_context_length": 16}))
    seen.append(dict(norm="layernorm", norm_bias=False))
    return seen


@pytest.mark.parametrize("changes", variants(), ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_option_runs_forward_and_backward(changes):
    torch.manual_seed(0)
    cfg = tiny_config(**changes)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, cfg.vocab_size)  # (B, T, V)
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("changes", variants()[:16], ids=str)
def test_causality(changes):
    torch.manual_seed(0)
    cfg = tiny_config(**changes, dropout=0.0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % cfg.vocab_size
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :6], b[:, :6])  # positions <= 5 never see token 6
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=400)
    model = Transformer(cfg)
    ids = torch.randint(0, 400, (4, 32))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - math.log(400)) < 0.3


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    cfg = tiny_config(d_model=256, d_mlp=512, n_layers=8, n_heads=4, n_kv_heads=4)
    model = Transformer(cfg)
    std_q = model.blocks[0].attention.q.weight.std().item()
    std_o = model.blocks[0].attention.o.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / math.sqrt(16)) < 0.001


def test_tied_embeddings_share_storage():
    model = Transformer(tiny_config(tie_embeddings=True))
    assert model.unembedding.weight is model.token_embedding.weight
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.unembedding.weight is not untied.token_embedding.weight


def test_ignore_index_masks_positions():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    ids = torch.randint(0, 400, (2, 8))
    targets = torch.randint(0, 400, (2, 8))
    masked = targets.clone()
    masked[:, :4] = -100
    full = model.loss(ids, targets, reduction="none").view(2, 8)
    partial = model.loss(ids, masked)
    assert torch.allclose(partial, full[:, 4:].mean())
    # gradient through a masked position's target is zero: changing it changes nothing
    other = masked.clone()
    assert torch.equal(model.loss(ids, other), partial)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cache_equals_no_cache(position, kv_heads):
    torch.manual_seed(0)
    cfg = tiny_config(position=position, n_kv_heads=kv_heads)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(ids)
    cache = KVCache(cfg, batch_size=2, max_length=32)
    pieces = [model(ids[:, :7], cache=cache)]
    for t in range(7, 15):
        pieces.append(model(ids[:, t : t + 1], cache=cache))
    pieces.append(model(ids[:, 15:], cache=cache))  # a multi-token chunk after the cache holds some
    assert cache.length == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_cache_stores_only_kv_heads():
    cfg = tiny_config(n_heads=4, n_kv_heads=1)
    cache = KVCache(cfg, batch_size=3, max_length=16)
    assert cache.keys.shape == (cfg.n_layers, 3, 1, 16, cfg.head_dim)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_left_padded_batch_equals_rows_alone(position):
    torch.manual_seed(0)
    cfg = tiny_config(position=position)
    model = Transformer(cfg).eval()
    short = torch.randint(3, cfg.vocab_size, (1, 5))
    long = torch.randint(3, cfg.vocab_size, (1, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 4:] = short
    batch[1] = long
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1] = 1
    out = model(batch, attention_mask=mask)
    assert torch.allclose(out[0, 4:], model(short)[0], atol=1e-5)
    assert torch.allclose(out[1], model(long)[0], atol=1e-5)


def test_context_overflow_is_a_clear_error():
    cfg = tiny_config(context_length=16)
    model = Transformer(cfg)
    with pytest.raises(ContextOverflowError, match="17 tokens exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_llama3_rope_scaling_matches_reference_formula():
    cfg = tiny_config(
        head_dim=16, rope_theta=500000.0,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_context_length": 32},
    )
    inv = rope_inverse_frequencies(cfg)
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    for got, freq in zip(inv.tolist(), base.tolist()):
        wavelen = 2 * math.pi / freq
        if wavelen < 32 / 4:
            want = freq
        elif wavelen > 32 / 1:
            want = freq / 8
        else:
            smooth = (32 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * freq / 8 + smooth * freq
        assert got == pytest.approx(want, rel=1e-6)


def test_meta_device_build_has_no_storage():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("gpt2-124m"))
    assert all(p.is_meta for p in model.parameters())
