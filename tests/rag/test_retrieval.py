"""The three retrievers against their references: bm25s and the documented BM25 formula,
brute-force numpy cosine search, and ranx's reciprocal-rank fusion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scribelm.errors import ScribeError
from scribelm.rag.bm25 import tokenize
from scribelm.rag.dense import DenseIndex
from tests.rag.ranx_peer import ranx

QUERIES = ["How do I reset the router?", "capital city of Freedonia with stone bridges",
           "which plants grow beside tomatoes", "when does the night train leave", "frozen harbour ships"]


def test_bm25_equals_bm25s_and_the_lucene_formula(index):
    import bm25s

    texts = [chunk.text for chunk in index.chunks]
    reference = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    reference.index(bm25s.tokenize(texts, stopwords="english", return_ids=False, show_progress=False), show_progress=False)
    docs = tokenize(texts)
    avgdl = sum(map(len, docs)) / len(docs)
    for query in QUERIES:
        terms = [t for t in bm25s.tokenize([query], stopwords="english", return_ids=False, show_progress=False)[0]
                 if t in reference.vocab_dict]
        expected = reference.get_scores(terms)
        hits = index.search(query, k=len(texts), mode="bm25")
        ours = np.zeros(len(texts))
        for hit in hits:
            ours[texts.index(hit.chunk.text)] = hit.scores["bm25"]
        np.testing.assert_allclose(ours, expected, atol=1e-6)
        by_hand = [sum(math.log(1 + (len(docs) - df + 0.5) / (df + 0.5)) * tf / (tf + 1.5 * (0.25 + 0.75 * len(d) / avgdl))
                       for t in set(terms) for df in [sum(t in e for e in docs)] for tf in [d.count(t)])
                   for d in docs]
        np.testing.assert_allclose(ours, by_hand, rtol=1e-5, atol=1e-6)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(h.score > 0 for h in hits)


def test_dense_top10_equals_numpy_brute_force(index, minilm):
    vectors = minilm.embed([chunk.text for chunk in index.chunks]).numpy()
    for query in QUERIES:
        q = minilm.embed([query]).numpy()[0]
        cosine = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
        expected = np.argsort(-cosine, kind="stable")[:10]
        hits = index.search(query, k=10, mode="dense")
        assert [index.chunks.index(h.chunk) for h in hits] == expected.tolist()
        np.testing.assert_allclose([h.score for h in hits], cosine[expected], atol=1e-5)


def test_hnsw_past_the_threshold_finds_nearly_all_neighbours():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    approximate = DenseIndex.build(vectors, approximate_from=1000)
    assert approximate.kind == "hnsw" and DenseIndex.build(vectors[:999], approximate_from=1000).kind == "flat"
    found = 0
    for q in vectors[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32):
        exact = set(np.argsort(-(vectors @ q))[:10].tolist())
        rows, _ = approximate.top(q, 10)
        found += len(exact & set(rows.tolist()))
    assert found / 500 >= 0.95


def test_hybrid_is_ranx_reciprocal_rank_fusion(index):
    runs, ours = [], []
    for query in QUERIES:
        lexical = index.search(query, k=len(index), mode="bm25")
        semantic = index.search(query, k=len(index), mode="dense")
        runs.append([{"q": {h.chunk.id: float(len(hits) - h.rank) for h in hits}} for hits in (lexical, semantic)])
        hybrid = index.search(query, k=len(index), mode="hybrid", candidates=len(index))
        assert [h.rank for h in hybrid] == list(range(1, len(hybrid) + 1))
        assert all(set(h.scores) == {"bm25", "dense", "hybrid"} for h in hybrid)
        ours.append({h.chunk.id: h.score for h in hybrid})
    expected = ranx({"fuse": runs, "k": 60})["fuse"]
    for mine, theirs in zip(ours, expected):
        assert mine == pytest.approx(theirs["q"], abs=1e-12)


def test_bad_queries(index):
    with pytest.raises(ScribeError, match="empty"):
        index.search("  ")
    with pytest.raises(ScribeError, match="unknown search mode"):
        index.search("router", mode="fuzzy")
    with pytest.raises(ScribeError, match="positive"):
        index.search("router", k=0)
