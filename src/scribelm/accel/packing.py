"""Layers that read the same input, multiplied by one matrix product.

oneDNN's call also costs a fixed 15-50 µs, a large share of a small product
(a 256×768 key projection moves 0.8 MB). Layers that read the same input
(q, k and v; gate and up) are therefore stored one after another in one
buffer (`pack_linears`): each keeps its own parameter, name and gradient,
but inference multiplies by all of them at once (`fused_linear`), which
turns seven products per block into four.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scribelm.accel.dense import _PLAIN_TENSORS, Linear, linear

# A layer type lists, in `packed_fields`, the tensors whose rows are its output features
# (Linear: weight and bias; QuantizedLinear: codes, scales, mins and bias). Layers of
# one type that read the same input are packed field by field.


def _packable(layers: Sequence[nn.Module]) -> bool:
    kind = type(layers[0])
    fields = getattr(kind, "packed_fields", None)
    if fields is None or not all(type(layer) is kind for layer in layers):
        return False  # a LoRA wrapper, a mix of types: each computes its own way
    if len({layer.in_features for layer in layers}) != 1:
        return False
    for field in fields:
        tensors = [getattr(layer, field) for layer in layers]
        if all(t is None for t in tensors):
            continue
        if any(t is None or type(t) not in _PLAIN_TENSORS or t.is_meta or t.dim() == 0 for t in tensors):
            return False
        if len({(t.dtype, t.device, t.shape[1:]) for t in tensors}) != 1:
            return False
    return True


def _adjacent(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the tensors are contiguous and lie one after another in one storage."""
    first = tensors[0]
    end = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != end:
            return False
        end += t.numel() * t.element_size()
    storage = first.untyped_storage()  # consecutive addresses, and all inside the first one's storage
    return storage.data_ptr() + storage.nbytes() >= end


def pack_linears(layers: Sequence[nn.Module]) -> bool:
    """Store the weights (and biases, and any other `packed_fields`) of layers that read
    the same input side by side in one buffer each, so that `fused_linear` can apply them
    with one product.

    The tensors keep their identity (optimizers holding them stay valid), names, shapes
    and values; only their storage moves. Returns whether the layers are packed; layers
    that cannot be (different dtypes, LoRA-wrapped, on the meta device) are left alone
    and `fused_linear` applies them one by one.
    """
    if not _packable(layers):
        return False
    for field in type(layers[0]).packed_fields:
        group = [getattr(layer, field) for layer in layers]
        if group[0] is not None and not _adjacent(group):
            buffer = torch.cat([t.detach().reshape(-1) for t in group])  # one flat buffer, each part in turn
            offset = 0
            for t in group:
                t.data = buffer[offset:offset + t.numel()].view(t.shape)
                offset += t.numel()
    return True


def packed_view(layers: Sequence[nn.Module], field: str) -> torch.Tensor | None:
    """The tensor `field` of all the layers as one (ΣN, ...) view of their shared buffer, if
    they are packed; None otherwise (or if the field is None)."""
    tensors = [getattr(layer, field) for layer in layers]
    if tensors[0] is None or not _adjacent(tensors):
        return None
    rows = sum(t.shape[0] for t in tensors)
    first = tensors[0].detach()
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _addresses(layers: Sequence[nn.Module], fields: Sequence[str]) -> tuple[int, ...]:
    """Where each of the layers' `fields` lies in memory now (0 for an absent one). Read
    straight from the module's dictionaries: this runs on every decoding call."""
    addresses = []
    for layer in layers:
        parameters, buffers = layer._parameters, layer._buffers
        for field in fields:
            t = parameters.get(field)
            if t is None:
                t = buffers.get(field)
            addresses.append(0 if t is None else t.data_ptr())
    return tuple(addresses)


def joined_fields(layers: Sequence[nn.Module]) -> tuple[torch.Tensor | None, ...] | None:
    """Each of the layers' `packed_fields` as one (ΣN, ...) view of its shared buffer (None
    for a field the layers do not have), or None when they are not packed side by side.

    The views are kept on the first layer with the addresses they were made from, and made
    again when any tensor has moved: a replaced tensor cannot come back at its old address,
    because the kept views hold the old memory."""
    first = layers[0]
    fields = type(first).packed_fields
    addresses = _addresses(layers, fields)
    kept = first.__dict__.get("_joined_fields")
    if kept is not None and kept[0] == addresses:
        return kept[1]
    views = tuple(packed_view(layers, field) for field in fields)
    present = [getattr(first, field) is not None for field in fields]
    joined = None if any(p and v is None for p, v in zip(present, views)) else views
    first.__dict__["_joined_fields"] = (addresses, joined)
    return joined


def _packed_operands(layers: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The (ΣN, K) weight and (ΣN,) bias covering all the float layers, if still packed."""
    if not all(type(layer) is Linear for layer in layers):
        return None
    return joined_fields(layers)  # (weight, bias)


def fused_linear(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers), as one product when the layers are packed and no
    gradient is wanted (a product over the shared buffer would not reach each parameter)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for layer in layers for p in layer.parameters())):
        return tuple(layer(x) for layer in layers)
    if torch.compiler.is_compiling():  # a compiled graph fuses on its own; packed views are found by address
        return tuple(layer(x) for layer in layers)
    operands = _packed_operands(layers)
    if operands is not None:
        outputs = linear(x, *operands)  # (..., ΣN)
        return outputs.split([layer.out_features for layer in layers], dim=-1)
    # Other layer types may join their own products (quantized layers do).
    fused_forward = getattr(type(layers[0]), "fused_forward", None)
    outputs = fused_forward(x, layers) if fused_forward is not None else None
    return outputs if outputs is not None else tuple(layer(x) for layer in layers)
