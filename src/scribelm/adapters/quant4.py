"""QLoRA's frozen base: every linear layer and embedding of a model held in 4 bits.

The 4-bit formats (nf4, sym4) and the layers that compute with them (gradients
flow through them to earlier adapters) live with the other kernels in
`scribelm.accel.fourbit`; this module swaps them into a model before LoRA
adapters go on top, and re-exports them for adapters users.
"""

from __future__ import annotations

import torch
from torch import nn

from scribelm.accel.fourbit import (
    FORMATS,
    NF4_LEVELS,
    SYM4_LEVELS,
    Embedding4bit,
    Linear4bit,
    Quantized4bit,
    QuantizationError,
    dequantize_4bit,
    dequantize_model,
    quantize_4bit,
    storage_bytes,
)
from scribelm.adapters.lora import LoRALinear

__all__ = [  # the 4-bit layers too, where adapters users import them
    "FORMATS", "NF4_LEVELS", "SYM4_LEVELS", "Embedding4bit", "Linear4bit", "Quantized4bit", "QuantizationError",
    "dequantize_4bit", "dequantize_model", "quantize_4bit", "quantize_base", "storage_bytes",
]


def quantize_base(model: nn.Module, kind: str = "nf4", group_size: int = 64,
                  compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear and nn.Embedding of `model` with its frozen 4-bit version, in place.

    A tied embedding/unembedding pair is stored once. Norm weights (tiny) stay
    as they are. Activations run in `compute_dtype` (default: the model's dtype).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise QuantizationError("quantize the base before adding LoRA adapters, so the adapters stay in full precision")
    dtype = compute_dtype or next(model.parameters()).dtype
    shared: dict[int, Quantized4bit] = {}

    def quantized_of(weight: torch.Tensor) -> Quantized4bit:
        key = id(weight)
        if key not in shared:
            shared[key] = Quantized4bit(weight, kind, group_size)
        return shared[key]

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Embedding):
            setattr(parent, child, Embedding4bit(quantized_of(module.weight), dtype))
        else:
            setattr(parent, child, Linear4bit(quantized_of(module.weight), module.bias))
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(dtype) if compute_dtype is not None else None
    return model
