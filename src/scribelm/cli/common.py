"""Small helpers shared by the CLI verbs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def add_speculative_arguments(parser, description: str) -> None:
    """--speculative, --draft and --num-draft, as `scribe generate` and `scribe serve` take them."""
    s = parser.add_argument_group("speculative decoding", description)
    s.add_argument("--speculative", choices=("prompt-lookup", "draft"), default=None,
                   help="prompt-lookup: guess by matching the last tokens against the prompt and output so far; "
                        "draft: a draft model guesses (--draft)")
    s.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same tokenizer that drafts tokens (implies --speculative draft)")
    s.add_argument("--num-draft", type=int, default=None, metavar="N", help="most tokens guessed per step (default 5)")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def resolve_config(name_or_path: str):
    """A preset name, a checkpoint directory, a config.json file, or a store name -> ModelConfig."""
    from scribelm.checkpoint import read_config
    from scribelm.config import PRESETS, ModelConfig
    from scribelm.errors import ConfigError

    path = Path(name_or_path)
    if name_or_path in PRESETS:
        return ModelConfig.from_preset(name_or_path)
    from scribelm.store import gguf_file

    if gguf_file(path) is not None:  # a GGUF file, or a store entry holding one
        from scribelm.interop.gguf_load import config_from_gguf
        from scribelm.interop.gguf_reader import read_gguf

        return config_from_gguf(read_gguf(gguf_file(path)))
    if path.is_dir():
        from scribelm.interop.hf import config_from_hf, is_hf_directory, read_hf_config

        if is_hf_directory(path):  # a Hugging Face model directory
            return config_from_hf(read_hf_config(path))
        return read_config(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err})") from None
        data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        return ModelConfig.from_dict(data)
    from scribelm.store import find_model_path

    stored = find_model_path(name_or_path)  # not a directory here, so a name in the local model store
    if stored is not None and gguf_file(stored) is not None:
        return resolve_config(str(stored))
    if stored is not None:
        return read_config(stored)
    raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}), a model directory, nor a stored model")
