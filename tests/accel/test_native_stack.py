"""The decode step of the whole stack of blocks in one native call (scribelm.accel.native_stack) gives
the plain forward's numbers, takes the rows and caches it says it takes, and steps aside
for everything else."""

import copy

import pytest
import torch

import scribelm
from scribelm.accel import accelerate, native
from scribelm.generate import BatchGeneration
from scribelm.sampling import SamplingSettings
from scribelm.accel.native_stack import NativeTransformer
from scribelm.cache import KVCache
from scribelm.config import ModelConfig
from scribelm.quant import quantize_model

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels {native.status()}")


GPT2 = {"norm": "layernorm", "activation": "gelu", "position": "learned", "qkv_bias": True, "attn_out_bias": True,
        "mlp_bias": True, "n_kv_heads": 6, "tie_embeddings": True}


def _model(**changes) -> scribelm.Transformer:
    fields = dict(vocab_size=300, context_length=64, d_model=96, n_layers=2, n_heads=6, n_kv_heads=2, d_mlp=200,
                  activation="swiglu", norm="rmsnorm", position="rope", tie_embeddings=False)
    fields.update(changes)
    torch.manual_seed(0)
    return accelerate(scribelm.Transformer(ModelConfig(**fields))).eval()


@pytest.fixture
def native_steps(monkeypatch):
    """Counts the steps the native layer took; `plain()` turns it off."""
    taken = []
    real = NativeTransformer._decode_step

    def counting(self, *args):
        y = real(self, *args)
        taken.append(y is not None)
        return y

    monkeypatch.setattr(NativeTransformer, "_decode_step", counting)

    class Steps:
        def __init__(self):
            self.taken = taken

        def plain(self):
            monkeypatch.setattr(NativeTransformer, "_decode_step", lambda self, *a: None)

    return Steps()


def _decode(model, rows_differ: bool, steps: int = 5) -> torch.Tensor:
    """Logits of a few decode steps over 3 rows (of different lengths, or one length)."""
    config = model.config
    with torch.inference_mode():
        cache = KVCache(config, 3, 40)
        lengths = [5, 9, 7] if rows_differ else [6, 6, 6]
        for b, length in enumerate(lengths):
            model(torch.arange(1, length + 1)[None] + b, cache=cache.rows(b, 1))
            cache.set_length(b, length)
        out = [model(torch.tensor([[11 + s], [12], [13 + 2 * s]]), cache=cache, last_only=True) for s in range(steps)]
    return torch.cat(out)


@pytest.mark.parametrize("rows_differ", [False, True])
@pytest.mark.parametrize("changes", [
    {},
    {"qkv_bias": True, "mlp_bias": True, "attn_out_bias": True},
    {"n_kv_heads": 6},
    {"position": "learned", "attention_scale": 0.3},
    {"d_model": 72, "n_heads": 4, "n_kv_heads": 1, "d_mlp": 100},  # widths that are no multiple of the vector
    GPT2,
    dict(GPT2, activation="gelu_tanh", norm_bias=False, n_kv_heads=2),
])
def test_float32_steps_equal_the_plain_forward(native_steps, changes, rows_differ):
    model = _model(**changes)
    fast = _decode(model, rows_differ)
    assert native_steps.taken and all(native_steps.taken)
    native_steps.plain()
    torch.testing.assert_close(fast, _decode(model, rows_differ), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, rows_differ", [(8, False), (8, True)])
def test_int8_steps_equal_the_plain_forward(native_steps, bits, rows_differ):
    model = quantize_model(_model(qkv_bias=True), bits)
    fast = _decode(model, rows_differ)
    assert all(native_steps.taken)
    native_steps.plain()
    torch.testing.assert_close(fast, _decode(model, rows_differ), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows_differ", [False, True])
@pytest.mark.parametrize("shape", [{"qkv_bias": True}, GPT2])
def test_bfloat16_steps_are_as_close_to_float32_as_pytorchs(native_steps, rows_differ, shape):
    """Rounding where PyTorch's bfloat16 operations round, the native layers land as close to the
    float32 model as PyTorch's own bfloat16 forward does (not bit for bit: sums run in other orders)."""
    exact = _model(**shape)
    model = accelerate(copy.deepcopy(exact).to(torch.bfloat16))

    def decode(model, dtype):
        with torch.inference_mode():
            cache = KVCache(model.config, 3, 40, dtype=dtype)
            lengths = [5, 9, 7] if rows_differ else [6, 6, 6]
            for b, length in enumerate(lengths):
                model(torch.arange(1, length + 1)[None] + b, cache=cache.rows(b, 1))
                cache.set_length(b, length)
            steps = [model(torch.tensor([[11 + s], [12], [13 + 2 * s]]), cache=cache, last_only=True) for s in range(5)]
        return torch.cat(steps).float()

    fast = decode(model, torch.bfloat16)
    assert all(native_steps.taken)
    native_steps.plain()
    plain, reference = decode(model, torch.bfloat16), decode(exact, torch.float32)
    assert (fast - reference).abs().mean() <= 1.25 * (plain - reference).abs().mean()
    assert (fast - plain).abs().max() < 0.05 * reference.abs().max()


def test_int4_takes_one_row_as_its_own_kernel_does(native_steps):
    model = quantize_model(_model(d_mlp=192), 4, 32)
    _decode(model, rows_differ=False)
    assert not any(native_steps.taken)  # three rows: the int4 layers' packed kernel, as without the native layer
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 40)
        model(torch.arange(1, 8)[None], cache=cache)
        fast = torch.cat([model(torch.tensor([[5 + s]]), cache=cache, last_only=True) for s in range(4)])
    assert all(native_steps.taken[-4:])
    native_steps.plain()
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 40)
        model(torch.arange(1, 8)[None], cache=cache)
        plain = torch.cat([model(torch.tensor([[5 + s]]), cache=cache, last_only=True) for s in range(4)])
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_small_blocks_take_many_rows_large_ones_few(native_steps):
    """Past 8 rows only a block whose arithmetic is cheaper than dispatching its operations runs natively."""
    small, large = _model(), _model(d_model=512, n_heads=8, n_kv_heads=4, d_mlp=2048)

    ids = torch.randint(1, 300, (32, 5), generator=torch.Generator().manual_seed(0))

    def step(model, rows):
        with torch.inference_mode():
            cache = KVCache(model.config, rows, 16)
            model(ids[:rows, :4], cache=cache)
            return model(ids[:rows, 4:], cache=cache, last_only=True)

    fast = step(small, 32)
    assert native_steps.taken == [True]
    step(large, 32)
    step(large, 8)
    assert native_steps.taken == [True, False, True]
    native_steps.plain()
    torch.testing.assert_close(fast, step(small, 32), rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_unchanged(native_steps):
    model = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    settings = SamplingSettings(temperature=0, max_new_tokens=12)
    fast = [e.token_id for events in BatchGeneration(model, None, prompts, settings) for e in events]
    assert any(native_steps.taken)
    native_steps.plain()
    assert [e.token_id for events in BatchGeneration(model, None, prompts, settings) for e in events] == fast


def test_other_cases_take_the_plain_forward(native_steps):
    model = _model()
    cache = KVCache(model.config, 1, 40)  # gradients wanted
    model(torch.arange(1, 6)[None], cache=cache)
    model(torch.tensor([[3]]), cache=cache)
    assert not any(native_steps.taken)
    with torch.inference_mode():  # several new tokens per row (prefill), and a padding mask
        cache = KVCache(model.config, 1, 40)
        model(torch.arange(1, 6)[None], cache=cache)
        model(torch.tensor([[3]]), cache=cache, attention_mask=torch.ones(1, 6))
    assert not any(native_steps.taken)


def test_an_inspected_model_is_computed_in_full():
    """Hooks see every activation (the plain forward runs), and the logits are the same."""
    from scribelm.inspect import run_with_cache

    model = _model()
    lm = scribelm.LM(model, None)
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 40)
        model(torch.arange(1, 6)[None], cache=cache)
        expected = model(torch.tensor([[3]]), cache=cache)
    logits, activations = run_with_cache(lm, torch.tensor([[1, 2, 3, 4, 5, 3]]))
    assert "blocks.1.attn.hook_pattern" in activations and "blocks.0.mlp.hook_post" in activations
    torch.testing.assert_close(logits[:, -1:], expected, rtol=1e-4, atol=1e-4)
