"""Results as lm-evaluation-harness's familiar table, one column per model, and as JSON.

    |    Task     |n-shot|  Metric  |   | Value |   |Stderr|
    |-------------|-----:|----------|---|------:|---|-----:|
    |kjv_cloze    |     0|acc       |↑  | 0.1200|±  |0.0326|

With several models each metric has a "value ± stderr" column per model and,
against the first model, the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scribelm.evaluate.metrics import AGGREGATES
from scribelm.evaluate.runner import TaskResult


def _number(x: float) -> str:
    if math.isnan(x):
        return "N/A"
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"


def _signed(x: float) -> str:
    return "N/A" if math.isnan(x) else (f"{x:+.4f}" if abs(x) < 1e5 else f"{x:+.4g}")


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"
    rule = "|" + "|".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def results_table(per_model: Sequence[tuple[str, Sequence[TaskResult]]]) -> str:
    """One model: lm-eval's columns. Several: a value ± stderr column each and the change
    from the first model."""
    if len(per_model) == 1:
        rows = []
        for r in per_model[0][1]:
            for metric, (value, stderr) in r.metrics.items():
                arrow = "↑" if AGGREGATES[metric][2] else "↓"
                rows.append([r.name, str(r.num_fewshot), metric, arrow, _number(value), "±", _number(stderr)])
        return _markdown(["Task", "n-shot", "Metric", "", "Value", "", "Stderr"], rows, {1, 4, 6})
    names = [name for name, _ in per_model]
    header = ["Task", "n-shot", "Metric", ""] + names + [f"{n} − {names[0]}" for n in names[1:]]
    rows = []
    first = per_model[0][1]
    for t, r in enumerate(first):
        for metric in r.metrics:
            arrow = "↑" if AGGREGATES[metric][2] else "↓"
            cells, values = [r.name, str(r.num_fewshot), metric, arrow], []
            for _, results in per_model:
                value, stderr = results[t].metrics.get(metric, (float("nan"), float("nan")))
                values.append(value)
                cells.append(f"{_number(value)} ± {_number(stderr)}")
            cells += [_signed(values[i] - values[0]) for i in range(1, len(values))]
            rows.append(cells)
    return _markdown(header, rows, set(range(4, len(header))) | {1})


def results_json(per_model: Sequence[tuple[str, Sequence[TaskResult]]]) -> dict[str, Any]:
    return {"models": [{"model": name, "results": [r.to_dict() for r in results]} for name, results in per_model]}
