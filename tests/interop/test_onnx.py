"""ONNX export checked with onnxruntime: logits for several batch and sequence lengths,
incremental decoding with past key/values, quantized models, bad input."""

import copy

import numpy as np
import pytest
import torch

import scribelm
from scribelm.interop.onnx import ONNXExportError, export_onnx
from scribelm.quant import quantize_model, set_kernel
from tests.conftest import tiny_config
from tests.trained_tiny import corpus, tokenizer, trained_lm

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


pytestmark = pytest.mark.usefixtures("one_thread")


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_of(lm, batch, length):
    ids = lm.tokenizer.encode(corpus()[1])
    return torch.tensor([ids[i * 50 : i * 50 + length] for i in range(batch)])  # (B, T)


def test_onnxruntime_logits_match_for_several_lengths(tmp_path, capsys):
    from scribelm.cli import main

    lm = trained_lm("llama")  # grouped-query attention, RoPE, tied embeddings
    lm.save(tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "tiny.onnx"), "--to", "onnx"]) == 0
    assert "wrote" in capsys.readouterr().out
    path = tmp_path / "tiny.onnx"
    assert (tmp_path / "tiny.tokenizer.json").is_file()
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    for batch, length in [(1, 1), (1, 7), (3, 33), (2, 128)]:  # 128: the full context
        ids = batch_of(lm, batch, length)
        (logits,) = sess.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            expected = lm.model(ids).numpy()
        assert logits.shape == (batch, length, lm.config.vocab_size)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_incremental_decoding_with_past_key_values(tmp_path):
    lm = trained_lm("gpt2")  # learned positions, LayerNorm, biases
    path = export_onnx(lm, tmp_path / "kv.onnx", past_key_values=True)
    sess = session(path)
    c = lm.config
    ids = batch_of(lm, 2, 20)
    with torch.no_grad():
        expected = lm.model(ids).numpy()
    empty = np.zeros((c.n_layers, 2, c.n_kv_heads, 0, c.head_dim), np.float32)
    logits, keys, values = sess.run(None, {"input_ids": ids[:, :12].numpy(), "past_keys": empty, "past_values": empty})
    steps = [logits]
    for t in range(12, 20):  # one token at a time, feeding the cache back
        logits, keys, values = sess.run(None, {"input_ids": ids[:, t : t + 1].numpy(), "past_keys": keys, "past_values": values})
        steps.append(logits)
    assert keys.shape == (c.n_layers, 2, c.n_kv_heads, 20, c.head_dim)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=1e-4, rtol=0)


def test_quantized_model_exports_with_its_numerics(tmp_path):
    model = quantize_model(copy.deepcopy(trained_lm("llama").model), 4, 32)
    lm = scribelm.LM(model, tokenizer())
    path = export_onnx(lm, tmp_path / "int4.onnx")
    ids = batch_of(lm, 2, 40)
    set_kernel(model, "reference")
    with torch.no_grad():
        expected = model(ids).numpy()
    set_kernel(model, "auto")
    np.testing.assert_allclose(session(path).run(None, {"input_ids": ids.numpy()})[0], expected, atol=1e-4, rtol=0)
    assert model.blocks[0].attention.q.kernel == "auto"  # the export left the model as it was


def test_export_refuses_what_it_cannot_build(tmp_path, monkeypatch):
    lm = scribelm.LM(scribelm.Transformer(tiny_config(context_length=1)), None)
    with pytest.raises(ONNXExportError, match="context of at least 2"):
        export_onnx(lm, tmp_path / "x.onnx")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate\nlong details")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ONNXExportError, match="could not export this model: unsupported operator aten::frobnicate$"):
        export_onnx(scribelm.LM(scribelm.Transformer(tiny_config()), None), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
