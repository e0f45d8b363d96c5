"""Reading a corpus: files and folders in, clean documents out.

    inputs (.txt/.md/..., .jsonl, .parquet, directories of them)
      │ find + check every file   folders expanded recursively, sorted, hidden files skipped;
      │                           empty or binary files refused before any work (named by line)
      │ stream documents          text: paragraphs (blank-line separated) or whole files
      │                           jsonl: the "text" field of each line; parquet: the "text" column
      │ normalize                 \\r\\n and \\r -> \\n; strip surrounding whitespace
      ▼ drop empty + exact duplicates (blake2b of the normalized text, which also splits
                                  train from validation, stable under reordering)

Shared by `scribe prepare` (`scribelm.data.prepare`) and tokenizer training from files;
it knows nothing of tokens.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
import os
from dataclasses import dataclass
from pathlib import Path

from scribelm.errors import ScribeError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_SCAN_CHUNK = 1 << 20


class DataError(ScribeError, ValueError):
    """Input data that cannot be read or prepared."""


# ----------------------------------------------------------------------------- inputs


def find_input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (recursively, sorted, hidden files skipped) and check every file up front."""
    if not inputs:
        raise DataError("no input files given; pass text, JSONL or Parquet files or directories")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input not found: {path}")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"input directory {path} holds no files")
            files.extend(found)
        else:
            files.append(path)
    for f in files:
        try:
            check_input_file(f)
        except OSError as err:  # unreadable (permissions, a vanished file, an I/O error)
            raise DataError(f"cannot read {f} ({err.strerror or err}); check the file and its permissions") from None
    return files


def check_input_file(path: Path) -> None:
    """Refuse empty files and binary files (a NUL byte or invalid UTF-8 anywhere, named by
    line) before any work is done. The whole file is read, in chunks: a binary tail after
    a text head must not reach the training data."""
    if path.stat().st_size == 0:
        raise DataError(f"input file is empty: {path}")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise DataError(f"{path} has a .parquet name but is not a Parquet file")
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 0  # newlines in the chunks already read
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                line = lines_before + chunk.count(b"\n", 0, nul) + 1
                raise DataError(f"{path} looks binary (a NUL byte on line {line}); give UTF-8 text, JSONL or Parquet files")
            carried = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line = lines_before + chunk.count(b"\n", 0, max(err.start - carried, 0)) + 1
                raise DataError(f"{path} is not UTF-8 text (a bad byte on line {line}); convert it to UTF-8") from None
            lines_before += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (it ends inside a character, line {lines_before + 1}); "
                        "convert it to UTF-8") from None


def normalize(text: str) -> str:
    """Unix line endings, no surrounding whitespace."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def iter_documents(path: Path, *, text_field: str = "text", text_unit: str = "paragraph",
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Raw documents of one file, streamed. `on_bytes(n)` is told how much input was consumed."""
    report = on_bytes or (lambda n: None)
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_documents(path, text_field, report)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text_field, report)
    elif text_unit == "file":
        yield _read_text(path, report)
    else:
        yield from _paragraphs(path, report)


def _read_text(path: Path, report) -> str:
    data = path.read_bytes()
    report(len(data))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8") from None


def _lines(path: Path, report) -> Iterator[tuple[int, str]]:
    # newline="" keeps \r\n as is, so normalization (not Python) decides what a line ending becomes.
    with open(path, encoding="utf-8", newline="") as f:
        number = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text (bad bytes after line {number}); convert it to UTF-8") from None
            if not line:
                return
            number += 1
            report(len(line.encode("utf-8")))
            yield number, line


def _paragraphs(path: Path, report) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _lines(path, report):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph)
            paragraph = []
    if paragraph:
        yield "".join(paragraph)


def _jsonl_documents(path: Path, text_field: str, report) -> Iterator[str]:
    for number, line in _lines(path, report):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not valid JSON ({err.msg}); fix or remove that line") from None
        except RecursionError:
            raise DataError(f"{path}:{number} is nested too deeply to be a record; fix or remove that line") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number} has no '{text_field}' field (it has: {keys}); choose one with --text-field")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field '{text_field}' must be a string, got {type(value).__name__}")
        _check_text(value, f"{path}:{number}: field '{text_field}'", "fix or remove that line")
        yield value


def _check_text(value: str, where: str, fix: str) -> None:
    """Text decoded from an escape-capable format (JSON, Parquet) that is not text: a NUL
    character, or a lone surrogate such as "\\ud800", which has no UTF-8 form."""
    if "\x00" in value:
        raise DataError(f"{where} holds a NUL character (\\u0000), which is not text; {fix}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(value[err.start])
        raise DataError(f"{where} holds an unpaired surrogate (\\u{code:04x}), which is not text; {fix}") from None


def _parquet_documents(path: Path, text_field: str, report) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'scribelm[data]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types
        raise DataError(f"{path} is not a readable Parquet file ({err})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no '{text_field}' column (it has: {', '.join(names)}); choose one with --text-field")
    size = path.stat().st_size
    rows = max(parquet.metadata.num_rows, 1)
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        column = batch.column(0).to_pylist()
        report(int(size * len(column) / rows))
        for value in column:
            row += 1
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}: column '{text_field}' must hold strings, got {type(value).__name__}")
            _check_text(value, f"{path}: row {row} of column '{text_field}'", "clean that row")
            yield value


# ----------------------------------------------------------------------------- documents


@dataclass
class SourceStats:
    path: str
    bytes: int = 0
    documents: int = 0
    empty: int = 0
    duplicates: int = 0


def document_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_validation(digest: bytes, val_fraction: float) -> bool:
    """The split is a function of the document's content: same text, same side, whatever the order."""
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def iter_clean_documents(files: Sequence[Path], *, text_field: str = "text", text_unit: str = "paragraph",
                         stats: list[SourceStats] | None = None,
                         on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, bytes]]:
    """(normalized text, hash) of every non-empty, first-seen document, in input order."""
    seen: set[bytes] = set()
    for path in files:
        source = SourceStats(str(path), bytes=path.stat().st_size)
        if stats is not None:
            stats.append(source)
        for raw in iter_documents(path, text_field=text_field, text_unit=text_unit, on_bytes=on_bytes):
            text = normalize(raw)
            if not text:
                source.empty += 1
                continue
            digest = document_hash(text)
            if digest in seen:
                source.duplicates += 1
                continue
            seen.add(digest)
            source.documents += 1
            yield text, digest
