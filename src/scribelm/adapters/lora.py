"""LoRA: fine-tune a frozen model through small low-rank corrections.

Instead of updating a weight matrix W (out × in), LoRA (Hu et al. 2021)
learns two thin matrices, A (r × in) and B (out × r), and uses

    y = W x + (alpha / r) · B A dropout(x)

with r (the rank) tiny next to in and out. B starts at zero, so before any
training the wrapped model computes exactly what the base did. Only A and B
get gradients and optimizer state, and only they are saved: a few hundred
kilobytes to megabytes instead of the whole model. Merging folds the
correction into the weight once training is done, W' = W + (alpha / r) B A,
so the merged model runs at the base model's speed with identical outputs.

Which linear layers get adapters is chosen by name:

    "attention-qv"  (default)   blocks.*.attention.q, blocks.*.attention.v
    "attention"                 q, k, v, o
    "mlp"                       up, gate, down
    "all-linear"                every linear layer of the blocks (not the unembedding)
    "q,v,down" or "blocks.0.*"  comma-separated names: a plain name matches a module
                                whose name ends with it, a glob matches whole names

    model = Transformer(config)
    wrapped = apply_lora(model, LoRAConfig(rank=8, alpha=16, targets="attention"))
    ... train: only parameters named *lora_A / *lora_B require grad ...
    save_adapters(model, "my-adapter")      # adapter_model.safetensors + adapter_config.json
    merge_lora(model)                       # back to plain nn.Linear layers
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scribelm.accel import pack_projections
from scribelm.accel.fourbit import Linear4bit
from scribelm.errors import ScribeError
from scribelm.io import read_json_object

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FORMAT = "scribelm-lora"

TARGET_PRESETS: dict[str, list[str]] = {
    "attention-qv": ["attention.q", "attention.v"],
    "attention": ["attention.q", "attention.k", "attention.v", "attention.o"],
    "mlp": ["mlp.up", "mlp.gate", "mlp.down"],
    "all-linear": ["attention.q", "attention.k", "attention.v", "attention.o", "mlp.up", "mlp.gate", "mlp.down"],
}


class AdapterError(ScribeError, ValueError):
    """Adapters that do not fit a model, or an adapter directory that cannot be read."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "attention-qv"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise AdapterError(f"LoRA alpha must be positive, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patterns(self) -> list[str]:
        targets = self.targets
        if isinstance(targets, str):
            if targets in TARGET_PRESETS:
                return list(TARGET_PRESETS[targets])
            targets = [t.strip() for t in targets.split(",")]
        patterns = [t for t in targets if t]
        if not patterns:
            raise AdapterError("no LoRA targets given; use a preset (" + ", ".join(TARGET_PRESETS) + ") or module names")
        return patterns


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank correction (alpha / r) · B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # adapters train in the base's dtype, or in float32 over a 4-bit base (QLoRA's higher precision)
        device = base.scales.device if isinstance(base, Linear4bit) else base.weight.device
        dtype = torch.float32 if isinstance(base, Linear4bit) else base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))  # (out, r)
        # A as nn.Linear's default init (Kaiming-uniform), B zero: the product starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if not self.enabled:
            return y
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, the (out, in) matrix the adapter adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing base + adapter (the base is dequantized if it was 4-bit);
        of the base's own class when that is an nn.Linear (an accelerated one stays accelerated)."""
        base = self.base
        weight = base.dequantize() if isinstance(base, Linear4bit) else base.weight.detach()
        bias = base.bias
        kind = type(base) if isinstance(base, nn.Linear) else nn.Linear
        out = kind(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                   dtype=torch.float32 if isinstance(base, Linear4bit) else weight.dtype)
        with torch.no_grad():
            out.weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(out.weight.dtype))
            if bias is not None:
                out.bias.copy_(bias.detach())
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the linear layers the config's patterns select; refuses a pattern that matches nothing."""
    linear = [n for n, m in model.named_modules() if _is_linear(m) and not isinstance(m, LoRALinear)
              and not n.endswith(".base") and n != "unembedding"]
    chosen: list[str] = []
    for pattern in config.patterns():
        hits = [n for n in linear if _matches(n, pattern)]
        if not hits:
            # gate exists only in gated MLPs: a preset naming it is fine as long as something else matched
            if isinstance(config.targets, str) and config.targets in TARGET_PRESETS:
                continue
            examples = ", ".join(linear[:6]) + (" ..." if len(linear) > 6 else "")
            raise AdapterError(f"LoRA target {pattern!r} matches no linear layer; layers are named like {examples}; "
                               f"presets: {', '.join(TARGET_PRESETS)}")
        chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise AdapterError(f"LoRA targets {config.targets!r} match no linear layer of this model")
    return [n for n in linear if n in chosen]  # model order


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, wrap the target linear layers with LoRA, return their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_targets(model, config)
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout))
    model.lora_config = config  # remembered for saving
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: {'<layer>.lora_A': (r, in), '<layer>.lora_B': (out, r)}."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A"] = module.lora_A.detach().contiguous()
        state[f"{name}.lora_B"] = module.lora_B.detach().contiguous()
    return state


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the model is the base again, e.g. as a DPO reference)."""
    for module in lora_modules(model).values():
        module.enabled = enabled


def save_adapters(model: nn.Module, directory: str | os.PathLike, *, base_model: str | None = None,
                  extra: dict[str, Any] | None = None, extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (+ `extra_files`) atomically; returns the directory.

    `base_model` (a path or name) is recorded so the adapters can be merged later
    without naming the base again; `extra` adds keys to the config.
    """
    from scribelm.io import atomic_directory

    modules = lora_modules(model)
    if not modules:
        raise AdapterError("this model has no LoRA adapters to save; call apply_lora first")
    config: LoRAConfig = getattr(model, "lora_config", None) or LoRAConfig(
        rank=next(iter(modules.values())).rank, alpha=next(iter(modules.values())).alpha)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": 1,
        "rank": config.rank,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "targets": config.targets,
        "modules": sorted(modules),
        "base_model": base_model,
        "base_config": model.config.to_dict() if hasattr(model, "config") else None,
        **(extra or {}),
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(lora_state_dict(model), str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    file = directory / ADAPTER_CONFIG_FILE
    meta = read_json_object(
        file, AdapterError,
        missing=f"{directory} has no {ADAPTER_CONFIG_FILE}; give a directory written by `scribe finetune lora`",
    )
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file} is not a scribelm LoRA adapter config (no \"format\": \"{ADAPTER_FORMAT}\")")
    return meta


def read_any_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a scribelm adapter or of a peft LoRA adapter (which has "peft_type")."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AdapterError(f"no adapter directory at {directory}; give the adapter/ directory a "
                           "`scribe finetune lora` run wrote, or a peft adapter directory")
    inside = directory / "adapter"  # a fine-tuning run directory holds its result in adapter/
    hint = f" (did you mean {inside}?)" if (inside / ADAPTER_CONFIG_FILE).is_file() else ""
    meta = read_json_object(
        directory / ADAPTER_CONFIG_FILE, AdapterError,
        missing=f"{directory} has no {ADAPTER_CONFIG_FILE}; give a directory written by `scribe finetune lora`{hint}",
    )
    if "peft_type" in meta:
        return meta
    return read_adapter_config(directory)


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = Path(directory).expanduser() / ADAPTER_WEIGHTS_FILE
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, FileNotFoundError) as err:
        raise AdapterError(f"{file} is missing or corrupt ({err})") from None


def install_adapters(model: nn.Module, names: list[str], config: LoRAConfig, state: dict[str, torch.Tensor],
                     source: str | os.PathLike) -> list[str]:
    """Freeze `model`, wrap the layers `names` with LoRA and copy in state['<name>.lora_A' / '.lora_B']."""
    if lora_modules(model):
        raise AdapterError("this model already carries LoRA adapters; merge them first (merge_lora) "
                           "or load the base model again")
    modules = dict(model.named_modules())
    other = [n for n in names if n in modules and not _is_linear(modules[n])]
    if other:
        raise AdapterError(f"layer {other[0]} of this model is a {type(modules[other[0]]).__name__}, not a float or "
                           "4-bit linear layer; put the adapters on the unquantized base model")
    missing = [n for n in names if n not in modules]
    if missing:
        raise AdapterError(f"the adapters in {source} wrap layers this model does not have ({', '.join(missing[:3])}); "
                           "load them onto the base model they were trained on")
    for name in names:  # every check before the first layer is wrapped: a refusal leaves the model as it was
        layer = model.get_submodule(name)
        needed = {"lora_A": (config.rank, layer.in_features), "lora_B": (layer.out_features, config.rank)}
        for part, shape in needed.items():
            key = f"{name}.{part}"
            if key not in state:
                raise AdapterError(f"{source} lacks {key}; the adapter file is incomplete")
            if tuple(state[key].shape) != shape:
                raise AdapterError(f"adapter {key} has shape {tuple(state[key].shape)} but this model needs "
                                   f"{shape}; load it onto the base model it was trained on")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout)
        with torch.no_grad():
            module.lora_A.copy_(state[f"{name}.lora_A"].to(module.lora_A.dtype))
            module.lora_B.copy_(state[f"{name}.lora_B"].to(module.lora_B.dtype))
        _set_submodule(model, name, module)
    model.lora_config = config
    return sorted(lora_modules(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it; returns the same model, now plain."""
    for name, module in list(lora_modules(model).items()):
        _set_submodule(model, name, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    pack_projections(model)  # merged q/k/v (gate/up) side by side again, for an accelerated model's one product
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
