"""Reading files: every format, offsets into the source, PDF pages, and files that are skipped."""

from __future__ import annotations

import pytest

from scribelm.errors import ScribeError
from scribelm.rag.ingest import find_files, read_file
from tests.rag.conftest import DOCS, ROWS, write_pdf


def test_every_format_is_read_with_its_document_ids(docs):
    files = {f.name: read_file(f) for f in find_files([docs])}
    assert sorted(files) == ["facts.parquet", "freedonia.md", "garden.txt", "manual.pdf", "rows.jsonl", "trains.md"]
    assert files["garden.txt"].documents[0].text == DOCS["garden.txt"]
    assert [(d.doc, d.text) for d in files["rows.jsonl"].documents] == [(r["id"], r["text"]) for r in ROWS]
    assert [d.doc for d in files["facts.parquet"].documents] == ["p-1", "p-2"]
    assert files["trains.md"].documents[0].doc == str(docs / "notes" / "trains.md")


def test_pdf_pages_are_kept_with_offsets(docs):
    (document,) = read_file(docs / "manual.pdf").documents
    assert [number for number, _, _ in document.pages] == [1, 2]
    _, start, end = document.pages[1]
    assert "hold the red button" in document.text[start:end]
    assert "Unplug" not in document.text[start:end]


def test_unreadable_files_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 4)
    write_pdf(tmp_path / "scan.pdf", ["", ""])
    (tmp_path / "bad.jsonl").write_text('{"title": "no text field"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    reasons = {f.name: read_file(f).skipped for f in find_files([tmp_path])}
    assert "binary" in reasons["image.bin"]
    assert "no text layer" in reasons["scan.pdf"]
    assert '"text"' in reasons["bad.jsonl"]
    assert "UTF-8" in reasons["latin1.txt"]


def test_empty_folder_and_missing_path_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScribeError, match="holds no files"):
        find_files([tmp_path / "empty"])
    with pytest.raises(ScribeError, match="does not exist"):
        find_files([tmp_path / "nope"])
