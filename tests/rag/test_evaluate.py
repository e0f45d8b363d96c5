"""Retrieval metrics equal ranx's on the same runs; the bundled set is well formed."""

from __future__ import annotations

import json

import pytest

from scribelm.errors import ScribeError
from scribelm.rag.evaluate import evaluate, read_queries
from scribelm.rag.kjv_eval import QUERY_FILE, gospel_chapters
from tests.rag.ranx_peer import ranx

QUERIES = [
    {"query": "how do I reset the router", "relevant": ["{docs}/manual.pdf"]},
    {"query": "capital of Freedonia", "relevant": ["{docs}/notes/freedonia.md", "q-1"]},
    {"query": "which plants grow beside tomatoes", "relevant": ["{docs}/garden.txt", "q-3"]},
    {"query": "frozen harbour in January", "relevant": ["q-1"]},
    {"query": "what conducts electricity", "relevant": ["p-1"]},
    {"query": "night train sleeping cars", "relevant": ["{docs}/notes/trains.md"]},
    {"query": "bees and lavender flowers", "relevant": ["p-2"]},  # wrong on purpose: not found
]


@pytest.fixture(scope="module")
def queries(docs, tmp_path_factory):
    file = tmp_path_factory.mktemp("queries") / "q.jsonl"
    file.write_text("".join(json.dumps({"query": q["query"], "relevant": [r.format(docs=docs) for r in q["relevant"]]}) + "\n"
                            for q in QUERIES))
    return read_queries(file)


def test_metrics_equal_ranx(index, queries):
    ours, tasks = [], []
    for k in (1, 3):
        results, runs = evaluate(index, queries, k=k)
        for mode in results:
            run = {q["id"]: {unit: float(len(runs[mode][q["id"]]) - i) for i, unit in enumerate(runs[mode][q["id"]])}
                   for q in queries}
            qrels = {q["id"]: dict.fromkeys(q["relevant"], 1) for q in queries}
            tasks.append({"qrels": qrels, "run": run, "metrics": [f"recall@{k}", f"mrr@{k}", f"ndcg@{k}"]})
            ours.append(results[mode])
        assert 0 < results["hybrid"][f"mrr@{k}"] < 1
    for mine, theirs in zip(ours, ranx({"evaluate": tasks})["evaluate"]):
        assert mine == pytest.approx(theirs, abs=1e-12)


def test_bad_query_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"query": "x", "relevant": "not a list"}\n')
    with pytest.raises(ScribeError, match="line 1: expected"):
        read_queries(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"query": \n')
    with pytest.raises(ScribeError, match="not valid JSON"):
        read_queries(tmp_path / "broken.jsonl")
    with pytest.raises(ScribeError, match="does not exist"):
        read_queries(tmp_path / "none.jsonl")


def test_bundled_gospel_questions_name_the_one_chapter_holding_the_words():
    chapters = {c["id"]: c["text"] for c in gospel_chapters()}
    assert len(chapters) == 89
    queries = read_queries(QUERY_FILE)
    assert len(queries) == 100
    for query in queries:
        words = query["query"].removeprefix("Who said: ").removesuffix("?")
        (chapter,) = query["relevant"]
        assert words in chapters[chapter]
        assert [name for name, text in chapters.items() if words in text] == [chapter]
