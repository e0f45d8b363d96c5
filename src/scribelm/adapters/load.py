"""Saved adapters onto a model, in either format: scribelm's own (`scribe finetune lora`)
or peft's LoRA (`peft_format`). The one place that knows both, so neither imports the other."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from scribelm.adapters.lora import (
    ADAPTER_WEIGHTS_FILE, LoRAConfig, install_adapters, read_adapter_weights, read_any_adapter_config,
)
from scribelm.adapters.peft_format import load_peft_adapters


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Wrap `model` as the saved adapters say and fill them in; returns the wrapped layer names.
    Reads scribelm's adapter directories and peft's LoRA adapters (see peft_format)."""
    directory = Path(directory).expanduser()
    meta = read_any_adapter_config(directory)
    if "peft_type" in meta:
        return load_peft_adapters(model, directory, meta)
    state = read_adapter_weights(directory)
    config = LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=float(meta.get("dropout", 0.0)),
                        targets=meta["targets"])
    return install_adapters(model, meta["modules"], config, state, directory / ADAPTER_WEIGHTS_FILE)
