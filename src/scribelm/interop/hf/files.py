"""A Hugging Face model directory's files: config.json and where each weight lives.

Weights are safetensors only, one file or shards listed in model.safetensors.index.json;
pickle checkpoints (`pytorch_model.bin`) are refused, because unpickling runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from scribelm.checkpoint import CONFIG_FILE, FORMAT
from scribelm.errors import CheckpointError
from scribelm.io import read_json_object

SINGLE_WEIGHTS = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_json_object(
        Path(path) / CONFIG_FILE, CheckpointError,
        missing=f"{Path(path)} has no {CONFIG_FILE}; a Hugging Face model directory needs one",
    )


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory whose config.json looks like Hugging Face's (has model_type or architectures)."""
    try:
        data = read_hf_config(path)
    except CheckpointError:
        return False
    return data.get("format") != FORMAT and ("model_type" in data or "architectures" in data)


def weight_files(path: Path) -> dict[str, Path]:
    """Every tensor name -> the safetensors file that holds it."""
    single, index = path / SINGLE_WEIGHTS, path / INDEX_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{single} is corrupt or truncated ({err}); download it again") from None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r})") from None
        if not isinstance(weight_map, dict) or any(not isinstance(v, str) or Path(v).name != v for v in weight_map.values()):
            raise CheckpointError(f"{index} must map tensor names to shard file names inside {path}")
        missing = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if missing:
            raise CheckpointError(
                f"{path} is missing {len(missing)} weight shard(s) listed in {INDEX_FILE}: {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}; download the complete model"
            )
        return {name: path / shard for name, shard in weight_map.items()}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} has only PyTorch pickle weights ({', '.join(pickles[:3])}), which scribelm never opens because "
            "unpickling can run code; convert them to safetensors where you trust the file, e.g. "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)` with transformers, then load OUT"
        )
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise CheckpointError(
            f"{path} has {', '.join(others[:3])} but neither {SINGLE_WEIGHTS} nor {INDEX_FILE}; "
            "it is not in the transformers layout"
        )
    raise CheckpointError(f"{path} has no weights ({SINGLE_WEIGHTS} or {INDEX_FILE})")
