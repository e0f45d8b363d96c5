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

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from scribelm.config import ModelConfig
from scribelm.errors import CheckpointError, ConfigError
from scribelm.io import atomic_directory, read_json_object

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
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError):
        return False  # the loader that reads it next says what is wrong


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as contiguous tensors, each stored once: a tied unembedding, or an encoder-decoder's
    shared embedding, under the first name it has."""
    state: dict[str, torch.Tensor] = {}
    seen: list[torch.Tensor] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(tensor is other for other in seen):
            continue
        seen.append(tensor)
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
    version = data.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{path / CONFIG_FILE}: \"format_version\" must be an integer, got {version!r}; "
            "the checkpoint is corrupt, restore it from a copy"
        )
    if version > FORMAT_VERSION:
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


def read_generation(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's generation.json ({} when absent), checked: every sampling setting it
    holds must be one `SamplingSettings` accepts, so a bad value is named at load time
    rather than failing the first request that uses it."""
    file = Path(path) / GENERATION_FILE
    if not file.is_file():
        return {}
    generation = read_json_object(file, CheckpointError, missing=f"{file} is missing",
                                  invalid_hint="; fix it or delete it to use the defaults")
    return check_generation(generation, file)


def check_generation(generation: dict[str, Any], file: str | os.PathLike) -> dict[str, Any]:
    """`generation` itself if every sampling setting in it is one `SamplingSettings`
    accepts (other keys are left alone); else an error naming `file` and the field."""
    from scribelm.sampling import SamplingSettings

    known = {f.name for f in dataclasses.fields(SamplingSettings)}
    settings = {k: v for k, v in generation.items() if k in known}
    for key, value in settings.items():  # one at a time, so the message names the field at fault
        _check_setting(file, key, lambda: SamplingSettings(**{key: value}))
    _check_setting(file, "settings", lambda: SamplingSettings(**settings))
    if "add_bos_token" in generation and not isinstance(generation["add_bos_token"], bool):
        raise CheckpointError(f"{file}: 'add_bos_token' must be true or false, got {generation['add_bos_token']!r}")
    return generation


def _check_setting(file: str | os.PathLike, key: str, build) -> None:
    from scribelm.sampling import SamplingError

    try:
        build()
    except SamplingError as err:
        raise CheckpointError(f"{file}: {err}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: '{key}' has a value of the wrong type ({err})") from None


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint's model.safetensors, memory-mapped on CPU."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); restore it from a copy") from None


def read_weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint's model.safetensors, from the file's
    header alone: no tensor is read."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); restore it from a copy") from None


_BLOCK = re.compile(r"(?:decoder\.)?blocks\.(\d+)\.")  # an encoder-decoder's n_layers counts its decoder

# Which config fields decide the shape of each kind of weight (for naming them when one disagrees).
_SHAPE_FIELDS = (
    ("token_embedding.", "vocab_size, d_model"), ("position_embedding.", "context_length, d_model"),
    ("unembedding.", "vocab_size, d_model"), ("attention.q.", "n_heads, head_dim, d_model"),
    ("attention.k.", "n_kv_heads, head_dim, d_model"), ("attention.v.", "n_kv_heads, head_dim, d_model"),
    ("attention.o.", "n_heads, head_dim, d_model"), ("mlp.", "d_mlp, d_model"), ("norm", "d_model"),
)


def _fields_of(weight: str) -> str:
    return next((fields for part, fields in _SHAPE_FIELDS if part in weight), "the model's sizes")


def check_config_against_weights(path: Path, config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config.json that the weights' header contradicts, naming the field, before
    anything is built from it: building follows the config, so a wrong n_layers or d_model
    would otherwise cost time and memory in proportion to the mistake."""
    layers = {int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))}
    if layers != set(range(config.n_layers)):
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no layers"
        raise CheckpointError(
            f"{path / CONFIG_FILE} says n_layers={config.n_layers} but {WEIGHTS_FILE} holds {held}; "
            "the config and the weights disagree"
        )
    wanted = {"token_embedding.weight": (config.vocab_size, config.d_model)}
    if config.position == "learned":
        wanted["position_embedding.weight"] = (config.context_length, config.d_model)
    for name, shape in wanted.items():
        if name in shapes and shapes[name] != shape:
            raise CheckpointError(
                f"weight {name} in {path} has shape {shapes[name]} but config.json implies {shape} "
                f"(from {_fields_of(name)})"
            )


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build the Transformer of a checkpoint directory and fill it with its weights.

    config.json is checked against the weights' header first, then the model is built on
    the meta device (no memory) and the memory-mapped tensors are assigned to it."""
    from scribelm.seq2seq import build_model

    path = Path(path)
    data = _read_checkpoint_json(path)  # config.json, read once
    config, quantization = _config_from_json(path, data), data.get("quantization")
    shapes = read_weight_shapes(path)
    check_config_against_weights(path, config, shapes)
    with torch.device("meta"):
        model = build_model(config)  # a Transformer, or an EncoderDecoder
    if quantization is not None:
        from scribelm.accel.quantize import QuantizationError, prepare_quantized_skeleton

        try:
            prepare_quantized_skeleton(model, quantization, set(shapes))
        except QuantizationError as err:
            raise CheckpointError(f"{path}: {err}") from None
    expected = state_dict_for_saving(model)  # each tensor once, as saved
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"weights in {path} do not match its config.json: {'; '.join(parts)}")
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise CheckpointError(
                f"weight {name} in {path} has shape {shape} but config.json implies "
                f"{tuple(expected[name].shape)} (from {_fields_of(name)})"
            )
    state = read_weights(path)
    if dtype is not None:  # integer codes and their scales keep their own dtypes
        from scribelm.accel.quantize import is_quantized_tensor

        state = {k: v if is_quantized_tensor(k) else v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.unembedding, torch.nn.Linear):  # (a quantized one has its own copy)
        model.unembedding.weight = model.token_embedding.weight
    return model.to(device)
