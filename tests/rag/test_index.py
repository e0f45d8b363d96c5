"""The index directory: updates embed only what changed, duplicates are dropped, the
embedder is checked, bad inputs get one-line errors, and kill -9 never leaves half an index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scribelm import rag
from scribelm.errors import ScribeError
from tests.rag.conftest import write_pdf

REPO = Path(__file__).resolve().parents[2]


def test_index_directory_layout_and_chunks(index, docs):
    files = set(os.listdir(index.path))
    assert {"index.json", "chunks.jsonl", "bm25", "dense.faiss"} <= files
    manifest = json.loads((index.path / "index.json").read_text())
    assert manifest["embedder"]["name"] == "MiniLM-L6-H384-uncased" or manifest["embedder"]["hash"]
    assert manifest["bm25"]["method"] == "lucene" and manifest["dense"]["kind"] == "flat"
    assert len(manifest["files"]) == 6
    for chunk in index.chunks:
        if chunk.doc == chunk.source and not chunk.source.endswith(".pdf"):
            assert Path(chunk.source).read_text()[chunk.start:chunk.end] == chunk.text
    pages = {chunk.page for chunk in index.chunks if chunk.source.endswith("manual.pdf")}
    assert pages == {1, 2}
    assert index.search("hold the red button to reset", k=1, mode="bm25")[0].chunk.page == 2


def test_duplicate_chunks_are_dropped(index):
    # rows.jsonl's third row repeats garden.txt exactly
    texts = [chunk.text for chunk in index.chunks]
    assert len(texts) == len(set(texts))
    assert index.manifest["duplicates"] >= 1
    assert any(row.get("duplicate") for row in index.rows)


def test_update_embeds_only_new_or_changed_files(tmp_path, minilm):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Owls hunt at night. They fly without a sound.")
    (docs / "b.txt").write_text("Salt is mined in the hills. It is carried down by mule.")
    (docs / "c.txt").write_text("The keeper lives alone.")
    index = rag.build_index(tmp_path / "idx", [docs], embedder=minilm, chunk_tokens=8, overlap=0)
    assert index.last_report.chunks_embedded == len(index) == 5
    (docs / "b.txt").write_text("Salt is mined in the hills. It is carried down by train now.")
    (docs / "c.txt").unlink()
    (docs / "d.txt").write_text("Owls hunt at night.")  # a duplicate of a.txt's first chunk
    index = rag.build_index(tmp_path / "idx", [docs], embedder=minilm)
    report = index.last_report
    assert report.updated == [str(docs / "b.txt")] and report.added == [str(docs / "d.txt")]
    assert report.removed == [str(docs / "c.txt")] and report.unchanged == [str(docs / "a.txt")]
    assert report.chunks_embedded == 1  # only "It is carried down by train now."
    assert len(index) == 4 and report.duplicates == 1
    again = rag.build_index(tmp_path / "idx", [docs], embedder=minilm).last_report
    assert again.chunks_embedded == 0 and len(again.unchanged) == 3
    reopened = rag.open_index(tmp_path / "idx", embedder=minilm)
    assert reopened.search("carried by train", k=1)[0].chunk.text == "It is carried down by train now."
    assert "keeper" not in " ".join(c.text for c in reopened.chunks)
    inside = rag.build_index(docs / "index", [docs], embedder=minilm, chunk_tokens=8, overlap=0)
    inside = rag.build_index(docs / "index", [docs], embedder=minilm)  # again: its own files are not documents
    assert inside.last_report.chunks_embedded == 0 and not inside.last_report.added
    assert not [c for c in inside.chunks if "/index/" in c.source]


def test_another_embedder_is_refused(index, answering_lm, tmp_path):
    with pytest.raises(ScribeError, match="was built with the embedder .* cannot be compared"):
        rag.open_index(index.path, embedder=answering_lm)
    with pytest.raises(ScribeError, match="was built with the embedder"):
        rag.build_index(index.path, [tmp_path], embedder=answering_lm)


def test_bad_inputs_get_one_line_errors(tmp_path, minilm):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScribeError, match="holds no files"):
        rag.build_index(tmp_path / "i1", [tmp_path / "empty"], embedder=minilm)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.bin").write_bytes(b"\x00\x01" * 100)
    write_pdf(tmp_path / "junk" / "scan.pdf", [""])
    with pytest.raises(ScribeError, match=r"nothing to index: no text found in 2 file\(s\)"):
        rag.build_index(tmp_path / "i2", [tmp_path / "junk"], embedder=minilm)
    assert not (tmp_path / "i2").exists()
    with pytest.raises(ScribeError, match="not a scribelm retrieval index"):
        rag.open_index(tmp_path / "junk")
    (tmp_path / "note.txt").write_text("One short note.")
    built = rag.build_index(tmp_path / "ok", [tmp_path / "junk", tmp_path / "note.txt"], embedder=minilm)
    assert len(built) == 1 and len(built.last_report.skipped) == 2
    damaged = shutil.copytree(built.path, tmp_path / "damaged")
    (damaged / "dense.faiss").write_bytes(b"not faiss")
    with pytest.raises(ScribeError, match="is damaged"):
        rag.open_index(damaged)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("my own file")
    with pytest.raises(ScribeError, match="not written by scribelm"):
        rag.build_index(tmp_path / "mine", [tmp_path / "junk"], embedder=minilm)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "my own file"


def _add(index: Path, docs: Path, embedder: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "scribelm.cli", "rag", "add", str(index), str(docs),
                             "--embedder", embedder, "--chunk-tokens", "24", "--overlap", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_kill_during_add_leaves_a_complete_index(tmp_path, answering_lm):
    model = answering_lm.save(tmp_path / "embedder")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "one.txt").write_text("The first file is short. It has two sentences.")
    before = rag.build_index(tmp_path / "idx", [docs], embedder=str(model), chunk_tokens=24, overlap=4)
    for n in range(40):
        (docs / f"more{n}.txt").write_text(f"Extra file number {n} talks about the river zz{n}. " * 12)
    child = _add(tmp_path / "idx", docs, str(model))
    deadline = time.time() + 300
    while child.poll() is None and time.time() < deadline:  # kill it while it writes the new directory
        if any(p.name.startswith(".idx.tmp-") for p in tmp_path.iterdir()):
            break
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL  # it was still running: killed mid-add
    survivor = rag.open_index(tmp_path / "idx")  # the old index or the new one, whole
    assert len(survivor.manifest["files"]) in (1, 41)
    assert len(survivor.chunks) == survivor.manifest["chunks"] == len(survivor.dense) >= len(before)
    final = rag.build_index(tmp_path / "idx", [docs])  # run again: the embedder recorded in the index
    assert len(final.manifest["files"]) == 41
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.")]
    assert final.search("zz7", k=1, mode="bm25")[0].chunk.source.endswith("more7.txt")
    shutil.rmtree(model)
