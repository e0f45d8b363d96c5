"""`scribe rag add|search|ask|eval` through the command's entry point."""

from __future__ import annotations

import json

import pytest

from scribelm.cli import main


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, answering_lm):
    """An index built by `scribe rag add` with a small saved model as the embedder (quick to load)."""
    root = tmp_path_factory.mktemp("cli")
    model = answering_lm.save(root / "model")
    docs = root / "docs"
    docs.mkdir()
    (docs / "freedonia.md").write_text("# Freedonia\n\nThe capital of Freedonia is Glorbville. It has ten bridges.")
    (docs / "garden.txt").write_text("Tomatoes need full sun. Basil grows well beside tomatoes.")
    (docs / "blob.bin").write_bytes(b"\x00\xff" * 64)
    return root / "index", docs, model


def test_add_search_and_eval(cli_index, capsys):
    index, docs, model = cli_index
    assert main(["rag", "add", str(index), str(docs), "--embedder", str(model), "--chunk-tokens", "64"]) == 0
    out, err = capsys.readouterr()
    assert "2 added" in out and "1 skipped" in out and "blob.bin: a binary file" in err
    assert main(["rag", "search", str(index), "capital of Freedonia", "--k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["rank"] == 1 and hits[0]["source"].endswith("freedonia.md")
    assert set(hits[0]["scores"]) == {"bm25", "dense", "hybrid"}
    assert main(["rag", "search", str(index), "Glorbville bridges", "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. ") and "freedonia.md [" in out and "bm25 " in out
    queries = index.parent / "q.jsonl"
    queries.write_text(json.dumps({"query": "capital of Freedonia", "relevant": [str(docs / "freedonia.md")]}) + "\n")
    assert main(["rag", "eval", str(index), "--queries", str(queries), "--k", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"]["bm25"] == {"recall@2": 1.0, "mrr@2": 1.0, "ndcg@2": 1.0}


def test_ask_shows_context_and_sources(cli_index, capsys):
    index, docs, model = cli_index
    if not (index / "index.json").exists():
        main(["rag", "add", str(index), str(docs), "--embedder", str(model), "--chunk-tokens", "64"])
        capsys.readouterr()
    assert main(["rag", "ask", str(index), "What is the capital of Freedonia?", "--model", str(model), "--k", "2",
                 "--max-new-tokens", "8", "--temperature", "0", "--json", "--show-context"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["context"][0]["number"] == 1 and data["context"][0]["source"].endswith("freedonia.md")
    assert "[1] (" in data["prompt"] and "Glorbville" in data["prompt"]
    assert isinstance(data["answer"], str)
    assert main(["rag", "ask", str(index), "What is the capital of Freedonia?", "--model", str(model),
                 "--max-new-tokens", "4", "--show-context", "--rerank", "2"]) == 0
    out = capsys.readouterr().out
    assert "Question: What is the capital of Freedonia?" in out
    assert "sources:" in out or "cites none of the" in out


def test_bad_input_is_one_line(cli_index, tmp_path, capsys):
    index, docs, model = cli_index
    (tmp_path / "empty").mkdir()
    assert main(["rag", "add", str(tmp_path / "new"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no files" in err and err.count("\n") == 1
    assert main(["rag", "search", str(tmp_path / "empty"), "x"]) == 2
    assert "not a scribelm retrieval index" in capsys.readouterr().err
    if (index / "index.json").exists():
        assert main(["rag", "add", str(index), str(docs), "--embedder", "minilm"]) == 2
        err = capsys.readouterr().err
        assert "was built with the embedder" in err and err.count("\n") == 1
        assert main(["rag", "ask", str(index), "Why? " * 800, "--model", str(model)]) == 2
        assert "the question takes" in capsys.readouterr().err


def test_embed_dtype_is_recorded_and_kept(cli_index, tmp_path, capsys):
    _, docs, model = cli_index
    index = tmp_path / "idx"
    assert main(["rag", "add", str(index), str(docs), "--embedder", str(model), "--embed-dtype", "float32"]) == 0
    assert json.loads((index / "index.json").read_text())["embedder"]["dtype"] == "float32"
    capsys.readouterr()
    assert main(["rag", "add", str(index), str(docs), "--embed-dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "embeds in float32, not bfloat16" in err and err.count("\n") == 1
    assert main(["rag", "add", str(index), str(docs)]) == 0  # no choice given: the recorded one
    assert "0 embedded now" in capsys.readouterr().out
    assert main(["rag", "search", str(index), "capital of Freedonia", "--mode", "dense", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    # the query was embedded in float32 too: the cosine is the float32 one
    from scribelm import rag

    opened = rag.open_index(index)
    vectors = opened.embedder.embed(["capital of Freedonia", hits[0]["text"]], dtype="float32")
    assert hits[0]["scores"]["dense"] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)
