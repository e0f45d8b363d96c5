"""One checkpoint directory, written atomically, loaded without unpickling.

    my-model/
      config.json            ModelConfig (plus "format" and "format_version")
      model.safetensors      weights
      tokenizer.json         the tokenizer (Hugging Face `tokenizers` format)
      tokenizer_config.json  special tokens and chat template (Hugging Face's shape)
      generation.json        default generation settings

Writing goes through `scribelm.io.atomic_directory`: a temporary sibling
directory swapped into place only when every file is complete, so a crash
mid-save never leaves a half-written checkpoint under the final name, and a
directory holding anything scribelm did not write is never replaced. Weights are read with safetensors
(memory-mapped); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scribelm.config import ModelConfig
from scribelm.errors import CheckpointError, ConfigError
from scribelm.io import atomic_directory, read_json_object  # noqa: F401  (re-exported: older imports)

FORMAT = "scribelm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation.json"


def is_scribe_checkpoint(path: str | os.PathLike) -> bool:
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as contiguous tensors, without the tied unembedding (stored once)."""
    config = getattr(model, "config", None)
    state = {}
    for name, tensor in model.state_dict().items():
        if config is not None and config.tie_embeddings and name == "unembedding.weight":
            continue
        state[name] = tensor.detach().contiguous()
    return state


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: ModelConfig,
    tokenizer=None,
    generation: dict[str, Any] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write the checkpoint directory atomically; returns its path."""
    path = Path(path)
    with atomic_directory(path, kind="checkpoint") as tmp:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **config.to_dict()}
        if getattr(model, "quantization", None):  # weight-only quantized (scribelm.quant)
            data["quantization"] = model.quantization
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2))
        save_file(state_dict_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / GENERATION_FILE).write_text(json.dumps(generation or {}, indent=2))
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
    return path


def _read_checkpoint_json(path: Path) -> dict[str, Any]:
    data = read_json_object(
        path / CONFIG_FILE, CheckpointError, missing=f"{path} has no {CONFIG_FILE}; is it a model directory?",
        invalid_hint="; the checkpoint is corrupt, restore it from a copy",
    )
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a scribelm checkpoint (config.json has no \"format\": \"scribelm\")")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer scribelm (format {data['format_version']}); upgrade scribelm to read it"
        )
    return data


def _config_from_json(path: Path, data: dict[str, Any]) -> ModelConfig:
    fields = {k: v for k, v in data.items() if k not in ("format", "format_version", "quantization")}
    try:
        return ModelConfig.from_dict(fields)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: {err}") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    return _config_from_json(path, _read_checkpoint_json(path))


def read_quantization(path: str | os.PathLike) -> dict[str, Any] | None:
    """The "quantization" entry of a checkpoint's config.json (None for a float model)."""
    return _read_checkpoint_json(Path(path)).get("quantization")


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint's model.safetensors, memory-mapped on CPU."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); restore it from a copy") from None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build the Transformer of a checkpoint directory and fill it with its weights."""
    from scribelm.model import Transformer

    data = _read_checkpoint_json(Path(path))  # config.json, read once
    config, quantization = _config_from_json(Path(path), data), data.get("quantization")
    state = read_weights(path)
    with torch.device("meta"):
        model = Transformer(config)
    if quantization is not None:
        from scribelm.quant import QuantizationError, prepare_quantized_skeleton

        try:
            prepare_quantized_skeleton(model, quantization, set(state))
        except QuantizationError as err:
            raise CheckpointError(f"{path}: {err}") from None
    expected = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "unembedding.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"weights in {path} do not match its config.json: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"weight {name} in {path} has shape {tuple(tensor.shape)} but config.json implies {tuple(expected[name].shape)}"
            )
    if dtype is not None:  # integer codes and their scales keep their own dtypes
        from scribelm.quant import is_quantized_tensor

        state = {k: v if is_quantized_tensor(k) else v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.unembedding, torch.nn.Linear):  # (a quantized one has its own copy)
        model.unembedding.weight = model.token_embedding.weight
    return model.to(device)
