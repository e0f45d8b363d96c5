"""Inference speed, applied to a model from outside: fast layers, packed projections,
quantized weights, and the native CPU kernels they call.

    passes.py      accelerate(model): swap plain layers for the fast ones below, in place
    dense.py       float32 / bfloat16 linear and RMSNorm on native / oneDNN kernels
    packing.py     q/k/v and gate/up side by side in memory, applied by one product
    placement.py   a CPU model's weights in huge pages (faster to stream)
    formats.py     the int8 and int4 weight formats of `scribe quantize`
    quantized.py   QuantizedLinear and its kernels (native, dynamic, packed, reference)
    quantize.py    quantize_model / dequantize_model: swap a model's linears, and back
    fourbit.py     QLoRA's frozen 4-bit formats (nf4, sym4), trainable through
    native/        the C matrix-vector kernels, compiled on first use

This package is the only place that imports `native`; `model.py` knows nothing of it.
"""

from scribelm.accel.passes import accelerate, is_accelerated, pack_projections

__all__ = ["accelerate", "is_accelerated", "pack_projections", "native_status"]


def native_status() -> str:
    """Whether the native CPU kernels are in use, and why not if they are not (builds them
    on first call)."""
    from scribelm.accel import native

    return "on" if native.library() is not None else native.status()
