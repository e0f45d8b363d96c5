"""Files and directories that are never half-written and never someone else's.

Every command that writes follows three rules, and this module is where they live:

1. **Atomic.** A file or directory is built under a temporary sibling name
   (`.NAME.tmp-PID-XXXX`) and renamed into place only when complete, so a
   `kill -9` at any moment leaves the previous result or the new one, never a
   mix. Replacing an existing directory is one `renameat2(RENAME_EXCHANGE)`
   on Linux (the old one stays in place until the new one is complete); where
   that is missing, two renames, and a later run puts the old one back if a
   crash fell between them. Temporaries left by a killed process are removed
   by the next write to the same name.

2. **Owned.** A directory scribelm publishes holds a small marker,
   `.scribelm-output.json`:

       {"format": "scribelm-output", "version": 1, "kind": "checkpoint",
        "entries": ["config.json", "generation.json", "model.safetensors", ...]}

   `entries` lists the top-level names scribelm wrote (`null` for a directory
   that grows in place, such as a training run, where everything is ours).
   `claim_output_directory` is the one check every writing command makes
   before it starts: a new or empty directory is fine; a scribelm directory is
   replaced only with `--force`; a directory holding anything scribelm did not
   write is refused even with `--force`, so no command can delete a user's
   file. Directories written before the marker existed are recognised by
   their own manifest (`config.json` with `"format": "scribelm"`, a shard
   `manifest.json`) when every name in them is one scribelm writes.

3. **Like any other file.** Temporary files are private (`mkstemp` makes
   them 0600, `mkdtemp` 0700); what is published gets the user's umask, as
   `open()` would have given it, and a replaced file keeps its mode.

A full disk (ENOSPC, EDQUOT) becomes a one-line `DiskFullError`; the
temporary is removed and the previous output is untouched.

    with atomic_directory("out", kind="checkpoint") as tmp:
        (tmp / "config.json").write_text(...)
    write_file_atomically("notes.json", text)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from scribelm.errors import ScribeError

MARKER_FILE = ".scribelm-output.json"
MARKER_FORMAT = "scribelm-output"
MARKER_VERSION = 1

# What directories written before the marker existed can be recognised by,
# and the names scribelm put in them.
_LEGACY_KINDS = {
    "config.json": ("format", "scribelm", "checkpoint"),
    "manifest.json": ("format", "scribelm-shards", "shards"),
}
_LEGACY_NAMES = (
    "config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation.json",
    "training_state.pt", "run_config.json", "manifest.json", "train_*.bin", "validation_*.bin",
)
# tmp: being written; old: set aside by an interrupted swap (put back if the name is
# missing); trash: renamed away to be deleted (never put back).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<role>tmp|old|trash)-(?P<pid>\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(ScribeError):
    """An output path that cannot be written without losing something."""


class DiskFullError(OutputError):
    """The disk (or quota) filled up while writing an output."""


# ----------------------------------------------------------------------------- modes


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows
    (setting it to read it back would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def published_file_mode() -> int:
    return 0o666 & ~current_umask()


def published_directory_mode() -> int:
    return 0o777 & ~current_umask()


# ----------------------------------------------------------------------------- renames


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # not Linux, or a C library without it
    _renameat2 = None


def _rename2(source: Path, target: Path, flags: int) -> bool:
    """renameat2 with `flags`; False where the system or file system lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(source), None, os.fspath(target))


def rename_no_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename `source` to `target`, raising FileExistsError if `target` exists, atomically
    where the system allows (elsewhere callers that race must hold a lock)."""
    source, target = Path(source), Path(target)
    try:
        if _rename2(source, target, _RENAME_NOREPLACE):
            return
    except OSError as err:
        if err.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "already exists", os.fspath(target)) from None
        raise
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "already exists", os.fspath(target))
    os.rename(source, target)


def exchange(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap two existing paths in one step where the system allows; elsewhere by two
    renames through a `.old` name that `remove_stale_temporaries` puts back after a crash."""
    source, target = Path(source), Path(target)
    if _rename2(source, target, _RENAME_EXCHANGE):
        return
    aside = temporary_sibling(target, "old")
    os.rename(target, aside)
    os.rename(source, target)
    os.rename(aside, source)


def temporary_sibling(final: str | os.PathLike, role: str = "tmp", suffix: str = "") -> Path:
    """A fresh name beside `final` for writing it (`role` "tmp") or for deleting it
    ("trash"), which `remove_stale_temporaries` clears once this process is gone.
    `suffix` (".onnx") for writers that choose the format by the file name."""
    final = Path(final)
    return final.with_name(f".{final.name}.{role}-{os.getpid()}-{os.urandom(4).hex()}{suffix}")


def remove_tree_atomically(path: str | os.PathLike) -> None:
    """Delete a directory (or link) so that it vanishes under its name in one step: it
    is renamed away first, so an interrupted removal never leaves half of it in place."""
    path = Path(path)
    trash = temporary_sibling(path, "trash")
    os.rename(path, trash)
    _remove_path(trash)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `final` left by processes that no longer run (a `kill -9`,
    a power cut); an old copy set aside by an interrupted swap is put back first if
    `final` itself is missing. Returns what was removed."""
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for item in sorted(final.parent.iterdir()):
        match = _TEMPORARY.match(item.name)
        if not match or match["name"] != final.name or _pid_alive(int(match["pid"])):
            continue
        if match["role"] == "old" and not os.path.lexists(final):
            with contextlib.suppress(OSError):
                os.rename(item, final)
                continue
        _remove_path(item)
        removed.append(item)
    return removed


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, link or directory tree, whichever `path` is (a link's target stays)."""
    _remove_path(Path(path))


def _remove_path(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _apply_umask(root: Path) -> None:
    """Give a tree the modes `open`/`mkdir` would have under the user's umask: writers such
    as mkdtemp (0700) and safetensors (0600) make their files private."""
    file_mode, directory_mode = published_file_mode(), published_directory_mode()
    for directory, _, files in os.walk(root):
        os.chmod(directory, directory_mode)
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                os.chmod(os.path.join(directory, name), file_mode)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            file = Path(directory) / name
            if file.is_symlink():
                continue
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(directory))


_RUST_DISK_FULL = re.compile(r"os error (28|122)\b|code: (28|122)\b|No space left on device|Disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as reported by libraries written in Rust (tokenizers,
    safetensors), which raise plain exceptions that carry the OS error in their text."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in _DISK_FULL
    return isinstance(err, Exception) and bool(_RUST_DISK_FULL.search(str(err)))


def disk_full_error(err: BaseException, target: Path, kept: str) -> BaseException:
    """A one-line DiskFullError for a full disk (`kept` says what is unchanged); other errors as they are."""
    if is_disk_full(err):
        return DiskFullError(f"disk full while writing {target}; free some space and run again ({kept})")
    return err


def disk_full_while(err: BaseException, what: str) -> DiskFullError | None:
    """A one-line DiskFullError naming what was being done when the disk filled up
    (None for any other error, which the caller raises as it is)."""
    if not (isinstance(err, DiskFullError) or is_disk_full(err)):
        return None
    return DiskFullError(f"disk full while {what}; free some space and run again")


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; when the block ends without an
    error it is flushed, synced and renamed onto `path` (keeping a replaced file's
    mode, else the umask's). On an error the temporary is removed and `path` is unchanged."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_file writes whole files: mode 'w' or 'wb'")
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        try:
            target_mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            target_mode = published_file_mode()
        os.chmod(tmp, target_mode)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(err):
            raise disk_full_error(err, path, f"{path} is unchanged") from None
        raise


def write_file_atomically(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically (see `atomic_file`); returns the path."""
    if isinstance(data, str):
        with atomic_file(path, "w", encoding=encoding) as handle:
            handle.write(data)
    else:
        with atomic_file(path, "wb") as handle:
            handle.write(data)
    return Path(path)


# ----------------------------------------------------------------------------- ownership


def read_output_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a directory scribelm wrote, or None (absent or unreadable)."""
    file = Path(path) / MARKER_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    entries = data.get("entries")
    if entries is not None and not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
        return None
    return data


def write_output_marker(path: str | os.PathLike, kind: str, entries: list[str] | None = None) -> Path:
    """Mark `path` as written by scribelm. `entries`: the top-level names it wrote; None
    for a directory that grows in place (a training run), where everything is ours."""
    data = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind,
            "entries": sorted(entries) if entries is not None else None}
    return write_file_atomically(Path(path) / MARKER_FILE, json.dumps(data, indent=2) + "\n")


def _legacy_kind(path: Path) -> str | None:
    for file, (key, value, kind) in _LEGACY_KINDS.items():
        try:
            data = json.loads((path / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(key) == value:
            return kind
    return None


def output_kind(path: str | os.PathLike) -> str | None:
    """What scribelm wrote at `path` ("checkpoint", "shards", ...), or None if it did not write it."""
    path = Path(path)
    marker = read_output_marker(path)
    if marker is not None:
        return str(marker.get("kind") or "output")
    return _legacy_kind(path)


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Top-level names in the directory `path` that scribelm did not write (all of them
    in a directory without a marker); temporaries of scribelm's own writers are not counted."""
    path = Path(path)
    names = sorted(p.name for p in path.iterdir() if p.name != MARKER_FILE and not _TEMPORARY.match(p.name))
    marker = read_output_marker(path)
    if marker is not None:
        if marker.get("entries") is None:
            return []
        return [n for n in names if n not in set(marker["entries"])]
    if _legacy_kind(path) is not None:
        return [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in _LEGACY_NAMES)]
    return names


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_replaceable(path: Path, what: str = "output") -> None:
    """Raise OutputError unless the directory `path` is absent, empty, or wholly scribelm's."""
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise OutputError(f"{path} exists and is not a directory; choose another path for the {what}")
    foreign = foreign_entries(path)
    if not foreign:
        return
    if output_kind(path) is None:
        raise OutputError(
            f"{path} is not empty and was not written by scribelm (it holds {_describe(foreign)}); "
            f"nothing was changed: choose a new or empty directory for the {what}"
        )
    raise OutputError(
        f"{path} holds files scribelm did not write ({_describe(foreign)}); nothing was changed: "
        f"move them elsewhere or choose another directory for the {what}"
    )


def claim_output_directory(path: str | os.PathLike, *, force: bool = False, kind: str = "output",
                           force_flag: str = "--force") -> Path:
    """The check every command makes before it writes a directory; returns the path to write
    (a link to a directory is followed). Nothing is deleted here.

    - absent or empty: fine;
    - written by scribelm (marker, or a legacy manifest) and nothing else in it:
      fine with `force`, else OutputError suggesting `force_flag`;
    - anything else (a user's files, a file where a directory should be):
      OutputError even with `force`, naming the path and what is in it.

    Write the new content with `atomic_directory(path)`: the old directory stays
    in place until the new one is complete, then the two are swapped. Stale
    temporaries of earlier killed runs are removed here.
    """
    path = Path(path).expanduser()
    if path.is_symlink() and path.is_dir():
        path = path.resolve()
    remove_stale_temporaries(path)
    if not os.path.lexists(path):
        if path.parent.exists() and not path.parent.is_dir():
            raise OutputError(f"{path.parent} is a file, so {path} cannot be created; choose another path for the {kind}")
        return path
    if not path.is_dir():
        raise OutputError(f"{path} exists and is not a directory; choose another path for the {kind}")
    if not any(True for p in path.iterdir() if not _TEMPORARY.match(p.name) and p.name != MARKER_FILE):
        return path  # empty, or only marked (a run that stopped before writing anything)
    check_replaceable(path, kind)
    if not force:
        raise OutputError(f"{path} already exists (a scribelm {output_kind(path)}); pass {force_flag} to replace it, "
                          "or choose another directory")
    return path


def claim_growing_directory(path: str | os.PathLike, *, kind: str, entries: list[str], force: bool = False,
                            resume: bool = False, force_flag: str = "--force") -> Path:
    """Claim a directory that is written in place over time (a fine-tune run: checkpoints,
    metrics, then the model) and mark it as scribelm's, listing the top-level `entries` it
    may write; returns the path.

    - `resume`: continue what is there; nothing is removed or checked beyond the path
      being a directory (a user's other files in it stay theirs: they are not listed).
    - otherwise as `claim_output_directory`; with `force`, an earlier scribelm run there
      is removed first (only possible when nothing else is in it), since a run written
      in place cannot be swapped in whole.
    """
    path = Path(path).expanduser()
    if path.is_symlink() and path.is_dir():
        path = path.resolve()
    if resume:
        remove_stale_temporaries(path)
        if os.path.lexists(path) and not path.is_dir():
            raise OutputError(f"{path} exists and is not a directory; choose another path for the {kind}")
    else:
        claim_output_directory(path, force=force, kind=kind, force_flag=force_flag)
        if path.is_dir():
            for item in list(path.iterdir()):  # all scribelm's: claim_output_directory refused anything else
                remove_tree_atomically(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = read_output_marker(path)
        known = set(entries) | set((marker or {}).get("entries") or [])
        if marker is None or marker.get("entries") is not None and not known <= set(marker["entries"]):
            write_output_marker(path, kind, sorted(known))
    except OSError as err:
        raise disk_full_error(err, path, "nothing was written") from None
    return path


def claim_output_file(path: str | os.PathLike, *, force: bool = False, kind: str = "output",
                      looks_like: Callable[[Path], bool] | None = None, force_flag: str = "--force") -> Path:
    """The same check for a single-file output: an existing file is replaced only with
    `force`, and only if `looks_like(path)` says it is such an output (a GGUF file for a
    GGUF export), so `--force` never overwrites an unrelated file."""
    path = Path(path).expanduser()
    remove_stale_temporaries(path)
    if not os.path.lexists(path):
        return path
    if path.is_dir():
        raise OutputError(f"{path} is a directory; the {kind} is a single file, choose a file path")
    if looks_like is not None and not looks_like(path):
        raise OutputError(f"{path} exists and is not a {kind}; nothing was changed: choose another path")
    if not force:
        raise OutputError(f"{path} already exists; pass {force_flag} to replace it, or choose another path")
    return path


# ----------------------------------------------------------------------------- directories


def atomic_directory(final: str | os.PathLike, *, kind: str = "output", grows: bool = False):
    """Context manager: yields a temporary directory beside `final`; when the block ends
    without an error it is marked as scribelm's (`kind`; `grows`: the marker claims every
    entry, for directories written into later), synced, given the umask's mode and
    swapped with `final` in one step. `final` may be absent, empty or a scribelm
    directory; anything else raises OutputError before any work is done (and again at
    the swap, if it changed meanwhile). On an error the temporary is removed and
    `final` is unchanged."""
    return _AtomicDirectory(Path(final), kind, grows)


class _AtomicDirectory:
    def __init__(self, final: Path, kind: str, grows: bool) -> None:
        self.final = final.expanduser()
        if self.final.is_symlink() and self.final.is_dir():
            self.final = self.final.resolve()
        self.kind, self.grows = kind, grows

    def __enter__(self) -> Path:
        check_replaceable(self.final, self.kind)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_full_error(err, self.final, "nothing was written") from None
        remove_stale_temporaries(self.final)
        self.tmp = temporary_sibling(self.final, "tmp")
        self.tmp.mkdir(mode=0o700)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise disk_full_error(exc, self.final, self._kept()) from None
            return False
        try:
            self._publish()
        except BaseException as err:
            _remove_path(self.tmp)
            if is_disk_full(err):
                raise disk_full_error(err, self.final, self._kept()) from None
            raise
        return False

    def _kept(self) -> str:
        return f"the previous {self.final} is unchanged" if self.final.exists() else "nothing was written"

    def _publish(self) -> None:
        entries = None if self.grows else [p.name for p in self.tmp.iterdir() if p.name != MARKER_FILE]
        data = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": self.kind,
                "entries": sorted(entries) if entries is not None else None}
        (self.tmp / MARKER_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(self.tmp)  # the bytes are durable before the rename publishes them
        _apply_umask(self.tmp)
        check_replaceable(self.final, self.kind)
        if os.path.lexists(self.final):
            exchange(self.tmp, self.final)  # the old directory is now at self.tmp
            _fsync_directory(self.final.parent)
            _remove_path(self.tmp)
        else:
            os.rename(self.tmp, self.final)
            _fsync_directory(self.final.parent)


# ----------------------------------------------------------------------------- JSON


def read_json_object(
    file: Path, error: type[Exception], *, missing: str, invalid_hint: str = ""
) -> dict[str, Any]:
    """A JSON file that must hold an object; each way it can be wrong raises `error`
    with a one-line message (`missing` when the file is absent, `invalid_hint` appended
    to the parse error)."""
    if not file.is_file():
        raise error(missing)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{file} is not valid JSON ({err}){invalid_hint}") from None
    except RecursionError:
        raise error(f"{file} is nested too deeply to be a valid file{invalid_hint}") from None
    if not isinstance(data, dict):
        raise error(f"{file} must hold a JSON object, got a {type(data).__name__}")
    return data
