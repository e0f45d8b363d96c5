"""Weight-only int8 / int4 quantization: accuracy bounds, kernels, checkpoints, CLI, bad input."""

import copy
import json
import pytest
import torch
from safetensors import safe_open

import scribelm
from scribelm.accel import native
from scribelm.errors import CheckpointError
from scribelm.quant import (
    QuantizationError,
    QuantizedLinear,
    bits_per_byte,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    set_kernel,
    unpack_int4,
    weight_bytes,
)
from tests.conftest import tiny_config
from tests.trained_tiny import corpus, trained_lm

# Relative error of the logits, ||quantized - float|| / ||float||, on held-out text with the
# tiny trained model. Measured: int8 0.2%, int4 group 32 2.3%, group 64 2.7%; bounds leave room.
LOGIT_BOUNDS = {(8, None): 0.01, (4, 32): 0.06, (4, 64): 0.08}
# The int8 dynamic kernel rounds the activations to 8 bits as well, with one range per call:
# measured 1.1% when all 512 held-out tokens go through at once (one range for all of them).
DYNAMIC_BOUND = 0.02
# Bits per byte of the quantized model on held-out text, as a factor of the float model's
# (measured 1.000 for both).
BPB_FACTORS = {(8, None): 1.02, (4, 32): 1.05}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return trained_lm("llama")


@pytest.fixture(scope="module")
def held_out_ids(lm):
    ids = lm.tokenizer.encode(corpus()[1])[: 4 * 128]
    return torch.tensor(ids).view(4, 128)  # (B, T)


def quantized_copy(model, bits, group_size=None):
    return quantize_model(copy.deepcopy(model), bits, group_size)


def relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("bits, group_size, kernel", [
    (bits, group, kernel) for bits, group in LOGIT_BOUNDS for kernel in ("reference", "native", "packed", "dynamic")
    if kernel != "dynamic" or bits == 8
])
def test_quantized_logits_within_documented_bound(lm, held_out_ids, bits, group_size, kernel):
    with torch.no_grad():
        ref = lm.model(held_out_ids)
        q = quantized_copy(lm.model, bits, group_size)
        set_kernel(q, kernel)
        if kernel == "native" and native.library() is None:
            pytest.skip(f"native kernels: {native.status()}")
        out = q(held_out_ids)
    err = relative_error(out, ref)
    assert 0 < err < (DYNAMIC_BOUND if kernel == "dynamic" else LOGIT_BOUNDS[(bits, group_size)])
    # Fewer bits cost more: the bound is not vacuous.
    if bits == 4:
        with torch.no_grad():
            assert err > relative_error(quantized_copy(lm.model, 8)(held_out_ids), ref)


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32), (4, 64)])
def test_kernels_compute_the_dequantized_matmul(bits, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    layer = QuantizedLinear.from_linear(linear, bits, group_size)
    x = torch.randn(3, 5, 128)  # (B, T, K)
    exact = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    layer.kernel = "reference"
    assert torch.allclose(layer(x), exact, atol=1e-5, rtol=1e-5)
    layer.kernel = "packed"  # bfloat16 activations: ~3 significant digits
    assert relative_error(layer(x), exact) < 1e-2
    assert layer(x).shape == (3, 5, 48) and layer(x).dtype == torch.float32
    if native.library() is not None:
        layer.kernel = "native"  # float32 activations, codes widened in registers: the reference up to rounding
        with torch.no_grad():
            assert relative_error(layer(x), exact) < 1e-6
            assert layer(x).shape == (3, 5, 48) and layer(x).dtype == torch.float32
            assert relative_error(layer(x.bfloat16()), exact) < 1e-2
    if bits == 8:
        layer.kernel = "dynamic"  # activations rounded to 8 bits per call
        with torch.no_grad():
            assert relative_error(layer(x), exact) < 2e-2
            assert layer(x).shape == (3, 5, 48) and layer(x).dtype == torch.float32
            assert relative_error(layer(x.bfloat16()), exact) < 2e-2


def test_joined_int8_layers_equal_separate_ones():
    from scribelm.accel.packing import fused_linear

    torch.manual_seed(0)
    layers = [QuantizedLinear.from_linear(torch.nn.Linear(64, n, bias=True), 8, kernel="dynamic") for n in (64, 32, 32)]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        joined = fused_linear(x, layers)
        separate = [layer(x) for layer in layers]
    for a, b in zip(joined, separate):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5)
    # a changed weight is noticed: the joined copy is made again
    with torch.no_grad():
        layers[1].qweight = -layers[1].qweight
        assert torch.allclose(fused_linear(x, layers)[1], layers[1](x), atol=1e-5)


def test_dynamic_int8_decodes_close_to_the_exact_kernel(lm):
    exact = quantized_copy(lm.model, 8)
    set_kernel(exact, "reference")
    fast = quantized_copy(lm.model, 8)
    set_kernel(fast, "dynamic")
    ids = torch.tensor([lm.tokenizer.encode("And God said unto Moses")])
    caches = [scribelm.KVCache(m.config, 1, 48) for m in (exact, fast)]
    errors = []
    with torch.no_grad():
        exact(ids, cache=caches[0]), fast(ids, cache=caches[1])
        for token in lm.tokenizer.encode(" Go in unto Pharaoh, and tell him"):
            step = torch.tensor([[token]])
            ref, out = exact(step, cache=caches[0]), fast(step, cache=caches[1])
            errors.append(relative_error(out, ref))
    # One token per call, so one range per token: close to the weight-only bound.
    assert 0 < max(errors) < LOGIT_BOUNDS[(8, None)], errors


def test_int8_kernel_runs_on_unaligned_weights():
    # safetensors hands out tensors at any byte offset; the packed int8 kernel needs alignment.
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = QuantizedLinear.from_linear(linear, 8)
    buffer = torch.empty(64 * 32 + 1, dtype=torch.int8)
    layer.qweight = buffer[1:].view(32, 64).copy_(layer.qweight)
    assert layer.qweight.data_ptr() % 64 != 0
    x = torch.randn(3, 64)
    assert relative_error(layer(x), x @ layer.dequantized_weight().t()) < 1e-2


@pytest.mark.parametrize("inputs", [72, 200])
def test_int8_layers_of_any_width_run_batches(inputs):
    # PyTorch's packed int8 kernel reads inputs 16 at a time and crashed on these widths.
    layer = QuantizedLinear.from_linear(torch.nn.Linear(inputs, 96), 8)
    x = torch.randn(9, inputs)  # past the native kernel's rows
    with torch.inference_mode():
        y = layer(x)
    assert relative_error(y, x @ layer.dequantized_weight().t() + layer.bias) < 1e-5


def test_quantize_dequantize_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.rand(32, 1)  # rows of different scales
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (32,)
    assert ((dequantize_int8(q, scales) - w).abs() <= scales[:, None] / 2 + 1e-6).all()
    packed, s4, mins = quantize_int4(w, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 128) and s4.shape == (32, 4)
    codes = unpack_int4(packed)
    assert codes.max() <= 15
    assert torch.equal(codes[:, 0::2] | (codes[:, 1::2] << 4), packed)  # packing round-trips
    step = s4.float().repeat_interleave(64, dim=1)
    assert ((dequantize_int4(packed, s4, mins) - w).abs() <= step / 2 + 1e-3 * step + 1e-6).all()


def test_only_block_linears_are_quantized_and_model_shrinks(lm):
    q = quantized_copy(lm.model, 4, 32)
    kinds = {type(m).__name__ for name, m in q.named_modules() if name.startswith("blocks.") and not list(m.children())}
    assert "Linear" not in kinds and "QuantizedLinear" in kinds
    assert isinstance(q.unembedding, torch.nn.Linear)
    assert q.unembedding.weight is q.token_embedding.weight  # the tie survives
    block_bytes = lambda m: sum(t.numel() * t.element_size() for t in list(m.blocks.parameters()) + list(m.blocks.buffers()))
    assert block_bytes(q) < 0.2 * block_bytes(lm.model)  # 5 bits a weight instead of 32
    assert weight_bytes(q) < weight_bytes(lm.model)


@pytest.mark.parametrize("bits, group_size", list(BPB_FACTORS))
def test_quantized_model_still_predicts_held_out_text(lm, bits, group_size):
    held_out = corpus()[1][:4000]
    original = bits_per_byte(lm.model, lm.tokenizer, held_out)["bits_per_byte"]
    assert original < 3.5  # the model learned English (uniform over bytes would be 8 bits)
    q = quantized_copy(lm.model, bits, group_size)
    quantized = bits_per_byte(q, lm.tokenizer, held_out)["bits_per_byte"]
    assert quantized < BPB_FACTORS[(bits, group_size)] * original


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_quantized_checkpoint_saves_and_loads(tmp_path, lm, held_out_ids, bits, group_size):
    q = quantized_copy(lm.model, bits, group_size)
    scribelm.LM(q, lm.tokenizer).save(tmp_path / "q")
    lm.save(tmp_path / "float")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group_size
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.attention.q.qweight").dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert "blocks.0.attention.q.weight" not in f.keys()
    size = lambda d: (d / "model.safetensors").stat().st_size
    assert size(tmp_path / "q") < size(tmp_path / "float")
    loaded = scribelm.load(tmp_path / "q")
    assert isinstance(loaded.model.blocks[1].mlp.down, QuantizedLinear)
    assert loaded.model.quantization == q.quantization
    with torch.no_grad():
        assert torch.equal(loaded.model(held_out_ids), q(held_out_ids))
        as_bf16 = scribelm.load(tmp_path / "q", dtype=torch.bfloat16).model(held_out_ids)
    assert relative_error(as_bf16, q(held_out_ids)) < 0.05
    # A loaded quantized model refuses a second quantization.
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(loaded.model, 8)


def test_quantized_unembedding_of_a_tied_model(tmp_path, lm, held_out_ids):
    q = quantize_model(copy.deepcopy(lm.model), 8, unembedding=True)
    assert isinstance(q.unembedding, QuantizedLinear) and isinstance(q.token_embedding, torch.nn.Embedding)
    assert q.quantization["unembedding"] is True
    with torch.no_grad():
        assert relative_error(q(held_out_ids), lm.model(held_out_ids)) < LOGIT_BOUNDS[(8, None)]
    scribelm.LM(q, lm.tokenizer).save(tmp_path / "q")
    loaded = scribelm.load(tmp_path / "q").model
    assert isinstance(loaded.unembedding, QuantizedLinear) and "weight" not in dict(loaded.unembedding.named_parameters())
    with torch.no_grad():
        assert torch.equal(loaded(held_out_ids), q(held_out_ids))


def test_loaded_quantized_checkpoint_generates_like_the_original(tmp_path, lm):
    prompt = "And the LORD said unto Moses,"
    original = lm.generate(prompt, temperature=0, max_new_tokens=24)
    for bits, group_size in [(8, None), (4, 32)]:
        scribelm.LM(quantized_copy(lm.model, bits, group_size), lm.tokenizer).save(tmp_path / f"q{bits}")
        text = scribelm.load(tmp_path / f"q{bits}").generate(prompt, temperature=0, max_new_tokens=24)
        if bits == 8:
            assert text == original
        else:  # int4 may part ways later, but starts with the same words
            assert text.split()[:4] == original.split()[:4]


def test_dequantize_gives_a_float_model_with_the_same_numerics(tmp_path, lm, held_out_ids):
    from scribelm.quant import dequantize_model

    q = quantized_copy(lm.model, 4, 32)
    set_kernel(q, "reference")
    with torch.no_grad():
        expected = q(held_out_ids)
        back = dequantize_model(q)
        assert not any(isinstance(m, QuantizedLinear) for m in back.modules())
        assert torch.allclose(back(held_out_ids), expected, atol=1e-5)
    scribelm.LM(back, lm.tokenizer).save(tmp_path / "float-again")
    assert "quantization" not in json.loads((tmp_path / "float-again" / "config.json").read_text())
    with pytest.raises(QuantizationError, match="not quantized"):
        dequantize_model(back)


@pytest.mark.parametrize("kernel", ["reference", "packed", "native"])  # kernels whose rows do not affect each other
def test_quantized_model_decodes_with_the_kv_cache(lm, kernel):
    if kernel == "native" and native.library() is None:
        pytest.skip(f"native kernels: {native.status()}")
    q = quantized_copy(lm.model, 8)
    set_kernel(q, kernel)
    ids = torch.tensor([lm.tokenizer.encode("And God said unto Moses")])
    cache = scribelm.KVCache(q.config, 1, 48)
    with torch.no_grad():
        logits = q(ids, cache=cache)
        out = ids[0].tolist()
        for _ in range(16):
            out.append(int(logits[0, -1].argmax()))
            logits = q(torch.tensor([[out[-1]]]), cache=cache)
        full = q(torch.tensor([out]))
    # Incremental decoding agrees with one full pass over the same tokens.
    assert torch.allclose(logits[0, -1], full[0, -1], atol=1e-3)


# --------------------------------------------------------------------------- bad input


def test_bad_schemes_are_refused():
    torch.manual_seed(0)
    model = scribelm.Transformer(tiny_config(d_model=64, d_mlp=128))
    with pytest.raises(QuantizationError, match="supported: 8, 4"):
        quantize_model(copy.deepcopy(model), 3)
    with pytest.raises(QuantizationError, match="unsupported int4 group size 48"):
        quantize_model(copy.deepcopy(model), 4, 48)
    with pytest.raises(QuantizationError, match="a group size applies only to 4 bits"):
        quantize_model(copy.deepcopy(model), 8, 32)
    with pytest.raises(QuantizationError, match="unknown kernel"):
        quantize_model(copy.deepcopy(model), 8, kernel="fast")
    once = quantize_model(copy.deepcopy(model), 4, 32)
    with pytest.raises(QuantizationError, match=r"already quantized \(int4\)"):
        quantize_model(once, 4, 32)


def test_shapes_that_the_group_size_does_not_divide():
    model = scribelm.Transformer(tiny_config(d_model=96, n_heads=4, d_mlp=192))
    with pytest.raises(QuantizationError, match="96 inputs, which group size 64 does not divide; choose group size 32"):
        quantize_model(copy.deepcopy(model), 4, 64)
    odd = scribelm.Transformer(tiny_config(d_model=40, n_heads=4, d_mlp=80))
    with pytest.raises(QuantizationError, match="quantize to 8 bits"):
        quantize_model(odd, 4, 32)


def test_packed_kernel_refuses_shapes_it_cannot_run():
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 40), 4, 32, kernel="packed")  # 40 outputs: not 16k
    with pytest.raises(QuantizationError, match="use kernel='reference'"):
        layer(torch.randn(2, 64))
    layer.kernel = "auto"  # falls back to the reference kernel
    assert layer(torch.randn(2, 64)).shape == (2, 40)


def test_corrupt_quantization_record(tmp_path, lm):
    scribelm.LM(quantized_copy(lm.model, 8), lm.tokenizer).save(tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    data = json.loads(config_file.read_text())
    data["quantization"] = {"bits": 5}
    config_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unreadable \"quantization\" entry"):
        scribelm.load(tmp_path / "q")


# --------------------------------------------------------------------------- CLI


def scribe(capsys, *args):
    """Run the CLI in-process (importing torch once); returns (exit code, stdout, stderr)."""
    from scribelm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_quantize_reports_and_writes(tmp_path, lm, capsys):
    lm.save(tmp_path / "float")
    held_out = tmp_path / "held-out.txt"
    held_out.write_text(corpus()[1][:2000])
    code, out, err = scribe(capsys, "quantize", tmp_path / "float", "--bits", "4", "--group-size", "32",
                            "-o", tmp_path / "int4", "--eval-text", held_out, "--json")
    assert code == 0, err
    report = json.loads(out)
    expected = bits_per_byte(lm.model, lm.tokenizer, held_out.read_text())["bits_per_byte"]
    assert report["before"]["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    assert report["after"]["bits_per_byte"] < BPB_FACTORS[(4, 32)] * expected
    assert report["bytes_after"] < report["bytes_before"]
    assert scribelm.load(tmp_path / "int4").model.quantization["bits"] == 4
    code, out, err = scribe(capsys, "quantize", tmp_path / "float", "--bits", "8", "-o", tmp_path / "int8")
    assert code == 0, err
    assert "bits per byte" in out and "built-in sample" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bits", "4", "--group-size", "48"], "unsupported int4 group size 48"),
        (["--bits", "8", "--group-size", "32"], "a group size applies only to 4 bits"),
        (["--bits", "8", "--eval-text", "/nonexistent.txt"], "evaluation text not found"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, lm, extra, message, capsys):
    lm.save(tmp_path / "float")
    code, _, err = scribe(capsys, "quantize", tmp_path / "float", "-o", tmp_path / "out", *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_refuses_an_already_quantized_model(tmp_path, lm, capsys):
    scribelm.LM(quantized_copy(lm.model, 8), lm.tokenizer).save(tmp_path / "q")
    code, _, err = scribe(capsys, "quantize", tmp_path / "q", "--bits", "4", "-o", tmp_path / "qq")
    assert code == 2 and "already quantized" in err
    assert not (tmp_path / "qq").exists()


@pytest.mark.parametrize("native_on", [True, False])
def test_int8_row_does_not_depend_on_the_rest_of_its_batch(lm, monkeypatch, native_on):
    # The dynamic kernel takes one activation range per call, so "auto" keeps it to single rows
    # (it is what "auto" uses where the native kernels cannot be built).
    if not native_on:
        monkeypatch.setattr(native, "library", lambda: None)
    q = quantized_copy(lm.model, 8)
    first = torch.tensor(lm.tokenizer.encode("And God said unto Moses"))
    others = [torch.randint(0, lm.model.config.vocab_size, first.shape, generator=torch.Generator().manual_seed(s))
              for s in range(2)]
    with torch.no_grad():
        outs = [q(torch.stack([first, other]))[0] for other in others]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_native_kernel_decodes_like_the_reference(lm, bits, group_size):
    if native.library() is None:
        pytest.skip(f"native kernels: {native.status()}")
    exact, fast = quantized_copy(lm.model, bits, group_size), quantized_copy(lm.model, bits, group_size)
    set_kernel(exact, "reference")
    set_kernel(fast, "native")
    ids = torch.tensor([lm.tokenizer.encode("And God said unto Moses")])
    caches = [scribelm.KVCache(m.config, 1, 48) for m in (exact, fast)]
    with torch.no_grad():
        exact(ids, cache=caches[0]), fast(ids, cache=caches[1])
        for token in lm.tokenizer.encode(" Go in unto Pharaoh"):
            step = torch.tensor([[token]])
            assert relative_error(fast(step, cache=caches[1]), exact(step, cache=caches[0])) < 1e-5


def test_native_kernel_asked_for_where_it_cannot_run(monkeypatch):
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), 8, kernel="native")
    monkeypatch.setattr(native, "library", lambda: None)
    with torch.no_grad(), pytest.raises(QuantizationError, match="use kernel='auto'"):
        layer(torch.randn(1, 64))
    layer.kernel = "auto"  # falls back to PyTorch's kernels
    with torch.no_grad():
        assert layer(torch.randn(1, 64)).shape == (1, 32)
