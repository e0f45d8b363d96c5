"""How good is the retrieval: recall@k, MRR@k and nDCG@k per search mode.

A query file holds one JSON object per line:

    {"query": "Who said: Follow me, and I will make you fishers of men?", "relevant": ["Matthew 4"]}

`relevant` lists chunk ids, document ids (a JSONL/Parquet row's "id", else a file's path)
or source paths. A search's hits are turned into a ranking of those units: each hit
counts as the first relevant id it matches, else as its document, and a unit already
ranked higher is not counted again (several chunks of one chapter are one answer).
Over the top `k` units, with R the relevant set (binary relevance):

    recall@k = |R ∩ top-k| / |R|
    MRR@k    = 1 / rank of the first relevant unit (0 if none in the top k)
    nDCG@k   = Σ_{relevant at rank i ≤ k} 1/log2(i + 1)  /  Σ_{i ≤ min(|R|, k)} 1/log2(i + 1)

each averaged over the queries; the same definitions as `ranx`'s recall, mrr and ndcg.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from scribelm.errors import ScribeError
from scribelm.rag.store.index import MODES, Index

METRICS = ("recall", "mrr", "ndcg")


def read_queries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """[{"query": str, "relevant": [str, ...]}, ...] from a JSONL file, each line checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScribeError(f"{path} does not exist")
    queries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ScribeError(f"{path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScribeError(f"{path} line {number} is not valid JSON ({err})") from None
        relevant = row.get("relevant") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip() \
                or not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) for r in relevant):
            raise ScribeError(f'{path} line {number}: expected {{"query": "...", "relevant": ["id", ...]}}')
        queries.append({"query": row["query"], "relevant": relevant, "id": str(row.get("id", number))})
    if not queries:
        raise ScribeError(f"{path} holds no queries")
    return queries


def ranked_units(hits: list[Any], relevant: set[str]) -> list[str]:
    """The hits as a ranking of relevant ids / documents, each counted once (see the module docstring)."""
    units: list[str] = []
    for hit in hits:
        chunk = hit.chunk
        unit = next((r for r in (chunk.id, chunk.doc, chunk.source) if r in relevant), chunk.doc)
        if unit not in units:
            units.append(unit)
    return units


def recall_at(ranking: list[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at(ranking: list[str], relevant: set[str], k: int) -> float:
    return next((1.0 / i for i, unit in enumerate(ranking[:k], 1) if unit in relevant), 0.0)


def ndcg_at(ranking: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 1) for i, unit in enumerate(ranking[:k], 1) if unit in relevant)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def evaluate(index: Index, queries: list[dict[str, Any]], *, k: int = 10, modes: tuple[str, ...] = MODES,
             depth: int | None = None) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[str]]]]:
    """({mode: {"recall@k": .., "mrr@k": .., "ndcg@k": ..}}, {mode: {query id: ranking}}).
    `depth`: how many chunks each search returns before they are merged into units (default 5k)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ScribeError(f"k must be a positive integer, got {k!r}")
    for mode in modes:
        if mode not in MODES:
            raise ScribeError(f"unknown search mode {mode!r}; choose from {', '.join(MODES)}")
    results, runs = {}, {}
    for mode in modes:
        totals = dict.fromkeys(METRICS, 0.0)
        runs[mode] = {}
        for query in queries:
            relevant = set(query["relevant"])
            ranking = ranked_units(index.search(query["query"], k=depth or 5 * k, mode=mode), relevant)[:k]
            runs[mode][query["id"]] = ranking
            totals["recall"] += recall_at(ranking, relevant, k)
            totals["mrr"] += mrr_at(ranking, relevant, k)
            totals["ndcg"] += ndcg_at(ranking, relevant, k)
        results[mode] = {f"{name}@{k}": value / len(queries) for name, value in totals.items()}
    return results, runs
