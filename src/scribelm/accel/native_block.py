"""A decoder block whose decode step is one native call (native/decode_layer.c).

Run as PyTorch operations, a decode step of a small model spends as long between
its matrix products as in them: a layer is ~40 small operations (norms, views,
rotary positions, the cache write, attention for one query, the activation, the
residual additions), each dispatched from Python and each starting with caches
that the last product has just flushed. On a 2-core Xeon, a 100M-parameter
model's float32 step took 17 ms, of which 13 ms was the products.

`NativeBlock` is the model's `Block` (same parameters, same forward) with one
fast path: a step of a few rows of float32 activations through a `KVCache`,
without gradients, hooks or a graph being captured, in a Llama-shaped block
(pre-norm RMSNorm, RoPE or no positions in the block, grouped-query attention,
SwiGLU), with float32, int8 or int4 weights. That step goes to
`scribe_decode_layer`, which computes the block in one parallel region of
PyTorch's threads with the same product loops as the other native kernels;
everything else (prefill, training, bfloat16, other shapes of block, an
inspected model) takes the plain forward. The numbers equal the plain forward's
up to float32 rounding (attention sums in another order than SDPA's).
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from scribelm import model as plain
from scribelm.accel import native
from scribelm.accel.dense import NATIVE_MAX_ROWS, Linear
from scribelm.accel.dense import RMSNorm as FastRMSNorm
from scribelm.accel.packing import joined_fields
from scribelm.accel.quantized import NATIVE_MAX_ROWS as QUANTIZED_NATIVE_MAX_ROWS
from scribelm.accel.quantized import QuantizedLinear
from scribelm.cache import KVCache

_FLOAT32, _INT8, _INT4 = 0, 2, 3


class _Matrix(ctypes.Structure):  # struct scribe_matrix
    _fields_ = [("type", ctypes.c_int32), ("unused", ctypes.c_int32), ("weight", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class _Layer(ctypes.Structure):  # struct scribe_layer
    _fields_ = [("qkv", _Matrix), ("o", _Matrix), ("gate_up", _Matrix), ("down", _Matrix),
                ("attention_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("d_model", ctypes.c_int64), ("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("d_mlp", ctypes.c_int64)]


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _plain_float32(t: torch.Tensor | None, optional: bool = True) -> bool:
    if t is None:
        return optional
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def _matrix(layers: tuple[nn.Module, ...]) -> _Matrix | None:
    """The layers (which read the same input, stored side by side) as one matrix the native
    layer reads, or None when they are not of one kind it reads."""
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers):
        return None
    if type(first) is Linear:
        joined = joined_fields(layers)
        if joined is None:
            return None
        weight, bias = joined
        if not (_plain_float32(weight, optional=False) and _plain_float32(bias)):
            return None
        return _Matrix(_FLOAT32, 0, weight.data_ptr(), None, None, _address(bias), weight.shape[0], weight.shape[1], 0)
    if type(first) is QuantizedLinear:
        scheme = (first.bits, first.group_size, first.kernel)
        if first.kernel not in ("auto", "native") or any((l.bits, l.group_size, l.kernel) != scheme for l in layers):
            return None
        joined = first._joined_operands(layers)
        if joined is None:
            return None
        codes, scales, mins, bias = joined
        if not (codes.device.type == "cpu" and codes.is_contiguous() and scales.is_contiguous() and _plain_float32(bias)):
            return None
        kind = _INT8 if first.bits == 8 else _INT4
        return _Matrix(kind, 0, codes.data_ptr(), scales.data_ptr(), _address(mins), _address(bias),
                       codes.shape[0], first.in_features, first.group_size or 0)
    return None


class NativeBlock(plain.Block):
    """The model's Block, with a decode step in one native call where it applies (module docstring)."""

    def forward(self, x, rope, mask, is_causal, cache, memory=None):
        if (x.dtype == torch.float32 and x.shape[1] == 1 and type(cache) is KVCache and memory is None
                and not is_causal and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.shape[0] <= NATIVE_MAX_ROWS and not torch.compiler.is_compiling()):
            y = self._decode_step(x, rope, mask, cache)
            if y is not None:
                return y
        return super().forward(x, rope, mask, is_causal, cache, memory)

    def __getstate__(self):
        state = self.__dict__.copy()  # copies and pickles leave out the raw pointers (made again on use)
        state.pop("_native_layer", None)
        return state

    # -- the fast path -------------------------------------------------------------
    def _parts(self) -> tuple[nn.Module, ...]:
        attention, mlp = self.attention, self.mlp
        return (self.attention_norm, attention, attention.q, attention.k, attention.v, attention.o,
                self.mlp_norm, mlp, mlp.gate, mlp.up, mlp.down)

    def _shape_fits(self) -> bool:
        """Whether this block is one the native layer computes: pre-norm RMSNorm, the plain
        attention's and MLP's forward (packed or not), a gated MLP, no cross-attention."""
        attention, mlp = self.attention, self.mlp
        return (self.pre_norm and not hasattr(self, "cross_attention")
                and type(self.attention_norm) is FastRMSNorm and type(self.mlp_norm) is FastRMSNorm
                and self.attention_norm.eps == self.mlp_norm.eps
                and type(attention).forward is plain.Attention.forward and type(mlp).forward is plain.MLP.forward
                and mlp.gate is not None and attention.n_heads % attention.n_kv_heads == 0)

    def _inspected(self) -> bool:
        """Whether hooks or replaced functions watch the inside of this block (scribelm.inspect)."""
        if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or "attend" in self.attention.__dict__ or "project_qkv" in self.attention.__dict__
                or "project_gate_up" in self.mlp.__dict__ or self.mlp.activation is not F.silu):
            return True
        return any(part._forward_hooks or part._forward_pre_hooks for part in self._parts())

    def _layer(self) -> tuple[_Layer | None, int]:
        """This block's weights as the native layer reads them, and the most rows it takes (as
        many as the layers' own native kernels take, so that the numbers stay theirs); made
        again when any weight has moved."""
        parts = self._parts()
        addresses = tuple(_address(t) for part in parts for t in (*part._parameters.values(), *part._buffers.values()))
        kept = self.__dict__.get("_native_layer")
        if kept is not None and kept[0] == addresses:
            return kept[1]
        layer, most_rows = None, NATIVE_MAX_ROWS
        if self._shape_fits():
            attention, mlp = self.attention, self.mlp
            matrices = (_matrix((attention.q, attention.k, attention.v)), _matrix((attention.o,)),
                        _matrix((mlp.gate, mlp.up)), _matrix((mlp.down,)))
            norms = (self.attention_norm.weight, self.mlp_norm.weight)
            if all(m is not None for m in matrices) and all(_plain_float32(w, optional=False) for w in norms):
                scale = attention.scale if attention.scale is not None else 1 / math.sqrt(attention.head_dim)
                layer = _Layer(*matrices, norms[0].data_ptr(), norms[1].data_ptr(), self.attention_norm.eps, scale,
                               attention.o.out_features, attention.n_heads, attention.n_kv_heads, attention.head_dim,
                               mlp.down.in_features)
                for part in parts:
                    if isinstance(part, QuantizedLinear):
                        most_rows = min(most_rows, QUANTIZED_NATIVE_MAX_ROWS[part.bits])
        self.__dict__["_native_layer"] = (addresses, (layer, most_rows))
        return layer, most_rows

    def _decode_step(self, x, rope, mask, cache: KVCache) -> torch.Tensor | None:
        """The block for one new token per row through the native layer, or None where it does not apply."""
        B = x.shape[0]
        if cache._start is not None:  # every row at one length: no mask, each writes at `start`
            if mask is not None:
                return None
            positions = torch.full((B,), cache._start, dtype=torch.int64)
        else:  # rows differ: the cache's own mask (each row sees its own keys), its write positions
            if mask is None or mask is not cache.row_mask:
                return None
            positions = cache._write[:, 0].contiguous()
        if rope is not None:
            cos, sin = rope  # (B, 1, 1, hd) each
            if not (_plain_float32(cos, optional=False) and _plain_float32(sin, optional=False)
                    and cos.shape[0] == B and cos.numel() == B * self.attention.head_dim):
                return None
        lib = native.library()
        if lib is None or not self._shape_fits() or self._inspected():
            return None
        layer, most_rows = self._layer()
        if layer is None or B > most_rows:
            return None
        keys, values = cache._layers[self.attention.layer_index]  # (rows, n_kv, S_max, hd) each
        S, hd = keys.shape[2], keys.shape[3]
        if (keys.dtype != torch.float32 or keys.stride()[1:] != (S * hd, hd, 1) or values.stride() != keys.stride()
                or keys.shape[0] < B or keys.shape[1] != self.attention.n_kv_heads):
            return None
        x = x.contiguous()
        out = torch.empty_like(x)
        failed = lib.decode_layer(
            ctypes.byref(layer), x.data_ptr(), out.data_ptr(), B,
            None if rope is None else cos.data_ptr(), None if rope is None else sin.data_ptr(),
            keys.data_ptr(), values.data_ptr(), keys.stride(0), S, positions.data_ptr(), torch.get_num_threads(),
        )
        if failed:
            raise MemoryError("out of memory for the native decode layer's scratch space")
        return out
