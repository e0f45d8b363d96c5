"""A run directory belongs to one run.

`scribe pretrain` and `scribe quickstart` write into a directory the user
names. Two different runs in one directory would mix: metrics appended to
the old ones, a plot drawn back from step 528 to step 1, old checkpoints
with higher step numbers outliving (and out-ranking) the new run's. So the
first thing a run does is *claim* its directory:

    .scribelm-output.json   scribelm wrote this directory (`scribelm.io`'s marker:
                            its kind, and the names scribelm writes in it)
    run.json                what defines the run: the recipe (model, data, training settings)

    claim_run_directory(out, "training run", recipe)
      out missing or empty            -> "new": marker and run.json written, start
      same kind, same recipe          -> "resume" (settings that do not change what the
                                         run computes, like max_steps, may differ; they
                                         are listed in `changed`)
      same kind, another recipe       -> one-line error naming the differences
      same kind and new=True          -> "new": scribelm's own files removed (checkpoints,
                                         metrics, plots, data, model), nothing else
      anything else (a user's files,  -> error, even with new=True: scribelm deletes
      another kind of output)            nothing in a directory it did not write

Both files are written atomically; the marker first, so a directory is
never left holding a run.json that nothing says is scribelm's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scribelm import io
from scribelm.errors import ScribeError
from scribelm.train.checkpoints import BEST_DIR, CHECKPOINTS_DIR, remove_stale_temporaries
from scribelm.train.metrics import METRICS_FILE, PLOT_FILE

RUN_MANIFEST = "run.json"
RUN_FORMAT = "scribelm-run"
RUN_FORMAT_VERSION = 1
TENSORBOARD_DIR = "tensorboard"

#: What each kind of run writes at the top of its directory (the marker's entries).
RUN_ENTRIES = {
    "training run": (RUN_MANIFEST, CHECKPOINTS_DIR, BEST_DIR, METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR),
    "quickstart": (RUN_MANIFEST, "corpus", "data", "model", "run"),
    "sweep": (RUN_MANIFEST, "corpus", "data", "runs", "sweep.jsonl", "fit.json", "plots"),
}
_QUICKSTART_CORPUS = "kjv.txt"


class RunDirectoryError(ScribeError):
    """An output directory that holds another run, or files scribelm did not write."""


@dataclass
class RunDirectory:
    """The outcome of claiming a directory for a run."""

    path: Path
    status: str  # "new" | "resume"
    changed: list[str] = field(default_factory=list)  # "train.max_steps 100 -> 200": allowed changes on resume
    removed: list[Path] = field(default_factory=list)  # scribelm's files a fresh start removed
    manifest: dict[str, Any] = field(default_factory=dict)  # run.json as written now


def _normalized(data: Any) -> Any:
    """As it reads back from JSON (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(data, default=str))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _show(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def recipe_differences(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Settings that differ, as "section.key OLD -> NEW", sorted; `ignore` names dotted keys or
    whole sections that are left out."""
    ignore = tuple(ignore)
    a, b = _flatten(_normalized(old)), _flatten(_normalized(new))
    differ = []
    for key in sorted(set(a) | set(b)):
        if any(key == skip or key.startswith(skip + ".") for skip in ignore):
            continue
        if a.get(key) != b.get(key):
            differ.append(f"{key} {_show(a.get(key))} -> {_show(b.get(key))}")
    return differ


def read_run_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run.json in `path`, or None when it is absent or unreadable."""
    try:
        data = json.loads((Path(path) / RUN_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or not isinstance(data.get("recipe"), dict):
        return None
    return data


def write_run_manifest(path: str | os.PathLike, recipe: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write run.json atomically (with `extra` facts, such as a budget chosen at start); returns it."""
    data = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "recipe": _normalized(recipe), **_normalized(extra)}
    io.write_file_atomically(Path(path) / RUN_MANIFEST, json.dumps(data, indent=2) + "\n")
    return data


def claim_run_directory(
    path: str | os.PathLike,
    kind: str,
    recipe: dict[str, Any],
    *,
    new: bool = False,
    resume: bool = True,
    may_change: Iterable[str] = (),
) -> RunDirectory:
    """Make `path` this run's directory, or say in one line why it cannot be (see the module docstring).

    Args:
        kind: "training run" (`scribe pretrain`) or "quickstart": which files are scribelm's.
        recipe: what defines the run; compared with the recorded one on a re-run.
        new: start over in a directory scribelm wrote for an earlier run of this kind.
        resume: False refuses to continue a recorded run unless `new` is given.
        may_change: dotted keys (or sections) of `recipe` that may differ on resume
            without making it another run (how long to train, how often to save...).
    """
    path = Path(path).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise RunDirectoryError(f"{path} exists and is not a directory; choose another output directory")
    marker = io.read_output_marker(path) if path.is_dir() else None
    if marker is None and path.is_dir() and _earlier_run(path, kind):
        marker = {"kind": kind}  # written by a scribelm that did not mark run directories yet
    if marker is None:
        if path.is_dir() and io.foreign_entries(path):
            found = io.output_kind(path)
            if found is not None:
                raise RunDirectoryError(f"{path} holds a scribelm {found}, not a {kind}; choose another output directory")
            io.check_replaceable(path, f"{kind}'s output")  # names what is there; deletes nothing
        return _start(path, kind, recipe, removed=[])
    if marker.get("kind") != kind:
        raise RunDirectoryError(f"{path} holds a scribelm {marker.get('kind')}, not a {kind}; choose another output directory")
    if new:
        return _start(path, kind, recipe, removed=remove_run_files(path, kind))
    manifest = read_run_manifest(path)
    if manifest is None:
        raise RunDirectoryError(
            f"{path} holds a {kind} whose recipe was not recorded (no readable {RUN_MANIFEST}: an earlier scribelm, "
            "or a damaged file); "
            "pass --new to start over there or choose another output directory"
        )
    differ = recipe_differences(manifest["recipe"], recipe, ignore=may_change)
    if differ:
        shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise RunDirectoryError(
            f"{path} holds another {kind} ({shown}); pass --new to start over there (scribelm's checkpoints "
            "and metrics in it are removed, nothing else) or choose another output directory"
        )
    if not resume:
        raise RunDirectoryError(
            f"{path} holds a {kind} and the recipe says resume: false; pass --new to start over there "
            "or choose another output directory"
        )
    changed = recipe_differences(manifest["recipe"], recipe)
    extra = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "recipe")}
    return RunDirectory(path, "resume", changed=changed, manifest=write_run_manifest(path, recipe, **extra))


def _earlier_run(path: Path, kind: str) -> bool:
    """Whether `path` holds only what a run of `kind` writes, and visibly such a run's output."""
    names = set(io.foreign_entries(path))
    if not names or not names <= set(RUN_ENTRIES[kind]) - {RUN_MANIFEST}:
        return False
    if kind == "quickstart":
        return io.output_kind(path / "data") == "shards" or io.output_kind(path / "model") == "checkpoint"
    checkpoints = path / CHECKPOINTS_DIR
    return (path / METRICS_FILE).is_file() or (
        checkpoints.is_dir() and any(re.match(r"^step-\d+$", p.name) for p in checkpoints.iterdir())
    )


def _start(path: Path, kind: str, recipe: dict[str, Any], removed: list[Path]) -> RunDirectory:
    path.mkdir(parents=True, exist_ok=True)
    io.write_output_marker(path, kind, list(RUN_ENTRIES[kind]))
    return RunDirectory(path, "new", removed=removed, manifest=write_run_manifest(path, recipe))


def remove_run_files(path: str | os.PathLike, kind: str) -> list[Path]:
    """Delete what scribelm writes for a run of `kind` in `path`, and nothing else.

    Folders scribelm writes whole (checkpoints, data/, model/) are checked first: one that
    holds a file scribelm did not write stops everything with an error, before anything
    is removed.
    """
    path = Path(path)
    run = path if kind != "quickstart" else path / "run"
    units = [path / "data", path / "model"] if kind == "quickstart" else []
    units += [run / BEST_DIR, *(p for p in (run / CHECKPOINTS_DIR).glob("step-*") if re.match(r"^step-\d+$", p.name))]
    for unit in units:
        io.check_replaceable(unit, "run's output")
    if kind != "quickstart":
        return _remove_trainer_files(path)
    removed = _remove_entries(path, ["data", "model"])
    corpus = path / "corpus"
    removed += _remove_entries(corpus, [_QUICKSTART_CORPUS])
    removed += _remove_trainer_files(path / "run")
    for folder in (corpus, path / "run"):
        _remove_if_empty(folder)
    return removed


def _remove_trainer_files(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    removed = remove_stale_temporaries(out_dir)
    checkpoints = out_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        removed += _remove_entries(checkpoints, [p.name for p in checkpoints.iterdir() if re.match(r"^step-\d+$", p.name)])
        _remove_if_empty(checkpoints)
    removed += _remove_entries(out_dir, (BEST_DIR, METRICS_FILE, PLOT_FILE))
    board = out_dir / TENSORBOARD_DIR
    if board.is_dir():
        removed += _remove_entries(board, [p.name for p in board.iterdir() if p.name.startswith("events.out.tfevents.")])
        _remove_if_empty(board)
    return removed


def _remove_entries(folder: Path, names: Iterable[str]) -> list[Path]:
    removed = []
    for name in names:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif os.path.lexists(entry):
            entry.unlink()
        else:
            continue
        removed.append(entry)
    return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (a user's file) or already gone
