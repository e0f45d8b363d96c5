"""Float32 / bfloat16 linear layers and RMSNorm, with the fastest CPU kernel at hand for inference.

Decoding reads every weight once per new token, so a decode step is a chain
of matrix-vector products whose speed is set by memory bandwidth. In float32
on a CPU, `torch.nn.functional.linear` goes through the BLAS library (MKL),
whose matrix-vector product here runs on one core and reaches about 13 GB/s.
Two faster paths are used where no gradient is wanted:

    native   a few rows (up to NATIVE_MAX_ROWS: decoding, small batches):
             scribelm.accel.native's C loop, compiled on first use, which streams the
             weight on every core with no set-up cost per call (about 29 GB/s
             over a whole model on two cores, near the machine's ~33 GB/s read
             bandwidth)
    oneDNN   more rows (prefill), or where the native kernels cannot be built:
             `torch.ops.mkldnn._linear_pointwise`, which reads the same plain
             (out, in) weight on every core (about 25 GB/s for decoding, and
             faster than MKL for prefill too)

Neither has a backward, so both are used only where no gradient is wanted
(`torch.no_grad`, `torch.inference_mode`, or frozen weights and inputs) and
never while tracing or exporting; training and exports keep `F.linear`. All
three differ only by float32 rounding (about 1e-6 relative). bfloat16 weights
take the native kernel too (widened to float32 in registers, accumulated in
float32, rounded to bfloat16 at the end, as oneDNN does); more rows of
bfloat16 stay with `F.linear`, which already calls oneDNN.

Layers that read the same input are multiplied together: see packing.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.accel import native
from scribelm.model import RMSNorm as PlainRMSNorm

#: Most rows (tokens × batch) a product sends to the native kernel; beyond it
#: oneDNN's blocked matrix product wins (benchmarks/decode.py, batch 8, is still native).
NATIVE_MAX_ROWS = 8

#: RMSNorm goes native for up to this many rows (one short pass over each).
NATIVE_NORM_MAX_ROWS = 64

#: Smallest weight (elements) sent to oneDNN: a product with a smaller one is bound by the
#: call's set-up (oneDNN's ~15 µs against MKL's ~3 µs), not by reading the weight.
ONEDNN_MIN_WEIGHT = 1 << 17

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()


def _capturing() -> bool:
    """True while dynamo / torch.export (and so the ONNX exporter) or TorchScript records
    the graph: they need the standard op."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def inference_on_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether these float32 (or bfloat16) CPU operands may skip PyTorch's autograd-aware
    functions: plain tensors of one dtype, no gradient wanted, no graph being captured."""
    if not (x.is_cpu and x.dtype == weight.dtype and x.dtype in _NATIVE_DTYPES):
        return False
    if type(x) not in _PLAIN_TENSORS or type(weight) not in _PLAIN_TENSORS:
        return False  # tensor subclasses (DTensor, fake tensors) keep their own dispatch
    if bias is not None and (type(bias) not in _PLAIN_TENSORS or bias.dtype != x.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not _capturing()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · weightᵀ + bias, like `F.linear`: x (..., in), weight (out, in) -> (..., out)."""
    if weight.dim() == 2 and inference_on_cpu(x, weight, bias):
        if (x.numel() <= NATIVE_MAX_ROWS * weight.shape[1] and weight.is_contiguous()
                and (bias is None or bias.is_contiguous())):
            lib = native.library()
            if lib is not None:
                return native.linear_float(lib, x, weight, bias)
        if _ONEDNN and x.dtype == torch.float32 and weight.numel() > ONEDNN_MIN_WEIGHT:  # bfloat16: F.linear is oneDNN
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dimension, float32, like `F.rms_norm`;
    a few rows without gradient go to the native kernel (one call instead of PyTorch's
    composite of several operations)."""
    if (x.numel() <= NATIVE_NORM_MAX_ROWS * weight.shape[0] and x.dtype == torch.float32
            and inference_on_cpu(x, weight, None) and weight.is_contiguous()):
        lib = native.library()
        if lib is not None:
            return native.rms_norm(lib, x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class Linear(nn.Linear):
    """`nn.Linear` whose forward is `linear` above; same parameters, same state dict.
    `accelerate` turns the model's `nn.Linear` layers into this class in place."""

    packed_fields = ("weight", "bias")  # see packing.pack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(PlainRMSNorm):
    """The model's RMSNorm, with float32 inputs computed by `rms_norm` above (one native
    call for a few rows instead of PyTorch's composite of several operations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic as the plain layer, in one operation
            return rms_norm(x, self.weight, self.eps)
        return super().forward(x)
