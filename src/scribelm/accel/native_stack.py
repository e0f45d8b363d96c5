"""The decoder stack's decode step in one native call (native/decode_layer.c).

Run as PyTorch operations, a decode step of a small model spends a good part of
its time between its matrix products: a layer is ~40 small operations (norms,
views, rotary positions, the cache write, attention for one query, the
activation, the residual additions), each dispatched from Python and each
starting with caches that the last product has just flushed. On a 2-core Xeon
a 100M-parameter model's float32 step took 17 ms, of which 13 ms were products.

`NativeTransformer` is the model's `Transformer` (same parameters, same forward)
whose `run_blocks` has one fast path: a step of a few rows (up to 8; up to 64
for small blocks, such as a policy's rollouts) of float32 or bfloat16
activations through a `KVCache`, without gradients, hooks or a graph
being captured, in a stack of Llama- or GPT-2-shaped blocks (pre-norm RMSNorm or
LayerNorm, RoPE or positions added before the blocks, grouped-query attention,
SwiGLU or a GELU MLP, biases or none) with float32, bfloat16, int8 or int4
weights. That step is one call of
`scribe_decode_layers`, which runs every layer in one parallel region of
PyTorch's threads with the same product loops as the other native kernels; all
the Python checks happen before it, together. Everything else (prefill,
training, other blocks, an inspected model) takes the plain loop over blocks.
The numbers equal the plain forward's up to float rounding: attention sums in
another order than SDPA's, and in bfloat16 the layer rounds where PyTorch's
bfloat16 operations round, so a value can land one bfloat16 step away.
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
from scribelm.accel.placement import place_weights
from scribelm.accel.quantized import NATIVE_MAX_ROWS as QUANTIZED_NATIVE_MAX_ROWS
from scribelm.accel.quantized import QuantizedLinear
from scribelm.cache import KVCache

_FLOAT32, _BFLOAT16, _INT8, _INT4 = 0, 1, 2, 3

#: Most rows one native step takes (a small block's; see `_layer`).
STACK_MAX_ROWS = 64
#: Rows × weights of a block below which its arithmetic costs less than dispatching its operations.
SMALL_BLOCK_WORK = 8_000_000
_ACTIVATIONS = (torch.float32, torch.bfloat16)


class _Matrix(ctypes.Structure):  # struct scribe_matrix
    _fields_ = [("type", ctypes.c_int32), ("unused", ctypes.c_int32), ("weight", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class _Layer(ctypes.Structure):  # struct scribe_layer
    _fields_ = [("qkv", _Matrix), ("o", _Matrix), ("gate_up", _Matrix), ("down", _Matrix),
                ("attention_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("attention_norm_bias", ctypes.c_void_p), ("mlp_norm_bias", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("d_model", ctypes.c_int64), ("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("d_mlp", ctypes.c_int64), ("bfloat16", ctypes.c_int64),
                ("layer_norm", ctypes.c_int64), ("activation", ctypes.c_int64)]


#: The feed-forward layers the native layer computes: activation -> (code, gated).
_ACTIVATION_CODES = {F.silu: (0, True), F.gelu: (1, False), plain._ACTIVATIONS["gelu_tanh"]: (2, False)}


def _plain(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return t is not None and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()


def _float32_bias(bias: torch.Tensor | None, keep: list) -> int | None:
    """The bias as the kernels add it (float32, contiguous), kept alive in `keep`."""
    if bias is None:
        return None
    if not _plain(bias, torch.float32):
        bias = bias.detach().float().contiguous()
        keep.append(bias)
    return bias.data_ptr()


def _matrix(layers: tuple[nn.Module, ...], dtype: torch.dtype, keep: list) -> _Matrix | None:
    """The layers (which read the same input, stored side by side) as one matrix the native
    layer reads with activations of `dtype`, or None when they are not of one kind it reads."""
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers):
        return None
    if type(first) is Linear:
        joined = joined_fields(layers)
        if joined is None:
            return None
        weight, bias = joined
        if not _plain(weight, dtype) or (bias is not None and bias.dtype != dtype):
            return None  # a float layer computes in its own dtype, which must be the activations'
        kind = _FLOAT32 if dtype == torch.float32 else _BFLOAT16
        return _Matrix(kind, 0, weight.data_ptr(), None, None, _float32_bias(bias, keep), weight.shape[0],
                       weight.shape[1], 0)
    if type(first) is QuantizedLinear:
        scheme = (first.bits, first.group_size, first.kernel)
        if first.kernel not in ("auto", "native") or any((l.bits, l.group_size, l.kernel) != scheme for l in layers):
            return None
        joined = first._joined_operands(layers)
        if joined is None:
            return None
        codes, scales, mins, bias = joined
        if not (codes.device.type == "cpu" and codes.is_contiguous() and scales.is_contiguous()):
            return None
        kind = _INT8 if first.bits == 8 else _INT4
        return _Matrix(kind, 0, codes.data_ptr(), scales.data_ptr(), native.pointer(mins), _float32_bias(bias, keep),
                       codes.shape[0], first.in_features, first.group_size or 0)
    return None


def _parts(block: plain.Block) -> tuple[nn.Module | None, ...]:
    """The block's norms, attention and MLP and their linear layers (read from the module
    dictionaries: this runs on every step)."""
    modules = block._modules
    attention, mlp = modules["attention"], modules["mlp"]
    a, m = attention._modules, mlp._modules
    return (modules["attention_norm"], attention, a.get("q"), a.get("k"), a.get("v"), a.get("o"), modules["mlp_norm"],
            mlp, m.get("gate"), m.get("up"), m.get("down"))


def _shape_fits(block: nn.Module) -> bool:
    """Whether the block is one the native layer computes: pre-norm, RMSNorm or LayerNorm, the
    plain attention's and MLP's forward (packed or not), SwiGLU or a GELU MLP, no cross-attention."""
    if type(block).forward is not plain.Block.forward or not block.pre_norm or hasattr(block, "cross_attention"):
        return False
    attention, mlp, norms = block.attention, block.mlp, (block.attention_norm, block.mlp_norm)
    if not (all(type(n) is FastRMSNorm for n in norms)
            or all(type(n) is nn.LayerNorm and n.weight is not None and n.normalized_shape == (n.weight.shape[0],)
                   for n in norms)):
        return False
    activation = _ACTIVATION_CODES.get(mlp.__dict__.get("activation"))
    return (norms[0].eps == norms[1].eps and type(attention).forward is plain.Attention.forward
            and type(mlp).forward is plain.MLP.forward and activation is not None
            and activation[1] == (mlp.gate is not None) and attention.n_heads % attention.n_kv_heads == 0)


def _survey(blocks) -> tuple | None:
    """One pass over the blocks: None when hooks or replaced functions watch one of them or its
    inside (scribelm.inspect); otherwise what native layers made from them depend on: every
    part and its class, and where each of its tensors lies (a plan is made again when any of
    it changes, and checks the blocks' shape then)."""
    key: list = []
    for block in blocks:
        parts = _parts(block)
        attention, mlp = parts[1], parts[7]
        if ("attend" in attention.__dict__ or "project_qkv" in attention.__dict__
                or "project_gate_up" in mlp.__dict__ or mlp.__dict__.get("activation") not in _ACTIVATION_CODES):
            return None
        for part in (block, *parts):
            if part is None:
                key.append(None)
                continue
            if part._forward_hooks or part._forward_pre_hooks:
                return None
            key.append(id(part))
            key.append(type(part))
            key.extend([None if t is None else t.data_ptr() for t in part._parameters.values()])
            key.extend([None if t is None else t.data_ptr() for t in part._buffers.values()])
    return tuple(key)


def _layer(block: plain.Block, dtype: torch.dtype, keep: list) -> tuple[_Layer | None, int]:
    """The block's weights as the native layer reads them with activations of `dtype`, and
    the most rows it takes: as many as the block's own native kernels take, so that the
    numbers stay theirs (int4's kernel takes one row; more go to PyTorch's)."""
    if not _shape_fits(block):
        return None, 0
    attention, mlp = block.attention, block.mlp
    activation, gated = _ACTIVATION_CODES[mlp.activation]
    matrices = (_matrix((attention.q, attention.k, attention.v), dtype, keep), _matrix((attention.o,), dtype, keep),
                _matrix((mlp.gate, mlp.up) if gated else (mlp.up,), dtype, keep), _matrix((mlp.down,), dtype, keep))
    norms = (block.attention_norm, block.mlp_norm)
    biases = [getattr(n, "bias", None) for n in norms]  # LayerNorm's, if it has them
    if (any(m is None for m in matrices) or not all(_plain(n.weight, dtype) for n in norms)
            or not all(b is None or _plain(b, dtype) for b in biases)):
        return None, 0
    scale = attention.scale if attention.scale is not None else 1 / math.sqrt(attention.head_dim)
    layer = _Layer(*matrices, norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), native.pointer(biases[0]),
                   native.pointer(biases[1]), norms[0].eps, scale, attention.o.out_features, attention.n_heads,
                   attention.n_kv_heads, attention.head_dim, mlp.down.in_features, int(dtype == torch.bfloat16),
                   int(type(norms[0]) is nn.LayerNorm), activation)
    # Up to NATIVE_MAX_ROWS rows the products are bound by reading the weights, where the native
    # loops are fastest. More rows make them bound by arithmetic, where oneDNN's blocked products
    # win, unless the block is so small that the ~40 operations' dispatch costs more than its
    # arithmetic (a small policy's rollouts, many rows at once): then up to STACK_MAX_ROWS.
    weights = sum(m.n * m.k for m in matrices)
    most_rows = max(NATIVE_MAX_ROWS, min(STACK_MAX_ROWS, SMALL_BLOCK_WORK // weights))
    for part in _parts(block):
        if isinstance(part, QuantizedLinear):
            most_rows = min(most_rows, QUANTIZED_NATIVE_MAX_ROWS[part.bits])
    return layer, most_rows


class NativeTransformer(plain.Transformer):
    """The model's Transformer, with a decode step of its blocks in one native call where it
    applies (see the module docstring)."""

    def run_blocks(self, x, rope, mask, is_causal, cache, memory=None):
        if (x.dtype in _ACTIVATIONS and x.shape[1] == 1 and type(cache) is KVCache and memory is None
                and not is_causal and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.shape[0] <= STACK_MAX_ROWS and not torch.compiler.is_compiling()):
            y = self._decode_step(x, rope, mask, cache)
            if y is not None:
                return y
        return super().run_blocks(x, rope, mask, is_causal, cache, memory)

    def _apply(self, fn, recurse=True):
        # .to() / .bfloat16() give the weights new storages: back into huge pages with them (placement.py);
        # storages a process shares (share_memory()) stay where they are
        result = super()._apply(fn, recurse)
        if not any(p.is_shared() for p in self.parameters()):
            place_weights(self)
        return result

    def __getstate__(self):
        state = self.__dict__.copy()  # copies and pickles leave out the raw pointers (made again on use)
        state.pop("_native_layers", None)
        return state

    def _layers(self, dtype: torch.dtype, survey: tuple) -> tuple[ctypes.Array | None, int]:
        """Every block as the native layer reads it (an array of them), and the most rows they
        take; made again when any weight has moved, a part was replaced or the dtype changed
        (`survey`: what `_survey` found)."""
        blocks = self.blocks
        key = (dtype, survey)
        kept = self.__dict__.get("_native_layers")
        if kept is not None and kept[0] == key:
            return kept[1]
        keep: list = []
        plans = [_layer(block, dtype, keep) if block.attention.layer_index == i else (None, 0)
                 for i, block in enumerate(blocks)]
        layers = None
        if plans and all(layer is not None for layer, _ in plans):
            layers = (_Layer * len(plans))(*(layer for layer, _ in plans))
        result = (layers, min((rows for _, rows in plans), default=0))
        self.__dict__["_native_layers"] = (key, result, keep)
        return result

    def _decode_step(self, x, rope, mask, cache: KVCache) -> torch.Tensor | None:
        """The blocks for one new token per row through the native layers, or None where they do not apply."""
        B = x.shape[0]
        if cache._start is not None:  # every row at one length: no mask, each writes at `start`
            if mask is not None:
                return None
            positions = torch.full((B,), cache._start, dtype=torch.int64)
        else:  # rows differ: the cache's own mask (each row sees its own keys), its write positions
            if mask is None or mask is not cache.row_mask:
                return None
            positions = cache._write[:, 0].contiguous()
        blocks = self.blocks
        if not blocks:
            return None
        head_dim = blocks[0].attention.head_dim
        if rope is not None:
            cos, sin = rope  # (B, 1, 1, hd) each
            if not (_plain(cos, x.dtype) and _plain(sin, x.dtype) and cos.shape[0] == B and cos.numel() == B * head_dim):
                return None
        lib = native.library()
        if lib is None or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        survey = _survey(blocks)
        if survey is None:
            return None
        layers, most_rows = self._layers(x.dtype, survey)
        if layers is None or B > most_rows:
            return None
        keys, values = cache.keys, cache.values  # (L, rows, n_kv, S_max, hd) each
        L, S, hd = keys.shape[0], keys.shape[3], keys.shape[4]
        if (keys.dtype != x.dtype or L < len(blocks) or keys.stride()[2:] != (S * hd, hd, 1)
                or values.stride() != keys.stride() or keys.shape[1] < B
                or any(block.attention.n_kv_heads != keys.shape[2] or block.attention.head_dim != hd for block in blocks)):
            return None
        x = x.contiguous()
        out = torch.empty_like(x)
        failed = lib.decode_layers(
            layers, len(layers), x.data_ptr(), out.data_ptr(), B,
            None if rope is None else cos.data_ptr(), None if rope is None else sin.data_ptr(),
            keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), S, positions.data_ptr(),
            torch.get_num_threads(),
        )
        if failed:
            raise MemoryError("out of memory for the native decode layers' scratch space")
        return out
