"""A sparse autoencoder's report as one self-contained HTML page: the numbers that
judge it, and for each shown feature the contexts that excite it most, the
exciting token highlighted with a strength proportional to its activation.
No scripts, no network: it opens from the file."""

from __future__ import annotations

import html
from typing import Any

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left}th{background:#eee}
.feature{margin:1.2em 0;border-top:1px solid #ddd;padding-top:.5em}
.context{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:2px 0}
mark{border-radius:3px;padding:0 1px}.act{color:#888;display:inline-block;width:5em}
"""

METRIC_LABELS = {
    "explained_variance": "explained variance (1 − MSE/Var)",
    "l0": "L0 (features active per token)",
    "dead_fraction": "dead features (never fire)",
    "loss_clean": "next-token loss, clean",
    "loss_spliced": "next-token loss, reconstruction spliced in",
    "loss_increase": "loss increase",
    "loss_zero_ablated": "next-token loss, activation zeroed",
    "loss_recovered": "share of the loss recovered",
}


def render_sae_report(title: str, metrics: dict[str, Any], contexts: dict[int, list[dict[str, Any]]],
                      firing_counts: list[int] | None = None) -> str:
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{metrics[key]:.4g}</td></tr>"
                   for key, label in METRIC_LABELS.items() if key in metrics)
    features = []
    for feature, entries in contexts.items():
        top = max((e["activation"] for e in entries), default=0.0) or 1.0
        lines = []
        for e in entries:
            alpha = 0.15 + 0.85 * e["activation"] / top
            lines.append(
                f'<div class="context"><span class="act">{e["activation"]:.3g}</span>{html.escape(e["before"])}'
                f'<mark style="background:rgba(255,140,0,{alpha:.2f})">{html.escape(e["token"])}</mark>'
                f'{html.escape(e["after"])}</div>'
            )
        fired = f" — fires on {firing_counts[feature]} tokens" if firing_counts is not None else ""
        features.append(f'<div class="feature" id="feature-{feature}"><b>feature {feature}</b>{fired}'
                        + ("".join(lines) or "<div>never fires on these texts</div>") + "</div>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<table><tr><th>measure</th><th>value</th></tr>{rows}</table>"
            f"<h2>Top-activating contexts</h2>{''.join(features)}</body></html>\n")
