"""Re-ranking retrieved passages by the answering model's own log-likelihood.

A retriever ranks passages by word overlap or by an encoder's similarity; the model
that will answer can judge too. For each of the top candidates it scores how likely
the question is after the passage (unsupervised passage re-ranking, Sachan et al. 2022):

    rerank score = log p("Question: <question>" | "Passage: <passage text>\\n")

summed over the question's tokens (the same tokens after every passage, so the sums
compare directly). One forward pass per passage, batched (`scribelm.evaluate.scoring`).
Passages below the top `top` keep their order after the re-ranked ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from scribelm.errors import ScribeError


def rerank(question: str, hits: list[Any], lm, *, top: int | None = None, batch_size: int = 8) -> list[Any]:
    """The hits, the first `top` (default all) re-ordered by log p(question | passage);
    each re-ranked hit gets `scores["rerank"]` and that as its `score`; ranks renumbered."""
    from scribelm.evaluate.scoring import loglikelihood

    if not isinstance(question, str) or not question.strip():
        raise ScribeError("the question is empty")
    if lm.tokenizer is None:
        raise ScribeError("re-ranking needs a model with a tokenizer")
    top = len(hits) if top is None else top
    head, tail = hits[:top], hits[top:]
    requests = [(f"Passage: {hit.chunk.text.strip()}\n", f"Question: {question.strip()}") for hit in head]
    scores = [logprob for logprob, _ in loglikelihood(lm, requests, batch_size=batch_size)] if requests else []
    order = sorted(range(len(head)), key=lambda i: -scores[i])
    ranked = [replace(head[i], score=scores[i], scores={**head[i].scores, "rerank": scores[i]}) for i in order] + tail
    return [replace(hit, rank=n) for n, hit in enumerate(ranked, 1)]
