"""Shared pieces for the retrieval tests: the real MiniLM embedder (loaded once), small
document folders in every supported format, and a PDF writer (text layer or none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FREEDONIA = ("Freedonia is a small country in the mountains. Its capital city is Glorbville, "
             "which is famous for its ten stone bridges and its winter cheese market.")
DOCS = {
    "garden.txt": "Tomatoes need full sun and steady watering. Pinch out the side shoots as the plants grow.\n\n"
                  "Basil grows well beside tomatoes. It keeps some pests away and tastes good with them.",
    "notes/freedonia.md": "# Freedonia\n\n" + FREEDONIA,
    "notes/trains.md": "# Trains\n\nThe night train leaves the central station at eleven. "
                       "Sleeping cars must be booked a week ahead.",
}
ROWS = [{"id": "q-1", "text": "The harbour freezes every January, so ships anchor further south."},
        {"id": "q-2", "text": "Bees visit lavender in the early morning when the flowers open."},
        {"id": "q-3", "text": DOCS["garden.txt"]}]  # an exact copy: its chunks are duplicates


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal PDF: one page per string, each drawn as Helvetica text lines (an empty
    string gives a page with no text layer, like a scanned page)."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        lines = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.splitlines()]
        stream = ("BT /F1 11 Tf 14 TL 50 780 Td " + " ".join(f"({line}) Tj T*" for line in lines) + " ET").encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objects)
        resources = b"/Resources << /Font << /F1 3 0 R >> >>" if text else b"/Resources << >>"
        contents = b" /Contents %d 0 R" % content if text else b""
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] " + resources + contents + b" >>")
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % k for k in kids) + b"] /Count %d >>" % len(kids)
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def write_docs(root: Path) -> Path:
    """A folder of text, Markdown, JSONL, Parquet and PDF documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    pq.write_table(pa.table({"id": ["p-1", "p-2"], "text": ["Copper conducts electricity better than iron does.",
                                                            "The violin has four strings tuned in fifths."]}),
                   root / "facts.parquet")
    write_pdf(root / "manual.pdf", ["Unplug the router before cleaning it.",
                                    "To reset the router, hold the red button for ten seconds."])
    return root


@pytest.fixture(scope="session")
def minilm():
    import scribelm
    from scribelm.rag.dense import minilm_path

    return scribelm.load(minilm_path())


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module")
def index(tmp_path_factory, docs, minilm):
    from scribelm import rag

    return rag.build_index(tmp_path_factory.mktemp("idx") / "index", [docs], embedder=minilm, chunk_tokens=40, overlap=8)


@pytest.fixture(scope="session")
def answering_lm():
    """The tiny model trained on the King James Bible, given a longer context (its RoPE
    positions have no learned table, so the weights work past the length it trained at)."""
    import dataclasses

    import scribelm
    from tests.trained_tiny import trained_lm

    trained = trained_lm("llama")
    model = scribelm.Transformer(dataclasses.replace(trained.config, context_length=1024))
    model.load_state_dict(trained.model.state_dict())
    return scribelm.LM(model.eval(), trained.tokenizer, dict(trained.generation_config))
