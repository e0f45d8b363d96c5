"""4-bit frozen weights for QLoRA: nf4 or sym4 codes with per-group scales.

QLoRA (Dettmers et al. 2023) keeps the base model in 4 bits and trains LoRA
adapters on top in higher precision: the gradient still flows through the
frozen base to earlier adapters, but the base costs a quarter of bf16.

Quantizing: the weight is cut into groups of `group_size` consecutive
values; each group is divided by its absolute maximum (its scale, kept in
float16), so it lies in [-1, 1], and each value is replaced by the index of
the nearest of 16 levels (4 bits). Two indices share a byte.

    nf4    levels at the quantiles of a normal distribution (weights are close
           to normal, so every level is used about equally: the "normal float")
    sym4   the 15 evenly spaced levels -7/7 .. 7/7 (a symmetric integer grid; runs
           before this name recorded it as "int4", which is still read as sym4)

Neither is `scribe quantize`'s int4 (asymmetric, a scale and a min per group,
formats.py), which is for inference and has no backward.

Memory: 0.5 byte per weight + 2 bytes per group of 64 = 0.53 bytes, 0.27×
bf16. Dequantizing is a table lookup times the scale.

The matmul kernel is weight-only: `Linear4bit` dequantizes its weight to the
activation dtype inside a custom autograd function and multiplies; backward
dequantizes again rather than keeping the full-precision weight alive, so
training memory stays at 4 bits per base weight. Embeddings are quantized
too (a lookup dequantizes only the rows it reads), and a tied unembedding
shares the embedding's codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.errors import ScribeError

# The 16 NF4 levels of QLoRA (normal quantiles, normalized to [-1, 1], with an exact zero).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
SYM4_LEVELS = tuple([i / 7 for i in range(-7, 8)] + [0.0])  # 15 used levels; code 15 duplicates zero
FORMATS = {"nf4": NF4_LEVELS, "sym4": SYM4_LEVELS}
#: Earlier spellings still accepted, and what they mean now.
FORMAT_ALIASES = {"int4": "sym4"}


class QuantizationError(ScribeError, ValueError):
    """A quantization setting that cannot work."""


def format_name(kind: str) -> str:
    """The name of a 4-bit format ("nf4", "sym4"), from it or an earlier spelling."""
    kind = FORMAT_ALIASES.get(kind, kind)
    if kind not in FORMATS:
        raise QuantizationError(f"unknown 4-bit format {kind!r}; choose one of {', '.join(FORMATS)}")
    return kind


def _levels(kind: str, device=None) -> torch.Tensor:
    return torch.tensor(FORMATS[format_name(kind)], dtype=torch.float32, device=device)


@torch.no_grad()
def quantize_4bit(weight: torch.Tensor, kind: str = "nf4", group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (any shape) -> (codes uint8 (ceil(n/2),), scales float16 (n_groups,))."""
    if group_size < 2 or group_size % 2:
        raise QuantizationError(f"group_size must be an even number >= 2, got {group_size}")
    levels = _levels(kind, weight.device)
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % group_size
    groups = F.pad(flat, (0, pad)).view(-1, group_size)  # (G, group)
    scales = groups.abs().amax(dim=1).to(torch.float16)  # (G,)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # an all-zero group: any scale works
    normed = groups / scales.float()[:, None]  # in [-1, 1]
    # nearest level: compare with the midpoints between sorted levels
    sorted_levels, order = levels.sort()
    midpoints = (sorted_levels[1:] + sorted_levels[:-1]) / 2
    codes = order[torch.bucketize(normed.reshape(-1), midpoints)].to(torch.uint8)  # (G·group,)
    packed = (codes[0::2] << 4) | codes[1::2]  # two codes per byte
    return packed.contiguous(), scales


def dequantize_4bit(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size | tuple[int, ...], kind: str = "nf4",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize_4bit, in `dtype`. Written into one output buffer, with
    int32 lookups, so the transient memory is about twice the dequantized matrix."""
    levels = _levels(kind, codes.device).to(dtype)
    n_groups = scales.numel()
    pairs = codes.view(n_groups, -1)  # (G, group/2): two codes per byte
    out = torch.empty(n_groups, pairs.shape[1], 2, dtype=dtype, device=codes.device)  # (G, group/2, 2)
    out[..., 0] = levels[(pairs >> 4).int()]
    out[..., 1] = levels[(pairs & 0x0F).int()]
    out = out.view(n_groups, -1).mul_(scales.to(dtype)[:, None])  # (G, group)
    n = 1
    for s in shape:
        n *= s
    return out.view(-1)[:n].view(*shape)


class _Matmul4bit(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly; backward recomputes W instead of storing it."""

    @staticmethod
    def forward(ctx, x, codes, scales, shape, kind):
        ctx.save_for_backward(codes, scales)
        ctx.shape, ctx.kind = shape, kind
        weight = dequantize_4bit(codes, scales, shape, kind, x.dtype)  # (out, in)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        codes, scales = ctx.saved_tensors
        weight = dequantize_4bit(codes, scales, ctx.shape, ctx.kind, grad_out.dtype)
        return grad_out @ weight, None, None, None, None


class Quantized4bit(nn.Module):
    """A frozen 4-bit matrix (codes and scales as buffers), shared by a tied embedding and unembedding."""

    def __init__(self, weight: torch.Tensor, kind: str = "nf4", group_size: int = 64) -> None:
        super().__init__()
        codes, scales = quantize_4bit(weight, kind, group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.shape, self.kind, self.group_size = tuple(weight.shape), format_name(kind), group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_4bit(self.codes, self.scales, self.shape, self.kind, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize only the rows `index` selects (an embedding lookup). index (...) -> (..., cols)."""
        rows, cols = self.shape
        if cols % self.group_size:  # groups straddle rows: fall back to the whole matrix
            return self.dequantize(dtype)[index]
        groups_per_row = cols // self.group_size
        codes = self.codes.view(rows, cols // 2)[index]  # (..., cols/2)
        scales = self.scales.view(rows, groups_per_row)[index]  # (..., groups)
        levels = _levels(self.kind, codes.device).to(dtype)
        values = levels[torch.stack((codes >> 4, codes & 0x0F), dim=-1).long()]  # (..., cols/2, 2)
        values = values.reshape(*index.shape, groups_per_row, self.group_size) * scales.to(dtype)[..., None]
        return values.reshape(*index.shape, cols)


class Linear4bit(nn.Module):
    """A frozen linear layer with 4-bit weights; the bias (if any) stays in full precision."""

    def __init__(self, quantized: Quantized4bit, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.quantized = quantized
        self.out_features, self.in_features = quantized.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "nf4", group_size: int = 64) -> "Linear4bit":
        return cls(Quantized4bit(linear.weight, kind, group_size), linear.bias)

    @property
    def scales(self) -> torch.Tensor:
        return self.quantized.scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized
        y = _Matmul4bit.apply(x, q.codes, q.scales, q.shape, q.kind)  # (..., out)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quantized.kind}, group={self.quantized.group_size}"


class Embedding4bit(nn.Module):
    """A frozen embedding table with 4-bit rows."""

    def __init__(self, quantized: Quantized4bit, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.quantized = quantized
        self.num_embeddings, self.embedding_dim = quantized.shape
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantized.rows(ids, self.dtype)  # (B, T, C)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Turn every 4-bit layer back into nn.Linear / nn.Embedding (ties kept), in place."""
    made: dict[int, nn.Parameter] = {}
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, (Linear4bit, Embedding4bit))]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        key = id(module.quantized)
        if key not in made:
            made[key] = nn.Parameter(module.quantized.dequantize(dtype))
        if isinstance(module, Embedding4bit):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, device=made[key].device, dtype=dtype)
        else:
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=made[key].device, dtype=dtype)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(dtype))
        new.weight = made[key]
        setattr(parent, child, new)
    return model


def storage_bytes(model: nn.Module, *, frozen_only: bool = False) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once (ties, shared codes)."""
    seen: set[int] = set()
    total = 0
    tensors = [p for p in model.parameters() if not (frozen_only and p.requires_grad)] + list(model.buffers())
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
