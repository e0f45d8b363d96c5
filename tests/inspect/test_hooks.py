"""Named activations: names and shapes on every family, the cache against a forward pass
written out by hand, editing (patching, ablating, steering), accelerated and quantized models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import scribelm
from scribelm.errors import ScribeError
from scribelm.inspect import hook_names, run_with_cache, run_with_hooks
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import save_tiny_hf_llama, tiny_config

FAMILIES = {
    "llama-gqa": dict(),
    "gpt2-like": dict(position="learned", norm="layernorm", activation="gelu", n_kv_heads=4, qkv_bias=True,
                      attn_out_bias=True, mlp_bias=True),
    "post-norm": dict(norm_position="post", position="sinusoidal", norm="layernorm", activation="relu", n_kv_heads=4),
}


def tiny_lm(**overrides) -> LM:
    torch.manual_seed(0)
    return LM(model=Transformer(tiny_config(**overrides)).eval(), tokenizer=None)


def expected_shapes(config, B, T):
    C, H, KV, hd, M = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_mlp
    per_suffix = {
        "attn.hook_q": (B, T, H, hd), "attn.hook_rot_q": (B, T, H, hd),
        "attn.hook_k": (B, T, KV, hd), "attn.hook_v": (B, T, KV, hd), "attn.hook_rot_k": (B, T, KV, hd),
        "attn.hook_attn_scores": (B, H, T, T), "attn.hook_pattern": (B, H, T, T), "attn.hook_z": (B, T, H, hd),
        "mlp.hook_pre": (B, T, M), "mlp.hook_post": (B, T, M),
    }
    return lambda name: per_suffix.get(name.split(".", 2)[-1], (B, T, C))


def check_names_and_shapes(lm, B=2, T=6):
    ids = torch.randint(0, lm.config.vocab_size, (B, T))
    logits, cache = run_with_cache(lm, ids)
    assert list(cache) == hook_names(lm)
    shape_of = expected_shapes(lm.config, B, T)
    for name, tensor in cache.items():
        assert tuple(tensor.shape) == shape_of(name), name
    torch.testing.assert_close(logits, lm.model(ids), atol=1e-5, rtol=1e-5)
    return cache


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_names_and_shapes_on_own_models(family):
    lm = tiny_lm(**FAMILIES[family])
    cache = check_names_and_shapes(lm)
    pre_norm, rope = lm.config.norm_position == "pre", lm.config.position == "rope"
    assert ("ln_final.hook_normalized" in cache) == pre_norm
    assert ("blocks.1.attn.hook_rot_q" in cache) == rope
    assert ("hook_pos_embed" in cache) == (lm.config.position == "learned")
    # the residual stream is one stream: what leaves a block enters the next
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    pattern = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    assert pattern.triu(1).abs().max() == 0  # causal: no query sees a later key


def test_names_and_shapes_on_imported_gpt2_and_llama(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "gpt2")
    save_tiny_hf_llama(tmp_path / "llama", vocab_size=120)
    for name in ("gpt2", "llama"):
        lm = scribelm.load(tmp_path / name)
        cache = check_names_and_shapes(lm)
        assert ("hook_pos_embed" in cache) == (name == "gpt2")
    assert cache["blocks.0.attn.hook_k"].shape[2] == 2  # Llama's grouped keys: 2 key/value heads for 4 queries


def test_cache_equals_a_forward_written_out():
    lm = tiny_lm(**FAMILIES["gpt2-like"])
    m, c = lm.model, lm.config
    with torch.no_grad():  # norms and biases away from their initial 1 and 0
        for name, param in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    ids = torch.randint(0, c.vocab_size, (2, 7))
    logits, cache = run_with_cache(lm, ids)
    B, T = ids.shape
    with torch.no_grad():
        embed = m.token_embedding.weight[ids]
        pos = m.position_embedding.weight[:T].expand(B, T, -1)
        x = embed + pos
        expect = {"hook_embed": embed, "hook_pos_embed": pos}
        for L, block in enumerate(m.blocks):
            a, mlp = block.attention, block.mlp
            normalized1 = F.layer_norm(x, (c.d_model,), eps=c.norm_eps)  # hook_normalized: before weight and bias
            ln1 = normalized1 * block.attention_norm.weight + block.attention_norm.bias
            q = (ln1 @ a.q.weight.T + a.q.bias).view(B, T, c.n_heads, c.head_dim)
            k = (ln1 @ a.k.weight.T + a.k.bias).view(B, T, c.n_heads, c.head_dim)
            v = (ln1 @ a.v.weight.T + a.v.bias).view(B, T, c.n_heads, c.head_dim)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            pattern = scores.softmax(-1)
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
            attn_out = z.reshape(B, T, -1) @ a.o.weight.T + a.o.bias
            mid = x + attn_out
            normalized2 = F.layer_norm(mid, (c.d_model,), eps=c.norm_eps)
            ln2 = normalized2 * block.mlp_norm.weight + block.mlp_norm.bias
            pre = ln2 @ mlp.up.weight.T + mlp.up.bias
            post = F.gelu(pre)
            mlp_out = post @ mlp.down.weight.T + mlp.down.bias
            x_next = mid + mlp_out
            for suffix, value in {
                "hook_resid_pre": x, "ln1.hook_normalized": normalized1, "attn.hook_q": q, "attn.hook_k": k, "attn.hook_v": v,
                "attn.hook_attn_scores": scores, "attn.hook_pattern": pattern, "attn.hook_z": z,
                "hook_attn_out": attn_out, "hook_resid_mid": mid, "ln2.hook_normalized": normalized2,
                "mlp.hook_pre": pre, "mlp.hook_post": post, "hook_mlp_out": mlp_out, "hook_resid_post": x_next,
            }.items():
                expect[f"blocks.{L}.{suffix}"] = value
            x = x_next
        expect["ln_final.hook_normalized"] = F.layer_norm(x, (c.d_model,), eps=c.norm_eps)
        final = expect["ln_final.hook_normalized"] * m.final_norm.weight + m.final_norm.bias
    assert set(expect) == set(cache)
    for name, value in expect.items():
        torch.testing.assert_close(cache[name], value, atol=2e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(logits, final @ m.unembedding.weight.T, atol=2e-5, rtol=1e-5)


def test_patching_a_head_with_itself_changes_nothing_and_ablating_it_does():
    lm = tiny_lm()
    ids = torch.randint(0, 400, (1, 8))
    name, head = "blocks.0.attn.hook_z", 2
    clean, cache = run_with_cache(lm, ids, names=[name, "blocks.0.hook_attn_out"])

    def patch_with_itself(z, hook):
        z = z.clone()
        z[:, :, head] = cache[hook.name][:, :, head]
        return z

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    assert torch.equal(run_with_hooks(lm, ids, {name: patch_with_itself}), clean)
    ablated = run_with_hooks(lm, ids, {name: ablate, "blocks.0.hook_attn_out": lambda t, hook: None})
    assert (ablated - clean).abs().max() > 1e-4
    # the ablation removes exactly that head's write into the residual stream
    o = lm.model.blocks[0].attention.o.weight  # (C, H·hd)
    hd = lm.config.head_dim
    head_write = cache[name][:, :, head] @ o[:, head * hd:(head + 1) * hd].T  # (B, T, C)
    seen = {}
    run_with_hooks(lm, ids, {name: ablate, "blocks.0.hook_attn_out": lambda t, hook: seen.setdefault("out", t)})
    torch.testing.assert_close(seen["out"], cache["blocks.0.hook_attn_out"] - head_write, atol=1e-5, rtol=1e-5)


def test_editing_the_residual_stream_between_attention_and_mlp_steers():
    lm = tiny_lm()
    ids = torch.randint(0, 400, (1, 5))
    direction = torch.randn(lm.config.d_model)
    via_mid = run_with_hooks(lm, ids, {"blocks.1.hook_resid_mid": lambda t, hook: t + direction})
    via_attn = run_with_hooks(lm, ids, {"blocks.1.hook_attn_out": lambda t, hook: t + direction})
    torch.testing.assert_close(via_mid, via_attn, atol=1e-5, rtol=1e-5)
    assert (via_mid - lm.model(ids)).abs().max() > 1e-3
    seen = {}
    run_with_hooks(lm, ids, {"blocks.1.hook_resid_mid": lambda t, hook: t + direction,
                             "blocks.1.hook_resid_post": lambda t, hook: seen.setdefault("post", t)})
    _, cache = run_with_cache(lm, ids)
    assert not torch.allclose(seen["post"], cache["blocks.1.hook_resid_post"])


def test_quantized_model_and_the_model_is_left_as_it_was(tmp_path):
    from scribelm.quant import quantize_model

    lm = tiny_lm()
    quantize_model(lm.model, bits=8)
    ids = torch.randint(0, 400, (1, 6))
    with torch.no_grad():
        before = lm.model(ids)
    logits, cache = run_with_cache(lm, ids, names=lambda n: n.endswith("hook_pattern") or n.endswith("hook_q"))
    assert sorted(cache) == ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_q", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_q"]
    torch.testing.assert_close(logits, before, atol=1e-5, rtol=1e-5)
    for module in lm.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "attend" not in module.__dict__ and "project_qkv" not in module.__dict__
    assert lm.model.blocks[0].mlp.activation is F.silu
    with pytest.raises(ScribeError, match="must return a tensor"):
        run_with_hooks(lm, ids, {"blocks.0.mlp.hook_pre": lambda t, hook: t[..., :3]})
    for module in lm.model.modules():  # removed after an error too
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_text_in_and_bad_input(tokenizer):
    torch.manual_seed(0)
    lm = LM(model=Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=16)).eval(), tokenizer=tokenizer)
    logits, cache = run_with_cache(lm, "the best of times", names=["blocks.1.hook_resid_post"])
    assert logits.shape[:2] == (1, len(tokenizer.encode("the best of times")))
    with pytest.raises(ScribeError, match="layer 2 is out of range; the model has 2 layers"):
        run_with_cache(lm, "hi", names=["blocks.2.hook_resid_post"])
    with pytest.raises(ScribeError, match="not an activation"):
        run_with_hooks(lm, "hi", {"blocks.0.hook_nonsense": lambda t, hook: None})
    with pytest.raises(ScribeError, match="more than the model's context of 16"):
        run_with_cache(lm, list(range(17)))
    with pytest.raises(ScribeError, match="vocabulary"):
        run_with_cache(lm, [tokenizer.vocab_size])


def test_replacing_a_normalized_activation_goes_through_the_norms_weight():
    lm = tiny_lm()
    ids = torch.randint(0, 400, (1, 5))
    same = run_with_hooks(lm, ids, {"blocks.0.ln2.hook_normalized": lambda t, hook: t.clone()})
    torch.testing.assert_close(same, lm.model(ids), atol=1e-5, rtol=1e-5)
    doubled = run_with_hooks(lm, ids, {"blocks.0.ln2.hook_normalized": lambda t, hook: 2 * t})
    # RMSNorm is scale-free: doubling its normalized output is doubling the MLP's input
    via_input = run_with_hooks(lm, ids, {"blocks.0.mlp.hook_pre": lambda t, hook: None,
                                         "blocks.0.ln2.hook_normalized": lambda t, hook: None})
    assert (doubled - via_input).abs().max() > 1e-4
