"""Logit lens, direct logit attribution and the next-token view, read off the activations."""

from __future__ import annotations

import pytest
import torch

from scribelm.errors import ScribeError
from scribelm.inspect.lens import direct_logit_attribution, layer_logits, logit_lens
from scribelm.inspect.next_token import next_token_view
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config

GPT2_LIKE = dict(position="learned", norm="layernorm", activation="gelu", n_kv_heads=4, qkv_bias=True,
                 attn_out_bias=True, mlp_bias=True, tie_embeddings=False)


def tiny_lm(**overrides) -> LM:
    torch.manual_seed(0)
    lm = LM(model=Transformer(tiny_config(init_std=0.2, **overrides)).eval(), tokenizer=None)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return lm


@pytest.mark.parametrize("overrides", [{}, GPT2_LIKE, dict(GPT2_LIKE, norm_position="post")], ids=["llama", "gpt2", "post-norm"])
def test_the_lens_at_the_last_layer_is_the_models_logits(overrides):
    lm = tiny_lm(**overrides)
    ids = torch.randint(0, 400, (2, 6))
    lens = layer_logits(lm, ids)
    assert lens.shape == (3, 2, 6, 400)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], lm.model(ids), atol=1e-5, rtol=1e-5)
        if lm.model.final_norm is not None:  # the first reading: embeddings straight to the unembedding
            torch.testing.assert_close(lens[0], lm.model.unembedding(lm.model.final_norm(lm.model.token_embedding(ids)
                                       + (lm.model.position_embedding.weight[:6] if "position" in overrides else 0))))
    reading = logit_lens(lm, ids, top_k=3)
    assert reading.layers == ["embeddings", "block 0", "block 1"]
    assert reading.target == int(lens[-1, 0, -1].argmax())
    assert reading.top_ids[-1][-1][0] == reading.target
    torch.testing.assert_close(torch.tensor(reading.target_probs), lens[:, 0].softmax(-1)[..., reading.target])


@pytest.mark.parametrize("overrides", [{}, GPT2_LIKE], ids=["llama-rmsnorm", "gpt2-layernorm"])
def test_direct_attributions_add_up_to_the_logit(overrides):
    lm = tiny_lm(**overrides)
    ids = torch.randint(0, 400, (1, 7))
    for versus in (None, 3):
        a = direct_logit_attribution(lm, ids, token=17, versus=versus, position=4)
        total = a.heads.sum() + a.mlps.sum() + a.attention_biases.sum() + a.embeddings + a.norm_bias
        assert abs(float(total) - a.logit) < 1e-4 * max(1.0, abs(a.logit))
        assert a.heads.shape == (2, 4) and a.heads.abs().max() > 0
    with torch.no_grad():
        assert a.logit == pytest.approx(float(lm.model(ids)[0, 4, 17] - lm.model(ids)[0, 4, 3]), abs=1e-5)


def test_attribution_on_a_quantized_model_adds_up_too():
    from scribelm.quant import quantize_model

    lm = tiny_lm()
    quantize_model(lm.model, bits=8, unembedding=True)
    a = direct_logit_attribution(lm, torch.randint(0, 400, (1, 5)), token=5)
    total = a.heads.sum() + a.mlps.sum() + a.attention_biases.sum() + a.embeddings + a.norm_bias
    assert abs(float(total) - a.logit) < 1e-3 * max(1.0, abs(a.logit))


def test_attribution_and_lens_refuse_what_they_cannot_do():
    with pytest.raises(ScribeError, match="pre-norm"):
        direct_logit_attribution(tiny_lm(**dict(GPT2_LIKE, norm_position="post")), [1, 2, 3], token=4)
    lm = tiny_lm()
    with pytest.raises(ScribeError, match="outside the vocabulary"):
        direct_logit_attribution(lm, [1, 2, 3], token=400)
    with pytest.raises(ScribeError, match="position 5"):
        direct_logit_attribution(lm, [1, 2, 3], token=4, position=5)


def test_next_token_view_at_several_temperatures():
    lm = tiny_lm()
    ids = torch.randint(0, 400, (1, 6))
    view = next_token_view(lm, ids, top=8, top_k=3, top_p=0.5)
    with torch.no_grad():
        probs = lm.model(ids)[0, -1].softmax(-1)
    candidates = [c["id"] for c in view["candidates"]]
    assert candidates == probs.topk(8).indices.tolist()
    by_t = {row["temperature"]: row for row in view["temperatures"]}
    assert sorted(by_t) == [0.2, 0.7, 1.0, 1.5]
    torch.testing.assert_close(torch.tensor(by_t[1.0]["probs"]), probs[candidates], atol=1e-6, rtol=1e-5)
    assert by_t[0.2]["probs"][0] > by_t[1.0]["probs"][0] > by_t[1.5]["probs"][0]  # colder is sharper
    for row in view["temperatures"]:
        assert [k["id"] for k in row["top_k"]] == candidates[:3]
        assert sum(k["prob"] for k in row["top_k"]) == pytest.approx(1.0, abs=1e-5)
        # top-p: the fewest most likely tokens reaching p = 0.5 of the tempered distribution
        tempered = (lm.model(ids)[0, -1].detach() / row["temperature"]).softmax(-1).sort(descending=True).values
        n = len(row["top_p"])
        assert tempered[:n].sum() >= 0.5 - 1e-6 and (n == 1 or tempered[:n - 1].sum() < 0.5)
    assert len(by_t[0.2]["top_p"]) <= len(by_t[1.5]["top_p"])
    with pytest.raises(ScribeError, match="temperatures"):
        next_token_view(lm, ids, temperatures=(0.0,))
