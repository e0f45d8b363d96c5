"""The local model store: models by name instead of by path.

A store is a directory with one entry per model, named as the user named it:

    ~/.cache/scribelm/models/           ($SCRIBE_MODELS_DIR overrides it)
      my-chat/                          a copy of a checkpoint directory
      big-hf -> /data/hf/Llama-3.2-1B   or a link to one (nothing copied)

`add` copies a checkpoint (scribelm or Hugging Face directory) into the store,
or links it. The new entry is built under a temporary name beside it and
renamed into place only when complete; with `--force` the old entry is
swapped out in the same step, never deleted first. The existence check and
the rename happen under a lock on the store (`.lock`) and the rename never
replaces, so of two concurrent adds of one name exactly one wins. A source
inside the store is refused (linking an entry to itself would lose it). `rm`
removes the entry (a link, never what it points to); `info` reads what a person wants to know before serving a model — its
config, size on disk, parameter count (from the safetensors headers, without
loading any weights), quantization and chat template.

A MODEL argument is read by one rule everywhere (`scribelm.load`, every
`scribe` verb, the server): an existing directory (or GGUF file) wins, else a name in
the store. A GGUF file is stored as a folder holding it as `model.gguf` (a copy, or
with `--link` a link to it).
`find_model_path` applies it, `resolve_model_path` also says what went wrong:

    path = resolve_model_path("my-chat")      # or a directory path
    lm = scribelm.load(path)

The store sits below `scribelm.lm`: loading, training and serving all read it,
and it reads nothing of theirs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scribelm.errors import ScribeError
from scribelm.io import (
    MARKER_FILE, disk_full_error, exchange, foreign_entries, is_disk_full, published_directory_mode, read_json_object,
    read_output_marker, remove_path, remove_stale_temporaries, remove_tree_atomically, rename_no_replace,
    temporary_sibling,
)

try:
    import fcntl
except ImportError:  # not POSIX: rename_no_replace alone keeps adds apart
    fcntl = None

STORE_ENV = "SCRIBE_MODELS_DIR"
LOCK_FILE = ".lock"
MAX_HEADER_BYTES = 100 * 2**20
GGUF_MAGIC = b"GGUF"  # interop.gguf_reader.MAGIC, spelled here so the store does not import numpy
GGUF_ENTRY_FILE = "model.gguf"  # the one file of a store entry made from a GGUF file
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


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file a MODEL path stands for: the file itself, or the one `.gguf` file of a
    directory without config.json (a store entry made by `models add NAME model.gguf`)."""
    path = Path(path)

    def is_gguf(file: Path) -> bool:
        try:
            with open(file, "rb") as handle:
                return handle.read(4) == GGUF_MAGIC
        except OSError:
            return False

    if path.is_file():
        return path if is_gguf(path) else None
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1 and is_gguf(found[0]):
            return found[0]
    return None


@dataclass
class ModelInfo:
    name: str
    path: Path
    linked: bool
    format: str  # "scribelm", "huggingface" or "gguf"
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
        linked_file = entry / GGUF_ENTRY_FILE
        if linked_file.is_symlink() and not linked_file.exists():
            raise RegistryError(f"model {name!r} links to {os.readlink(linked_file)}, which no longer exists; "
                                f"`scribe models rm {name}`")
        if not entry.is_dir():
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"no model named {name!r} in the store {self.root} (stored: {known}); add one with `scribe models add NAME PATH`")
        return entry.resolve()

    def __contains__(self, name: str) -> bool:
        return bool(_NAME.match(name or "")) and (self.root / name).is_dir()

    def add(self, name: str, source: str | os.PathLike, *, link: bool = False, overwrite: bool = False) -> Path:
        """Copy (or link) a model directory into the store under `name`.

        The entry appears complete or not at all; with `overwrite` the old entry
        stays until the new one is complete. Two adds of one name without
        `overwrite`: one succeeds, the other raises RegistryError."""
        check_name(name)
        source = Path(source).expanduser()
        if not source.exists():
            raise RegistryError(f"no model at {source}: give a checkpoint or Hugging Face model directory, or a GGUF file")
        gguf_source = None if source.is_dir() else gguf_file(source)
        if not is_model_directory(source) and gguf_source is None:
            raise RegistryError(f"{source} is not a model directory (it needs config.json and *.safetensors weights) "
                                "nor a GGUF file")
        target = source.resolve()
        root = self.root.resolve()
        if target == root or root in target.parents:
            raise RegistryError(
                f"{source} is inside the model store {self.root}; it is stored already "
                "(`scribe models list`), give a model directory outside the store"
            )
        if target in root.parents:
            raise RegistryError(f"{source} contains the model store {self.root}; give the model's own directory")
        entry = self.root / name
        if os.path.lexists(entry):
            if not overwrite:
                raise self._exists(name)
            _check_replaceable_entry(entry)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_full_error(err, self.root, "nothing was written") from None
        remove_stale_temporaries(entry)
        tmp = temporary_sibling(entry)
        try:
            if link and gguf_source is None:
                tmp.symlink_to(target, target_is_directory=True)
            else:
                tmp.mkdir(mode=0o700)
                if gguf_source is not None and link:  # a folder holding a link to the file
                    (tmp / GGUF_ENTRY_FILE).symlink_to(target)
                elif gguf_source is not None:
                    shutil.copyfile(gguf_source, tmp / GGUF_ENTRY_FILE)
                else:
                    _copy_model_files(source, tmp, ancestors=frozenset())
                (tmp / MARKER_FILE).write_text(json.dumps(
                    {"format": "scribelm-output", "version": 1, "kind": "model",
                     "entries": sorted(p.name for p in tmp.iterdir())}, indent=2) + "\n")
                _fsync_files(tmp)
                os.chmod(tmp, published_directory_mode())  # mkdir under the umask; this one was made private
            with self._locked():
                if os.path.lexists(entry):
                    if not overwrite:
                        raise self._exists(name)
                    _check_replaceable_entry(entry)
                    exchange(tmp, entry)  # the old entry is now at `tmp`, removed below
                else:
                    try:
                        rename_no_replace(tmp, entry)
                    except FileExistsError:
                        raise self._exists(name) from None
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(err, entry, "the store is unchanged") from None
            raise
        finally:
            if os.path.lexists(tmp):
                remove_path(tmp)
        return entry

    def _exists(self, name: str) -> RegistryError:
        return RegistryError(
            f"a model named {name!r} is already stored; replace it with --force, remove it first "
            f"(`scribe models rm {name}`) or pick another name"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Held only around the existence check and the rename, never during a copy."""
        if fcntl is None:
            yield
            return
        with open(self.root / LOCK_FILE, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def remove(self, name: str) -> None:
        check_name(name)
        entry = self.root / name
        if entry.is_symlink():
            entry.unlink()  # a link: the linked model stays where it is
        elif entry.is_dir():
            remove_tree_atomically(entry)  # gone under its name at once, even if interrupted
        else:
            raise RegistryError(f"no model named {name!r} in the store {self.root}")

    def info(self, name: str) -> ModelInfo:
        path = self.path(name)
        info = describe_model(path)
        info.name, info.linked = name, (self.root / name).is_symlink()
        if (self.root / name / GGUF_ENTRY_FILE).is_symlink():  # `add --link` of a GGUF file
            info.linked, info.path = True, (self.root / name / GGUF_ENTRY_FILE).resolve()
        return info


def _check_replaceable_entry(entry: Path) -> None:
    """--force replaces what `models add` put in the store (a link, a copied model
    directory), never a folder a person put there by hand."""
    if entry.is_symlink():
        return
    marker = read_output_marker(entry)
    if marker is not None:
        foreign = foreign_entries(entry)
    elif is_model_directory(entry):
        return  # a copy made before entries carried a marker
    else:
        foreign = sorted(p.name for p in entry.iterdir()) if entry.is_dir() else [entry.name]
    if foreign:
        raise RegistryError(
            f"{entry} holds files `scribe models add` did not write ({', '.join(foreign[:3])}); nothing was changed: "
            "move them out of the store first"
        )


def _copy_model_files(source: Path, target: Path, ancestors: frozenset) -> None:
    """Copy a model directory's visible files, following links (a Hugging Face cache
    snapshot is made of links to blobs); a link back to a folder that holds it, a
    broken link or a special file is a one-line RegistryError, not an endless copy."""
    here = source.stat()
    ancestors = ancestors | {(here.st_dev, here.st_ino)}
    for item in sorted(source.iterdir()):
        if item.name.startswith("."):
            continue
        try:
            info = item.stat()
        except FileNotFoundError:
            raise RegistryError(f"{item} is a link to {os.readlink(item)}, which does not exist; fix or remove it") from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RegistryError(f"{item} is a link that points back to itself; remove it and add again") from None
            raise
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in ancestors:
                raise RegistryError(
                    f"{item} links back to a folder that contains it (a symlink loop); remove that link and add again"
                )
            (target / item.name).mkdir()
            _copy_model_files(item, target / item.name, ancestors)
        elif stat.S_ISREG(info.st_mode):
            shutil.copyfile(item, target / item.name)  # new files: the umask's mode, as any file the user writes
        else:
            raise RegistryError(f"{item} is not a regular file or folder; a model directory holds only files")


def _fsync_files(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(Path(directory) / name, "rb") as handle:
                os.fsync(handle.fileno())


def describe_model(path: str | os.PathLike) -> ModelInfo:
    """Config, size, parameter count, quantization and chat template of a model directory."""
    path = Path(path)
    if gguf_file(path) is not None:
        return _describe_gguf(path, gguf_file(path))
    if not is_model_directory(path):
        raise RegistryError(f"{path} is not a model directory (it needs config.json and *.safetensors weights)")
    config = read_json_object(path / "config.json", RegistryError, missing=f"{path} has no config.json")
    size = _size_on_disk(path)
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
        except (ValueError, AttributeError, RecursionError):
            template = None
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict)), None)
        if not isinstance(template, str):
            template = None
    fmt = "scribelm" if config.get("format") == "scribelm" else "huggingface"
    shown = {k: v for k, v in config.items() if k not in ("format", "format_version")}
    if dtypes:
        shown.setdefault("weights_dtype", ",".join(sorted(dtypes)))
    return ModelInfo(
        name=path.name, path=path, linked=False, format=fmt, size_bytes=size, parameters=parameters,
        quantization=quantization, config=shown, chat_template=template,
    )


def _describe_gguf(path: Path, file: Path) -> ModelInfo:
    """A GGUF file (or the store entry holding one), from its header alone; "quantization"
    says how its weights are stored and what they load as."""
    from scribelm.interop.gguf_load import describe_gguf

    described = describe_gguf(file)
    config = dict(described["config"], architecture=described["architecture"],
                  weights_stored=described["weights_stored"])
    return ModelInfo(
        name=path.name, path=path, linked=False, format="gguf", size_bytes=file.stat().st_size,
        parameters=described["parameters"], quantization=described["weights"], config=config,
        chat_template=described["chat_template"],
    )


def _size_on_disk(path: Path) -> int:
    """Bytes of the files under `path`; links are counted once each and never followed into a loop."""
    total, seen = 0, set()
    for directory, _, files in os.walk(path):  # os.walk does not descend into linked folders
        for name in files:
            try:
                info = (Path(directory) / name).stat()
            except OSError:  # a broken link: nothing to count
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def _safetensors_parameter_count(file: Path) -> tuple[int, set[str]]:
    """Sum of tensor sizes from a safetensors header (8-byte length + JSON); no weights are read."""

    def unreadable(why: str) -> RegistryError:
        return RegistryError(f"{file} is not a readable safetensors file ({why}); re-download or re-save it")

    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise unreadable("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > file.stat().st_size - 8:
                raise unreadable(f"its header claims {length} bytes, more than the file or {MAX_HEADER_BYTES} allow")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise unreadable(err.strerror or str(err)) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise unreadable(f"its header is not valid JSON: {err}") from None
    except RecursionError:
        raise unreadable("its header is nested too deeply") from None
    if not isinstance(header, dict):
        raise unreadable(f"its header is a JSON {type(header).__name__}, not an object of tensors")
    total, dtypes = 0, set()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise unreadable(f"tensor {name!r} is described by a {type(entry).__name__}, not an object")
        shape = entry.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise unreadable(f"tensor {name!r} has shape {json.dumps(shape)[:60]}, not a list of non-negative integers")
        count = 1
        for dim in shape:
            count *= dim
        total += count
        dtypes.add(str(entry.get("dtype", "?")))
    return total, dtypes


def find_model_path(name_or_path: str | os.PathLike, store: ModelStore | None = None) -> Path | None:
    """A MODEL argument -> a directory (or a GGUF file): an existing directory or GGUF
    file path wins, else a store name; None when it is neither."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() or gguf_file(path) is not None:
        return path
    store = store or ModelStore()
    if _NAME.match(text) and text in store:
        return store.path(text)
    return None


def resolve_model_path(name_or_path: str | os.PathLike, store: ModelStore | None = None) -> Path:
    """A MODEL argument -> a model directory, or a RegistryError that lists the stored names."""
    found = find_model_path(name_or_path, store)
    if found is not None:
        return found
    text = os.fspath(name_or_path)
    store = store or ModelStore()
    known = ", ".join(store.names()) or "none"
    raise RegistryError(
        f"{text!r} is neither a model directory nor a model in the store {store.root} (stored: {known}); "
        "give a checkpoint directory or add it with `scribe models add NAME PATH`"
    )
