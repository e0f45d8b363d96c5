"""Exporting a mixture of experts: Mixtral-style and Qwen2-MoE-style (shared expert) GGUF that llama.cpp
(llama-cpp-python) runs; ONNX refused."""

import numpy as np
import pytest
import torch

import scribelm
from scribelm.interop.gguf import GGUFExportError, export_gguf
from tests import llama_peer
from tests.conftest import tiny_config
from tests.trained_tiny import tokenizer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")


def moe_lm(**overrides):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=512, d_model=64, d_mlp=96, context_length=128, init_std=0.1, n_experts=4,
                         experts_per_token=2, d_expert=48, **overrides)
    return scribelm.LM(scribelm.Transformer(config).eval(), tokenizer())


def test_llama_cpp_runs_a_mixtral_style_export_within_1e3(tmp_path):
    lm = moe_lm()
    path = export_gguf(lm, tmp_path / "moe.gguf")
    fields = gguf.GGUFReader(str(path)).fields
    assert int(fields["llama.expert_count"].parts[-1][0]) == 4 and int(fields["llama.expert_used_count"].parts[-1][0]) == 2
    ids = lm.tokenizer.encode("In the beginning God created the heaven and the earth. And the earth was")[:40]
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0].numpy()
    theirs = llama_peer.run([llama_peer.logits(path, ids)])[0]
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_llama_cpp_runs_a_qwen2_moe_style_export_within_1e3(tmp_path, qkv_bias):
    """llama.cpp's qwen2moe graph: biased q/k/v, top-k weights not renormalised, a shared expert
    gated by sigmoid(x · w_s)."""
    lm = moe_lm(d_shared_expert=40, normalize_top_k=False, qkv_bias=qkv_bias)
    with torch.no_grad():  # make the parts llama.cpp must not drop count: biases, the shared expert's gate
        for block in lm.model.blocks:
            block.mlp.shared_expert_gate.weight.normal_(0, 0.5)
            for linear in (block.attention.q, block.attention.k, block.attention.v):
                if linear.bias is not None:
                    linear.bias.normal_(0, 0.3)
    path = export_gguf(lm, tmp_path / "qwen2moe.gguf")
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "qwen2moe"
    assert int(reader.fields["qwen2moe.expert_shared_feed_forward_length"].parts[-1][0]) == 40
    assert "blk.0.ffn_gate_inp_shexp.weight" in {t.name for t in reader.tensors}
    ids = lm.tokenizer.encode("In the beginning God created the heaven and the earth. And the earth was")[:40]
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0].numpy()
        without_shared = lm.model.__class__(lm.config.replace(d_shared_expert=0))
        without_shared.load_state_dict(lm.model.state_dict(), strict=False)
        assert np.abs(without_shared(torch.tensor([ids]))[0].numpy() - ours).max() > 1e-2  # the shared expert counts
    theirs = llama_peer.run([llama_peer.logits(path, ids)])[0]
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)


@pytest.mark.parametrize("overrides", [dict(d_shared_expert=32), dict(normalize_top_k=False),
                                       dict(d_shared_expert=32, normalize_top_k=False, rope_scaling={"type": "linear", "factor": 2.0})])
def test_other_mixtures_are_refused(tmp_path, overrides):
    with pytest.raises(GGUFExportError, match="a mixture of experts other than Mixtral's|RoPE scaling in a Qwen2-MoE"):
        export_gguf(moe_lm(**overrides), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_refuses_a_mixture_of_experts(tmp_path):
    from scribelm.interop.onnx import ONNXExportError, export_onnx

    with pytest.raises(ONNXExportError, match="does not support mixtures of experts"):
        export_onnx(moe_lm(), tmp_path / "moe.onnx")
