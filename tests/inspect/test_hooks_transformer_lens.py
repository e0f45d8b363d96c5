"""Parity with TransformerLens: one random GPT-2 directory loaded by both, the same activations
under the same names, and the same activation-patching result."""

from __future__ import annotations

import pytest
import torch

import scribelm
from scribelm.inspect import run_with_cache, run_with_hooks

bridge_module = pytest.importorskip("transformer_lens.model_bridge", reason="parity needs transformer-lens")

COUNTERPARTS = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"] + [
    f"blocks.{L}.{suffix}"
    for L in range(2)
    for suffix in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                   "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
                   "ln1.hook_normalized", "ln2.hook_normalized")
]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=200, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                        initializer_range=0.2)  # sharp attention, so that one head matters
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # give the norms and biases values, so that folding them wrongly would show
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    bridge = bridge_module.TransformerBridge.boot_transformers(str(directory), device="cpu")
    return scribelm.load(directory), bridge


def test_every_counterpart_activation_agrees(both):
    lm, bridge = both
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, cache = run_with_cache(lm, ids)
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(ids)
    for name in COUNTERPARTS:
        torch.testing.assert_close(cache[name], tl_cache[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=1e-5)


def test_activation_patching_gives_the_same_logit_difference(both):
    lm, bridge = both
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 200, (1, 8), generator=generator)
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 7) % 200
    answer, wrong = 11, 42
    name, head = "blocks.1.attn.hook_z", 1

    def logit_difference(logits):
        return (logits[0, -1, answer] - logits[0, -1, wrong]).item()

    _, clean_cache = run_with_cache(lm, clean, names=[name])
    with torch.no_grad():
        _, tl_clean_cache = bridge.run_with_cache(clean)

    def patch_from(source):
        def patch(z, hook):
            z = z.clone()
            z[:, :, head] = source[name][:, :, head]  # (the bridge names its hook by the o projection's input)
            return z
        return patch

    ours = logit_difference(run_with_hooks(lm, corrupted, {name: patch_from(clean_cache)}))
    with torch.no_grad():
        theirs = logit_difference(bridge.run_with_hooks(corrupted, fwd_hooks=[(name, patch_from(tl_clean_cache))]))
        unpatched = logit_difference(bridge(corrupted))
    assert abs(ours - theirs) < 1e-5
    assert abs(ours - unpatched) > 1e-2  # the patch did something
