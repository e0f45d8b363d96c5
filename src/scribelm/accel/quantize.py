"""Quantize a whole model in place: swap its linear layers for `QuantizedLinear`, and back.

Every `nn.Linear` inside the transformer blocks (q, k, v, o, up, gate, down)
is replaced by a `QuantizedLinear`; the embedding stays in floating point (a
lookup reads one row per token), and so does the unembedding unless
`unembedding=True` asks for it too (it is read in full for every token, so it
matters for small models with large vocabularies; a tied unembedding then gets
its own quantized copy).

    from scribelm.quant import quantize_model
    quantize_model(lm.model, bits=4, group_size=32)   # in place
    lm.save("my-model-int4")                          # config.json records the scheme
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scribelm.accel.passes import accelerate, is_accelerated, pack_projections
from scribelm.accel.placement import place_weights
from scribelm.accel.quantized import (
    DEFAULT_GROUP_SIZE,
    KERNELS,
    QUANTIZED_TENSORS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizationError,
    QuantizedLinear,
    check_scheme,
)

def scheme_record(bits: int, group_size: int | None, unembedding: bool = False) -> dict[str, Any]:
    """What config.json records under "quantization"."""
    return {
        "method": "weight-only",
        "bits": bits,
        "group_size": group_size,
        "scheme": "int8-per-channel-symmetric" if bits == 8 else "int4-per-group-asymmetric",
        "modules": "linear layers of the transformer blocks" + (" and the unembedding" if unembedding else ""),
        "unembedding": unembedding,
    }


def quantizable_linears(model: nn.Module, unembedding: bool = True) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the transformer blocks (and the unembedding if asked), with its name."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (name.startswith("blocks.") or (unembedding and name == "unembedding"))
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    *,
    unembedding: bool = False,
    kernel: str = "auto",
) -> nn.Module:
    """Replace the block linear layers of `model` by `QuantizedLinear`, in place; returns `model`.

    unembedding: quantize the output projection too. It is read once per generated
    token like every block weight, so for small models with large vocabularies it
    is a large share of decode time; a tied unembedding gets its own quantized copy
    and the embedding (read one row per token) stays in floating point.

    bits 8: per-channel int8 (group_size must be None). bits 4: int4 with one scale and
    min per `group_size` inputs (32, 64 or 128; default 32)."""
    if getattr(model, "quantization", None):
        q = model.quantization
        raise QuantizationError(
            f"this model is already quantized (int{q['bits']}); quantize the original floating-point checkpoint instead"
        )
    if kernel not in KERNELS:
        raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if bits == 4 and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    check_scheme(bits, group_size)
    linears = quantizable_linears(model, unembedding)
    if not linears:
        raise QuantizationError("the model has no linear layers in transformer blocks to quantize")
    if bits == 4:
        bad = [(n, m.in_features) for n, m in linears if m.in_features % group_size != 0]
        if bad:
            name, width = bad[0]
            fits = [g for g in SUPPORTED_GROUP_SIZES if all(w % g == 0 for _, w in bad)]
            hint = f"choose group size {fits[0]}" if fits else "quantize to 8 bits, which has no groups"
            raise QuantizationError(
                f"layer {name} has {width} inputs, which group size {group_size} does not divide; {hint}"
            )
    with torch.no_grad():
        for name, linear in linears:
            _set_submodule(model, name, QuantizedLinear.from_linear(linear, bits, group_size, kernel))
    model.quantization = scheme_record(bits, group_size, unembedding)
    pack_projections(model)  # q/k/v and gate/up codes side by side: one product each
    if is_accelerated(model):
        place_weights(model)  # the new codes into huge pages, as accelerate placed the float weights
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every `QuantizedLinear` by an `nn.Linear` holding its dequantized weight, in place;
    returns `model` (for formats that store float weights, e.g. Hugging Face). The result
    computes what the quantized model computed with the reference kernel; the precision lost
    in quantization stays lost."""
    if not getattr(model, "quantization", None):
        raise QuantizationError("this model is not quantized; there is nothing to dequantize")
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=layer.qweight.device, dtype=dtype)
            linear.weight.copy_(layer.dequantized_weight(dtype))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
            _set_submodule(model, name, linear)
    model.quantization = None
    if is_accelerated(model):  # the new float layers get the fast path the quantized ones had
        accelerate(model)
    return model


def prepare_quantized_skeleton(model: nn.Module, record: Any, state_keys: set[str]) -> nn.Module:
    """Swap in empty `QuantizedLinear` layers where a saved state dict holds quantized
    tensors, so that the checkpoint's weights load into the right shapes."""
    if not isinstance(record, dict) or record.get("bits") not in SUPPORTED_BITS:
        raise QuantizationError(
            f"config.json has an unreadable \"quantization\" entry {record!r}; it needs \"bits\" 8 or 4"
        )
    bits, group_size = record["bits"], record.get("group_size")
    check_scheme(bits, group_size)
    device = next(model.parameters()).device
    for name, linear in quantizable_linears(model):
        if f"{name}.qweight" in state_keys:
            _set_submodule(model, name, QuantizedLinear(
                linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                bias=linear.bias is not None, device=device,
            ))
    model.quantization = dict(record)
    return model


def is_quantized_tensor(name: str) -> bool:
    return name.rpartition(".")[2] in QUANTIZED_TENSORS


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the matmul kernel of every quantized layer ('auto', 'native', 'dynamic', 'packed', 'reference')."""
    if kernel not in KERNELS:
        raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.kernel = kernel


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (a tied matrix counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
