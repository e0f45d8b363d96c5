"""The local model store: models by name instead of by path.

A store is a directory with one entry per model, named as the user named it:

    ~/.cache/scribelm/models/           ($SCRIBE_MODELS_DIR overrides it)
      my-chat/                          a copy of a checkpoint directory
      big-hf -> /data/hf/Llama-3.2-1B   or a link to one (nothing copied)

`add` copies a checkpoint (scribelm or Hugging Face directory) into the store
atomically, or links it; `rm` removes the entry (a link, never what it points
to); `info` reads what a person wants to know before serving a model — its
config, size on disk, parameter count (from the safetensors headers, without
loading any weights), quantization and chat template.

Every command that takes a MODEL accepts a store name through
`resolve_model_path`:

    path = resolve_model_path("my-chat")      # or a directory path
    lm = scribelm.load(path)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scribelm.checkpoint import atomic_directory
from scribelm.errors import ScribeError

STORE_ENV = "SCRIBE_MODELS_DIR"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


class RegistryError(ScribeError):
    """A model name or store entry that cannot be used."""


def default_store_dir() -> Path:
    """$SCRIBE_MODELS_DIR, else $XDG_CACHE_HOME/scribelm/models, else ~/.cache/scribelm/models."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "scribelm" / "models"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise RegistryError(
            f"{name!r} is not a valid model name: use letters, digits, '.', '_', ':' or '-' (starting with a letter or digit)"
        )
    return name


def is_model_directory(path: Path) -> bool:
    """A scribelm checkpoint or Hugging Face model directory: config.json plus safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@dataclass
class ModelInfo:
    name: str
    path: Path
    linked: bool
    format: str  # "scribelm" or "huggingface"
    size_bytes: int
    parameters: int
    quantization: str
    config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "linked": self.linked,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "chat_template": self.chat_template,
            "config": self.config,
        }


class ModelStore:
    """A directory of named models."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_dir()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())

    def path(self, name: str) -> Path:
        """The directory of a stored model (a link resolves to its target)."""
        check_name(name)
        entry = self.root / name
        if entry.is_symlink() and not entry.exists():
            raise RegistryError(f"model {name!r} links to {os.readlink(entry)}, which no longer exists; `scribe models rm {name}`")
        if not entry.is_dir():
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"no model named {name!r} in the store {self.root} (stored: {known}); add one with `scribe models add NAME PATH`")
        return entry.resolve()

    def __contains__(self, name: str) -> bool:
        return bool(_NAME.match(name or "")) and (self.root / name).is_dir()

    def add(self, name: str, source: str | os.PathLike, *, link: bool = False, overwrite: bool = False) -> Path:
        """Copy (or link) a model directory into the store under `name`."""
        check_name(name)
        source = Path(source).expanduser()
        if not source.exists():
            raise RegistryError(f"no model at {source}: give a checkpoint or Hugging Face model directory")
        if not is_model_directory(source):
            raise RegistryError(f"{source} is not a model directory (it needs config.json and *.safetensors weights)")
        entry = self.root / name
        if (entry.exists() or entry.is_symlink()) and not overwrite:
            raise RegistryError(f"a model named {name!r} is already stored; remove it first (`scribe models rm {name}`) or pick another name")
        self.root.mkdir(parents=True, exist_ok=True)
        if entry.is_symlink():
            entry.unlink()
        if link:
            if entry.exists():
                shutil.rmtree(entry)
            tmp = self.root / f".{name}.link-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(source.resolve(), target_is_directory=True)
            os.replace(tmp, entry)  # atomic: the name points to the model or to nothing
        else:
            with atomic_directory(entry) as tmp:
                for item in source.iterdir():
                    if item.name.startswith("."):
                        continue
                    if item.is_dir():
                        shutil.copytree(item, tmp / item.name)
                    else:
                        shutil.copy2(item, tmp / item.name)
        return entry

    def remove(self, name: str) -> None:
        check_name(name)
        entry = self.root / name
        if entry.is_symlink():
            entry.unlink()  # a link: the linked model stays where it is
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            raise RegistryError(f"no model named {name!r} in the store {self.root}")

    def info(self, name: str) -> ModelInfo:
        path = self.path(name)
        info = describe_model(path)
        info.name, info.linked = name, (self.root / name).is_symlink()
        return info


def describe_model(path: str | os.PathLike) -> ModelInfo:
    """Config, size, parameter count, quantization and chat template of a model directory."""
    path = Path(path)
    if not is_model_directory(path):
        raise RegistryError(f"{path} is not a model directory (it needs config.json and *.safetensors weights)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise RegistryError(f"{path / 'config.json'} must hold a JSON object")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    parameters, dtypes = 0, set()
    for weights in sorted(path.glob("*.safetensors")):
        count, kinds = _safetensors_parameter_count(weights)
        parameters += count
        dtypes |= kinds
    quantization = "none"
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict):  # scribelm's record ("scheme", "bits", "group_size") or Hugging Face's quantization_config
        name = str(q.get("scheme") or q.get("method") or q.get("quant_method") or "custom")
        details = [f"{q['bits']}-bit"] if q.get("bits") and str(q["bits"]) not in name else []
        if q.get("group_size"):
            details.append(f"groups of {q['group_size']}")
        quantization = name + (f" ({', '.join(details)})" if details else "")
    elif isinstance(q, str):
        quantization = q
    template = None
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            template = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            template = None
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict)), None)
    fmt = "scribelm" if config.get("format") == "scribelm" else "huggingface"
    shown = {k: v for k, v in config.items() if k not in ("format", "format_version")}
    if dtypes:
        shown.setdefault("weights_dtype", ",".join(sorted(dtypes)))
    return ModelInfo(
        name=path.name, path=path, linked=False, format=fmt, size_bytes=size, parameters=parameters,
        quantization=quantization, config=shown, chat_template=template,
    )


def _safetensors_parameter_count(file: Path) -> tuple[int, set[str]]:
    """Sum of tensor sizes from a safetensors header (8-byte length + JSON); no weights are read."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise RegistryError(f"{file} is not a readable safetensors file ({err})") from None
    total, dtypes = 0, set()
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        total += count
        dtypes.add(str(entry.get("dtype", "?")))
    return total, dtypes


def resolve_model_path(name_or_path: str | os.PathLike, store: ModelStore | None = None) -> Path:
    """A MODEL argument -> a model directory: an existing directory path wins, else a store name."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    store = store or ModelStore()
    if _NAME.match(text) and text in store:
        return store.path(text)
    known = ", ".join(store.names()) or "none"
    raise RegistryError(
        f"{text!r} is neither a model directory nor a model in the store {store.root} (stored: {known}); "
        "give a checkpoint directory or add it with `scribe models add NAME PATH`"
    )
