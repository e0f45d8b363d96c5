"""Write what `explain_data` gathered: one self-contained HTML page, its data, and PNG figures.

    out/
      index.html            the page: inline CSS and JavaScript, the data embedded, no network
      data.json             the same numbers, for other tools
      embeddings.png        the embedding heat strip and the 2-D PCA of the tokens
      attention.png         every layer's and head's pattern, as a grid
      residual_norm.png     the residual stream's norm after each block
      logit_lens.png        the probability of the final prediction after each block, per position
      next_token.png        the top candidates at temperatures 0.2, 0.7, 1.0 and 1.5

The directory is written atomically and marked as scribelm's (scribelm.io): an
earlier page is replaced only with `force`, a directory of anything else never.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from scribelm.io import atomic_directory, claim_output_directory

PAGE_TEMPLATE = "static/explain.html"
DATA_MARK = "/*EXPLAIN_DATA*/"


def render_html(data: dict) -> str:
    """The page with `data` embedded (as JSON inside a script element: '<' escaped so no text
    of the model's can close it)."""
    template = resources.files("scribelm.inspect").joinpath(PAGE_TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    return template.replace(DATA_MARK, payload)


def _labels(data: dict) -> list[str]:
    return [json.dumps(t["text"], ensure_ascii=False)[1:-1] for t in data["tokens"]]


def _figures(data: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = _labels(data)
    T = len(labels)

    fig, (strip_ax, pca_ax) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    strip = np.array(data["embedding_strip"])
    limit = float(np.abs(strip).max()) or 1.0
    strip_ax.imshow(strip, cmap="bwr", vmin=-limit, vmax=limit, aspect="auto")
    strip_ax.set_yticks(range(T), labels)
    strip_ax.set_xlabel("embedding feature")
    strip_ax.set_title("token embeddings")
    pca = np.array(data["embedding_pca"])
    pca_ax.scatter(pca[:, 0], pca[:, 1])
    for (x, y), label in zip(pca, labels):
        pca_ax.annotate(label, (x, y), fontsize=8)
    pca_ax.set_title("PCA of the embeddings")
    fig.tight_layout()
    fig.savefig(directory / "embeddings.png", dpi=100)
    plt.close(fig)

    attention = data["attention"]
    L, H = len(attention), len(attention[0])
    fig, axes = plt.subplots(L, H, figsize=(1.6 * H + 1, 1.6 * L + 0.5), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(np.array(attention[layer][head]), cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"L{layer} H{head}", fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "attention.png", dpi=100)
    plt.close(fig)

    norms = np.array(data["residual_norms"]["per_position"])  # (L + 1, T)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(norms)), norms.mean(1), marker="o")
    ax.set_xticks(range(len(norms)), data["residual_norms"]["layers"], rotation=30)
    ax.set_ylabel("mean norm")
    ax.set_title("residual stream norm")
    fig.tight_layout()
    fig.savefig(directory / "residual_norm.png", dpi=100)
    plt.close(fig)

    lens = data["logit_lens"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * T + 2), 0.4 * len(lens["layers"]) + 1.5))
    ax.imshow(np.array(lens["target_probs"]), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(lens["layers"])), lens["layers"])
    ax.set_xticks(range(T), labels, rotation=45)
    ax.set_title(f"logit lens: p({json.dumps(lens['target_token'], ensure_ascii=False)})")
    fig.tight_layout()
    fig.savefig(directory / "logit_lens.png", dpi=100)
    plt.close(fig)

    nt = data["next_token"]
    shown = [t for t in (0.2, 0.7, 1.0, 1.5) if t in nt["temperatures"]]
    tokens = [json.dumps(c["token"], ensure_ascii=False)[1:-1] for c in nt["candidates"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(shown))
    for i, t in enumerate(shown):
        probs = nt["probs"][nt["temperatures"].index(t)]
        ax.bar(np.arange(len(tokens)) + i * width, probs, width, label=f"T = {t}")
    ax.set_xticks(np.arange(len(tokens)) + 0.4 - width / 2, tokens, rotation=45)
    ax.set_ylabel("probability")
    ax.legend()
    ax.set_title("next token")
    fig.tight_layout()
    fig.savefig(directory / "next_token.png", dpi=100)
    plt.close(fig)


def write_explain_page(data: dict, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the page, data.json and the PNGs into the directory `out`; returns index.html's path."""
    out = claim_output_directory(out, force=force, kind="explain page")
    with atomic_directory(out, kind="explain page") as tmp:
        (tmp / "index.html").write_text(render_html(data), encoding="utf-8")
        (tmp / "data.json").write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
        _figures(data, tmp)
    return Path(out) / "index.html"
