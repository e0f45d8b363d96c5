"""Exporting a mixture of experts: Mixtral-style GGUF that llama.cpp (llama-cpp-python) runs; ONNX refused."""

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


@pytest.mark.parametrize("overrides", [dict(d_shared_expert=32), dict(normalize_top_k=False)])
def test_other_mixtures_are_refused(tmp_path, overrides):
    with pytest.raises(GGUFExportError, match="a mixture of experts other than Mixtral's"):
        export_gguf(moe_lm(**overrides), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_refuses_a_mixture_of_experts(tmp_path):
    from scribelm.interop.onnx import ONNXExportError, export_onnx

    with pytest.raises(ONNXExportError, match="does not support mixtures of experts"):
        export_onnx(moe_lm(), tmp_path / "moe.onnx")
