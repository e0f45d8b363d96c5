"""Lexical retrieval: BM25 through `bm25s`.

Variant and parameters (bm25s' defaults, the scoring Lucene uses):

    score(q, d) = Σ_{t in q} idf(t) · tf(t,d) / (tf(t,d) + k1 · (1 − b + b · |d| / avgdl))
    idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))           method "lucene", k1 = 1.5, b = 0.75

(Lucene's form drops Robertson's constant factor (k1 + 1): the ranking is the same.)

Tokenisation is `bm25s.tokenize`'s: lower-cased, words of two or more word characters
(`\\b\\w\\w+\\b`), English stop words removed, no stemming. A document with score 0
shares no term with the query and is not ranked at all.

The state is bm25s' own files (numpy arrays and JSON, loaded without pickle) in a
folder of the index directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

METHOD, K1, B = "lucene", 1.5, 0.75
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
STOPWORDS = "english"
DESCRIPTION = {"library": "bm25s", "method": METHOD, "k1": K1, "b": B, "token_pattern": TOKEN_PATTERN,
               "lower": True, "stopwords": STOPWORDS, "stemmer": None}


def tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, lower=True, token_pattern=TOKEN_PATTERN, stopwords=STOPWORDS,
                          return_ids=False, show_progress=False)


class BM25Index:
    """BM25 over a fixed list of texts (rebuilt whole when the list changes: the statistics are global)."""

    def __init__(self, retriever) -> None:
        self.retriever = retriever

    @classmethod
    def build(cls, texts: list[str]) -> "BM25Index":
        import bm25s

        retriever = bm25s.BM25(k1=K1, b=B, method=METHOD)
        retriever.index(tokenize(texts), show_progress=False)
        return cls(retriever)

    def save(self, directory: str | os.PathLike) -> None:
        self.retriever.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BM25Index":
        import bm25s

        return cls(bm25s.BM25.load(str(Path(directory)), mmap=False, allow_pickle=False, show_progress=False,
                                   verbosity=0))

    def scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every text for `query` (terms the texts never use count 0)."""
        terms = [t for t in tokenize([query])[0] if t in self.retriever.vocab_dict]
        if not terms:
            return np.zeros(self.retriever.scores["num_docs"], dtype=np.float32)
        return self.retriever.get_scores(terms)

def top_rows(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the best `n` rows with a positive score, best first (ties: lower row first)."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > n:
        positive = positive[np.argpartition(-scores[positive], n - 1)[:n]]
    order = np.lexsort((positive, -scores[positive]))
    rows = positive[order]
    return rows, scores[rows]
