"""Task data: local files in, documents out, each knowing where it came from.

    dataset_path: json      JSON lines (one object a line) or one JSON array of objects
                  csv       a header line, then rows (types inferred as `datasets` would)
                  parquet   columns
                  text      one document {"text": line} per line
    dataset_kwargs.data_files: a path, a list of paths ("train"), or {split: path(s)}

Relative paths are read next to the task's YAML file, else from the working
directory. Nothing is downloaded: a hub dataset or a URL is refused with what
to do instead. Every document keeps its origin ("data.jsonl line 7") so that a
template naming a missing field, or a label out of range, can say where.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scribelm.errors import ScribeError

FORMATS = ("json", "csv", "parquet", "text")


class TaskError(ScribeError):
    """A task file or its data that cannot be evaluated."""



@dataclass
class Doc:
    """One document (a row of the data) and where it came from, for error messages."""

    fields: dict[str, Any]
    origin: str  # "data.jsonl line 7"


def _resolve_data_path(name: str, yaml_dir: Path) -> Path:
    if re.match(r"^[a-z][a-z0-9+.-]*://", name):
        raise TaskError(f"data file {name} is a URL; scribe eval reads local files only: download it and point data_files at it")
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and (yaml_dir / candidate).exists():
        return yaml_dir / candidate
    return candidate


def _plain(value: Any) -> Any:
    """numpy / pandas scalars and arrays as Python values, as `datasets` hands them out."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return value


def read_data_file(path: Path, fmt: str) -> list[Doc]:
    if not path.is_file():
        raise TaskError(f"missing data file {path}")
    docs: list[Doc] = []
    if fmt == "json":
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}: not valid JSON ({err})") from None
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise TaskError(f"{path} item {i}: each document is a JSON object, got {type(row).__name__}")
                docs.append(Doc(row, f"{path.name} item {i}"))
            return docs
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path} line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path} line {n}: each line is a JSON object, got {type(row).__name__}")
            docs.append(Doc(row, f"{path.name} line {n}"))
        return docs
    if fmt == "text":
        return [Doc({"text": line}, f"{path.name} line {n}")
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
    import pandas as pd

    try:
        frame = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many kinds; the message is what matters
        raise TaskError(f"{path}: cannot read as {fmt} ({str(err).splitlines()[0]})") from None
    offset = 2 if fmt == "csv" else 0  # csv: line 1 is the header
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{path.name} line {i + offset}" if fmt == "csv" else f"{path.name} row {i}"
        docs.append(Doc({k: _plain(v) for k, v in row.items()}, where))
    return docs


def load_splits(config: dict[str, Any], yaml_path: Path) -> dict[str, list[Doc]]:
    """The task's data, split name -> documents, from local files only."""
    name = config.get("task", yaml_path.stem)
    fmt = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    check_local_dataset(config, name)
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if not files:
        raise TaskError(f"task {name}: dataset_path {fmt} needs dataset_kwargs.data_files (local files, "
                        "e.g. {test: data.jsonl})")
    if not isinstance(files, dict):
        files = {"train": files}
    splits = {}
    for split, paths in files.items():
        paths = [paths] if isinstance(paths, str) else list(paths)
        splits[str(split)] = [d for p in paths for d in read_data_file(_resolve_data_path(str(p), yaml_path.parent), fmt)]
    return splits


def check_local_dataset(config: dict[str, Any], name: str) -> None:
    """Refuse, before anything else, a task whose data would come from the network."""
    fmt = config.get("dataset_path")
    if fmt not in FORMATS:
        if not fmt:
            raise TaskError(f"task {name}: no dataset_path; use dataset_path: json (or csv, parquet, text) "
                            "with dataset_kwargs.data_files pointing at local files")
        raise TaskError(f"task {name}: dataset_path {fmt!r} is not a local format; scribe eval does not download "
                        "datasets: save the data as JSON lines (or csv, parquet, text), set dataset_path: json "
                        "and point dataset_kwargs.data_files at the files")
