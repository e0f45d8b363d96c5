"""Reading the files a user points at into documents.

    path or folder ──walk (sorted, hidden files skipped)──▶ files
        .txt .md .markdown .rst (any UTF-8 text)  one document: the whole file
        .jsonl                                    one document per line: "text", optional "id"
        .parquet                                  one document per row: "text" column, optional "id"
        .pdf                                      one document, its pages' text layers (pypdf),
                                                  page boundaries kept for citations

A document's `doc` id is the file path for whole files and the row's "id" (else
`path#row`) for rows. A file that cannot be read as text (a binary, a PDF without a
text layer, a JSONL without "text") is not an error for a folder: it is skipped with
its reason, and the caller reports the count. Only an input with nothing to index
at all is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from scribelm.errors import ScribeError

PDF_SUFFIX = ".pdf"


@dataclass
class Document:
    """Text to chunk. `pages`: (page number from 1, start, end) offsets into `text` (PDF only)."""

    source: str
    doc: str
    text: str
    pages: list[tuple[int, int, int]] | None = None


@dataclass
class SourceFile:
    """One file found under the paths given, with its content hash."""

    path: Path
    sha256: str
    documents: list[Document] = field(default_factory=list)
    skipped: str | None = None  # why nothing of it is indexed


def find_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Every non-hidden file under `paths`, sorted, resolved; ScribeError for a missing path or
    an input with no files at all."""
    if not paths:
        raise ScribeError("no paths to index were given")
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise ScribeError(f"{path} does not exist")
        if path.is_file():
            found.append(path.resolve())
            continue
        inside = sorted(p.resolve() for p in path.rglob("*")
                        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not inside:
            raise ScribeError(f"{path} holds no files to index")
        found.extend(inside)
    return list(dict.fromkeys(found))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: Path, sha256: str | None = None) -> SourceFile:
    """The documents of one file, or the reason it is skipped."""
    sha256 = sha256 or file_sha256(path)
    source = SourceFile(path, sha256)
    suffix = path.suffix.lower()
    try:
        if suffix == PDF_SUFFIX:
            source.documents = _read_pdf(path)
        elif suffix == ".jsonl":
            source.documents = _read_jsonl(path)
        elif suffix == ".parquet":
            source.documents = _read_parquet(path)
        else:
            source.documents = _read_text(path)
    except _Skip as reason:
        source.skipped = str(reason)
    if not source.skipped and not any(d.text.strip() for d in source.documents):
        source.skipped = "no text in it"
    return source


class _Skip(Exception):
    """Why a file holds nothing to index."""


def _read_text(path: Path) -> list[Document]:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise _Skip("a binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Skip("not UTF-8 text (a binary file?)") from None
    return [Document(str(path), str(path), text)]


def _row_document(path: Path, number: int, row: object) -> Document:
    where = f"{path} row {number + 1}"
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise _Skip(f'{where} has no "text" string field')
    doc = row.get("id")
    return Document(str(path), str(doc) if doc is not None else f"{path}#{number + 1}", row["text"])


def _read_jsonl(path: Path) -> list[Document]:
    documents = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise _Skip(f"line {number + 1} is not valid JSON ({err})") from None
                    documents.append(_row_document(path, number, row))
    except UnicodeDecodeError:
        raise _Skip("not UTF-8 text (a binary file?)") from None
    return documents


def _read_parquet(path: Path) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors for a file that is not Parquet are of several types
        raise _Skip(f"not a readable Parquet file ({str(err).splitlines()[0]})") from None
    if "text" not in table.column_names:
        raise _Skip(f'no "text" column (columns: {", ".join(table.column_names)})')
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(texts)
    return [_row_document(path, n, {"text": t, "id": i}) for n, (t, i) in enumerate(zip(texts, ids))]


def _read_pdf(path: Path) -> list[Document]:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about odd files are ours to summarise
    try:
        reader = PdfReader(path)
        page_texts = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, OSError) as err:
        raise _Skip(f"not a readable PDF ({err})") from None
    if not any(t.strip() for t in page_texts):
        raise _Skip("a PDF with no text layer (scanned pages need OCR first)")
    text, pages = "", []
    for number, page_text in enumerate(page_texts, start=1):
        if text:
            text += "\n\n"
        pages.append((number, len(text), len(text) + len(page_text)))
        text += page_text
    return [Document(str(path), str(path), text, pages)]
