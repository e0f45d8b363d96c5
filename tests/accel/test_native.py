"""scribelm.accel.native: the compiled matrix-vector kernels, against PyTorch's products."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scribelm.accel import native
from scribelm.accel.dense import NATIVE_MAX_ROWS, linear
from scribelm.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(
    native._compiler() is None, reason="no C compiler: the native kernels are off and PyTorch's are used"
)


@pytest.fixture(scope="module")
def lib():
    lib = native.library()
    assert lib is not None, native.status()
    return lib


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def error_per_magnitude(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """Largest error over the size of the sum it came from (Σ|x·w| + |b|): float32 rounding
    keeps this near 1e-7 whatever cancels."""
    magnitude = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    return ((y.double() - expected).abs() / magnitude).max().item()


# Shapes with every kind of tail: outputs not a multiple of the 8-row block, inputs not a
# multiple of the vector width, a single output, batches of rows.
SHAPES = [(1, 1, 16), (1, 37, 100), (3, 8, 768), (5, 1280, 768), (9, 13, 2048), (2, 33, 7)]


@needs_native
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_f_linear(lib, m, n, k, bias):
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    assert error_per_magnitude(native.linear_float(lib, x, w, b), x, w, b) < 1e-6


@needs_native
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_matches_dequantized_product(lib, m, n, k):
    torch.manual_seed(1)
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    q, scales = quantize_int8(w)
    assert error_per_magnitude(native.linear_int8(lib, x, q, scales, b), x, dequantize_int8(q, scales), b) < 1e-6


@needs_native
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m,n", [(1, 13), (4, 64), (9, 40)])
def test_int4_matches_dequantized_product(lib, group_size, m, n):
    torch.manual_seed(2)
    k = 2 * 128
    x, w = torch.randn(m, k), torch.randn(n, k)
    packed, scales, mins = quantize_int4(w, group_size)
    y = native.linear_int4(lib, x, packed, scales, mins, group_size, None)
    assert error_per_magnitude(y, x, dequantize_int4(packed, scales, mins), None) < 1e-6


@needs_native
def test_any_input_layout_and_thread_count(lib):
    torch.manual_seed(3)
    w = torch.randn(24, 48)
    x = torch.randn(48, 3).t()  # (3, 48), not contiguous
    expected = F.linear(x, w)
    assert relative_error(native.linear_float(lib, x, w, None), expected) < 1e-6
    assert native.linear_float(lib, x[None], w, None).shape == (1, 3, 24)  # leading dimensions kept
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = native.linear_float(lib, x, w, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, native.linear_float(lib, x, w, None))  # rows never straddle threads


@needs_native
def test_linear_sends_a_few_rows_to_the_native_kernel(lib):
    torch.manual_seed(4)
    w = torch.randn(40, 64)
    few, many = torch.randn(NATIVE_MAX_ROWS, 64), torch.randn(NATIVE_MAX_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(linear(few, w), native.linear_float(lib, few, w, None))
        assert relative_error(linear(many, w), F.linear(many, w)) < 1e-6
    w.requires_grad_(True)
    y = linear(few, w)  # a gradient is wanted: F.linear, which has a backward
    assert y.grad_fn is not None


def run_python(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@needs_native
def test_compiled_once_into_the_cache_and_loaded_after(tmp_path):
    code = "from scribelm.accel import native; native.library(); print(native.status())"
    first = run_python(code, SCRIBELM_CACHE_DIR=str(tmp_path))
    assert first.startswith("on") and str(tmp_path) in first
    built = list((tmp_path / "native").glob("matvec-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert run_python(code, SCRIBELM_CACHE_DIR=str(tmp_path)) == first
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again
    assert not [p for p in (tmp_path / "native").iterdir() if p not in built]  # no leftovers


def test_switched_off_by_environment():
    code = ("import torch; from scribelm.accel import native; from scribelm.accel.dense import linear\n"
            "assert native.library() is None\n"
            "x, w = torch.randn(1, 8), torch.randn(4, 8)\n"
            "with torch.no_grad(): assert torch.allclose(linear(x, w), x @ w.t(), atol=1e-6)\n"
            "print(native.status())")
    assert run_python(code, SCRIBELM_NATIVE="0") == "off (SCRIBELM_NATIVE=0)"


def test_no_compiler_means_pytorch_kernels(tmp_path):
    code = ("from scribelm.accel import native; print(native.library() is None, native.status())")
    out = run_python(code, CC="", PATH=str(tmp_path), SCRIBELM_CACHE_DIR=str(tmp_path))
    assert out.startswith("True off: no C compiler found")


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 100), (8, 7)])
def test_rms_norm_matches_pytorch(lib, shape):
    torch.manual_seed(5)
    x, weight = torch.randn(*shape) * 3, torch.rand(shape[-1]) + 0.5
    expected = F.rms_norm(x.double(), (shape[-1],), weight.double(), 1e-5)
    assert relative_error(native.rms_norm(lib, x, weight, 1e-5), expected) < 1e-6
    with torch.no_grad():
        from scribelm.accel.dense import rms_norm
        assert torch.equal(rms_norm(x, weight, 1e-5), native.rms_norm(lib, x, weight, 1e-5))


@needs_native
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bfloat16_weights_match_f_linear(lib, m, n, k):
    torch.manual_seed(6)
    x, w, b = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    y = native.linear_float(lib, x, w, b)
    assert y.dtype == torch.bfloat16
    # float32 sums rounded once to bfloat16: within one bfloat16 rounding (2^-8) of the exact result
    assert error_per_magnitude(y.float(), x.float(), w.float(), b.float()) < 2**-8
    with torch.no_grad():
        assert torch.equal(linear(x, w, b), y)
        assert relative_error(linear(x, w, b).float(), F.linear(x, w, b).float()) < 2e-2
