"""`QuantizedLinear`: a linear layer with int8 or int4 weights (formats.py), and its kernels.

Four kernels sit behind one interface:

    reference  dequantize on the fly in plain PyTorch: y = x · (q · scale)ᵀ,
               exact in the activations' dtype; runs on any device
    native     a few rows on CPU: scribelm.accel.native's C loops, compiled on first
               use, read the int8 / int4 codes once, widen them to float32 in
               registers and multiply by the float32 activations: the reference's
               numbers up to rounding order, at memory speed, one row at a time
               (no row depends on another)
    packed     PyTorch's CPU kernels `aten._weight_int8pack_mm` and
               `aten._weight_int4pack_mm_for_cpu`, which read the int8 / int4
               weights directly. They compute with bfloat16 activations, so
               float32 inputs are rounded to bfloat16 first (about 3 significant
               digits).
    dynamic    int8 only: PyTorch's quantized engine (fbgemm / oneDNN,
               `quantized::linear_dynamic`) multiplies the int8 weights by the
               activations rounded to 8 bits on the fly (one scale and zero
               point per call, chosen from the activations' range), with integer
               dot products; the activations stay float32 everywhere else. This
               is what llama.cpp's q8_0 does too (it rounds activations to 8 bits
               per block of 32). It keeps its own packed copy of the weights.

`kernel="auto"` (the default) picks, on CPU: `native` for up to
NATIVE_MAX_ROWS rows (decoding, small batches) where it can be built; otherwise,
for int8, `dynamic` when one row goes through the layer and `packed` for more,
because the engine takes one range for all rows of a call: a row's result would
depend on the other rows of a batch, and a long prompt's range would be set by
its most extreme token; for int4, `packed` where its shape rule holds
(out_features a multiple of 16). Elsewhere it uses the reference.
benchmarks/decode_quant.py measures the speed.

Layers that read the same input (q, k, v; gate, up) are multiplied together in
one call when they are all int8 and the dynamic kernel applies
(`QuantizedLinear.fused_forward`, used by `packing.fused_linear`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scribelm.accel import native
from scribelm.accel.dense import _capturing
from scribelm.accel.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, unpack_int4
from scribelm.accel.packing import joined_fields
from scribelm.errors import ScribeError

SUPPORTED_BITS = (8, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
KERNELS = ("auto", "native", "dynamic", "packed", "reference")
#: Most rows (tokens × batch) the native kernels take under kernel="auto", by bits; beyond
#: it PyTorch's packed kernels, which multiply many rows at once, win.
NATIVE_MAX_ROWS = {8: 8, 4: 1}
#: Most rows the int8 dynamic kernel takes under kernel="auto" (where native is unavailable):
#: one, so that a row's result never depends on the rest of its batch (the engine uses one
#: range per call).
DYNAMIC_MAX_ROWS = 1
#: Names of the tensors a quantized linear layer stores (suffixes of state-dict keys).
QUANTIZED_TENSORS = ("qweight", "scales", "mins")


class QuantizationError(ScribeError, ValueError):
    """A model or setting that cannot be quantized as asked."""


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@functools.cache
def _cpu_has_vnni() -> bool:
    """AVX-512 VNNI / AVX-VNNI multiply 8-bit pairs straight into 32-bit sums. Without
    them the engine's 16-bit intermediate sums can saturate on full-range 8-bit
    activations, so activations get one bit less range (`reduce_range`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        pass
    return False


def _dynamic_int8_available() -> bool:
    try:
        return (hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack")
                and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn")))
    except (AttributeError, RuntimeError):
        return False


_DYNAMIC_INT8 = _dynamic_int8_available()


def _prepack_dynamic_int8(qweight: torch.Tensor, scales: torch.Tensor):
    """The quantized engine's packed form of int8 rows with per-row scales (zero points 0)."""
    with warnings.catch_warnings():
        # PyTorch marks quantized tensors for a future removal; the engine still needs one as input.
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(
            qweight.contiguous(), scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(weight, None)


# --------------------------------------------------------------------------- the layer


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored in int8 (per channel) or int4 (per group)."""

    packed_fields = ("qweight", "scales", "mins", "bias")  # see packing.pack_linears

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        check_scheme(bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.kernel = bits, group_size, kernel
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
            self.mins = None
        else:
            if in_features % group_size != 0 or in_features % 2 != 0:
                raise QuantizationError(
                    f"a layer with {in_features} inputs cannot be split into int4 groups of {group_size}; "
                    f"choose a group size that divides {in_features}"
                )
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
            self.register_buffer("mins", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._packed: dict[Any, Any] = {}  # kernel-specific layouts, made on first use per device

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None, kernel: str = "auto") -> "QuantizedLinear":
        layer = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                    bias=linear.bias is not None, device=linear.weight.device, kernel=kernel)
        if bits == 8:
            layer.qweight, layer.scales = quantize_int8(linear.weight)
        else:
            layer.qweight, layer.scales, layer.mins = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) that this layer multiplies by, in floating point."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.mins, dtype)

    # -- kernels ----------------------------------------------------------------
    def _choose(self, x: torch.Tensor) -> str:
        """The kernel this call runs: 'native', 'dynamic', 'packed' or 'reference'. Checked on
        every call of every layer while decoding, so cheapest tests first."""
        kernel = self.kernel
        if kernel == "reference" or _capturing():  # a captured graph (compile, export) gets the plain operations
            return "reference"
        rows = x.numel() // self.in_features
        on_cpu = x.is_cpu and x.dtype.is_floating_point
        no_grad = not (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)))
        if kernel == "native" or (kernel == "auto" and rows <= NATIVE_MAX_ROWS[self.bits]):
            usable = on_cpu and no_grad and not _capturing()
            if usable and native.library() is not None:
                return "native"
            if kernel == "native":
                why = "runs on CPU, without gradients" if not usable else f"is {native.status()}"
                raise QuantizationError(f"the native kernel {why}; use kernel='auto'")
        if self.bits == 8 and (kernel == "dynamic" or (kernel == "auto" and rows <= DYNAMIC_MAX_ROWS)):
            if _DYNAMIC_INT8 and on_cpu and no_grad:
                return "dynamic"
            if kernel == "dynamic":
                raise QuantizationError(
                    "the dynamic int8 kernel runs on CPU, without gradients, with PyTorch's quantized engine; "
                    "use kernel='packed' or 'reference'"
                )
        return "packed" if self._use_packed(x) else "reference"

    def _cached(self, kind: str, make, tensors: tuple | None = None, stamp: Any = None):
        """A kernel's layout made from `tensors` (this layer's own by default), made once
        and made again when one of them is replaced (a move, a cast, a load) or `stamp`
        changes. In-place edits are not noticed."""
        tensors = (self.qweight, self.scales, self.mins) if tensors is None else tensors
        entry = self._packed.get(kind)
        if (entry is None or entry[1] != stamp or len(entry[0]) != len(tensors)
                or any(a is not b for a, b in zip(entry[0], tensors))):
            entry = self._packed[kind] = (tensors, stamp, make())
        return entry[2]

    def _dynamic_weight(self):
        return self._cached("dynamic", lambda: _prepack_dynamic_int8(self.qweight, self.scales))

    @staticmethod
    def fused_forward(x: torch.Tensor, layers: Sequence["QuantizedLinear"]) -> tuple[torch.Tensor, ...] | None:
        """All layers (which read the same x) in one product, or None when no joined kernel
        applies. The caller (`packing.fused_linear`) has checked that no gradient is wanted.

        native: one call over the layers' codes, scales and mins where they lie side by side
        in memory (`packing.pack_linears`, which `accelerate` applies to q/k/v and gate/up).
        dynamic: the engine's packed copy of the joined rows, kept on the first layer and
        made again when any layer's tensors are replaced."""
        first = layers[0]
        kernel = first._choose(x)
        if kernel not in ("native", "dynamic"):
            return None
        for layer in layers[1:]:
            if type(layer) is not QuantizedLinear or (layer.bits, layer.group_size, layer.kernel) != (first.bits, first.group_size, first.kernel):
                return None
        sizes = [layer.out_features for layer in layers]
        if kernel == "native":
            joined = first._joined_operands(layers)
            if joined is None:
                return None
            y = _native_product(x, first.bits, first.group_size, *joined)  # (..., ΣN) float32, bias included
            return tuple(part if part.dtype == x.dtype else part.to(x.dtype) for part in y.split(sizes, dim=-1))
        qweights, scales = [layer.qweight for layer in layers], [layer.scales for layer in layers]
        joined = first._cached(
            "dynamic-fused", lambda: _prepack_dynamic_int8(torch.cat(qweights), torch.cat(scales)),
            tensors=(*qweights, *scales),
        )
        y = _dynamic_int8_matmul(x, joined)  # (..., ΣN) float32
        parts = y.split(sizes, dim=-1)  # (..., N) each
        if any(layer.bias is not None for layer in layers):
            parts = [p if layer.bias is None else p + layer.bias.to(p.dtype) for p, layer in zip(parts, layers)]
        if x.dtype != y.dtype:
            parts = [p.to(x.dtype) for p in parts]
        return tuple(parts)

    def _use_packed(self, x: torch.Tensor) -> bool:
        if self.kernel == "reference" or x.device.type != "cpu" or not x.dtype.is_floating_point:
            return False
        if self.bits == 8:
            # PyTorch's int8 kernel reads the inputs 16 at a time: other widths crash it (SIGSEGV).
            ok = _has_op("_weight_int8pack_mm") and self.in_features % 16 == 0
        else:
            ok = _has_op("_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0
        if self.kernel == "packed" and not ok:
            raise QuantizationError(
                f"the packed int{self.bits} kernel is not available for this layer ({self.in_features} inputs, {self.out_features} outputs, "
                f"torch {torch.__version__}); use kernel='reference'"
            )
        return ok

    def _packed_int4(self) -> tuple[torch.Tensor, torch.Tensor]:
        def make():
            codes = unpack_int4(self.qweight).to(torch.int32)  # (N, K)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            # The kernel computes (q - 8) · scale + zero, so zero = min + 8 · scale.
            scales, mins = self.scales.float(), self.mins.float()
            scale_zero = torch.stack((scales, mins + 8 * scales), dim=-1)  # (N, G, 2)
            return packed, scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)

        return self._cached("int4", make)

    def _bf16_scales(self) -> torch.Tensor:
        return self._cached("int8", lambda: self.scales.to(torch.bfloat16))

    def _apply(self, fn, recurse=True):
        self._packed = {}  # a move or cast invalidates the cached layouts
        return super()._apply(fn, recurse)

    def _joined_operands(self, layers: Sequence["QuantizedLinear"]) -> tuple | None:
        """(codes, scales, mins, bias) of all the layers as views of their shared buffers, or
        None when they are not packed side by side or their scales are not in the dtype the
        native kernels read."""
        joined = joined_fields(layers)
        if joined is None or joined[1].dtype != self._scale_dtype:
            return None
        return joined

    @property
    def _scale_dtype(self) -> torch.dtype:
        """What the native kernels read: float32 scales for int8, float16 scales and mins for int4."""
        return torch.float32 if self.bits == 8 else torch.float16

    def _native_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) float32 through scribelm.accel.native, bias included."""
        operands = self._joined_operands((self,))  # this layer's own tensors, checked cheaply
        if operands is None:  # a cast changed the scales' dtype, or a tensor is not contiguous
            dtype = self._scale_dtype
            scales, mins = self._cached("native", lambda: (
                self.scales.to(dtype).contiguous(), None if self.mins is None else self.mins.to(dtype).contiguous()))
            operands = (self.qweight, scales, mins, self.bias)
        return _native_product(x, self.bits, self.group_size, *operands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._choose(x)
        if kernel == "native":
            y = self._native_matmul(x)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if kernel == "dynamic":
            y = _dynamic_int8_matmul(x, self._dynamic_weight())  # (..., N) float32
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if kernel == "packed":
            xb = x2.to(torch.bfloat16)
            if self.bits == 8:
                if self.qweight.data_ptr() % 64:
                    # The int8 kernel crashes on weights that are not 64-byte aligned, which
                    # tensors read from a safetensors file at an arbitrary offset can be.
                    self.qweight = self.qweight.clone()
                y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self._bf16_scales())
            else:
                packed, scale_zero = self._packed_int4()
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, self.group_size, scale_zero)
            y = y.to(x.dtype)
        elif self.bits == 8:
            # Scale after the matmul: one multiply per output instead of per weight.
            y = (x2 @ self.qweight.to(x.dtype).t()) * self.scales.to(x.dtype)
        else:
            y = x2 @ self.dequantized_weight(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        scheme = "int8 per-channel" if self.bits == 8 else f"int4 group {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {scheme}"


def _native_product(x: torch.Tensor, bits: int, group_size: int | None, qweight: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) float -> (..., N) float32 through scribelm.accel.native, bias included."""
    lib = native.library()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()
    x32 = x if x.dtype == torch.float32 else x.float()
    qweight = qweight if qweight.is_contiguous() else qweight.contiguous()
    if bits == 8:
        return native.linear_int8(lib, x32, qweight, scales, bias)
    return native.linear_int4(lib, x32, qweight, scales, mins, group_size, bias)


def _dynamic_int8_matmul(x: torch.Tensor, packed) -> torch.Tensor:
    """x (..., K) float -> (..., N) float32 through the quantized engine."""
    reduce_range = not _cpu_has_vnni()  # read from /proc/cpuinfo on first use, not at import
    return torch.ops.quantized.linear_dynamic(x if x.dtype == torch.float32 else x.float(), packed, reduce_range)


# --------------------------------------------------------------------------- schemes


def check_scheme(bits: int, group_size: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"cannot quantize to {bits} bits; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    if bits == 8 and group_size is not None:
        raise QuantizationError("int8 uses one scale per output channel; a group size applies only to 4 bits")
    if bits == 4 and group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(
            f"unsupported int4 group size {group_size}; choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
