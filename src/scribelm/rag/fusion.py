"""Hybrid retrieval: reciprocal-rank fusion of several rankings.

    rrf(d) = Σ_{rankings r that hold d} 1 / (k + rank_r(d))        rank from 1, k = 60

RRF (Cormack, Clarke and Büttcher 2009) needs no score calibration: BM25 scores and
cosine similarities live on different scales, ranks do not. A document missing from
a ranking adds nothing for it. Ties are broken by the order of first appearance.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K) -> list[tuple[Hashable, float]]:
    """(item, fused score) best first, from rankings listed best first."""
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda pair: (-pair[1], order[pair[0]]))
