"""Pictures of a sweep (PNG, matplotlib), each written atomically into OUT/plots/.

    loss_vs_compute.png       validation loss against training FLOPs, one line per shape,
                              and the frontier: the best loss seen at each budget
    isoflop.png               loss against N at each budget, its parabola and vertex
    contours.png              the fitted L(N, D) as contours over (N, D), the runs on top,
                              and the compute-optimal path N_opt(C), D_opt(C)
    predicted_vs_measured.png the fitted law's loss against each run's measured loss
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scribelm.io import atomic_file
from scribelm.scaling.fit import ChinchillaFit, IsoFlopFit

LOSS = "val_loss"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        fig.tight_layout()
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return path


def plot_loss_vs_compute(records: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    shapes = sorted({(r["N"], r["run"].rsplit("-C", 1)[0]) for r in records})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(shapes), 1)))
    for color, (n, label) in zip(colors, shapes):
        rows = sorted((r["C"], r[LOSS]) for r in records if r["N"] == n)
        ax.plot(*zip(*rows), "o-", color=color, label=f"{label} (N={n / 1e6:.2g}M)", markersize=4)
    budgets = sorted({r["budget"] for r in records})
    frontier = [min(((r["C"], r[LOSS]) for r in records if r["budget"] == b), key=lambda p: p[1]) for b in budgets]
    ax.plot(*zip(*frontier), "k--", linewidth=2, label="frontier (best at each budget)")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_isoflop(records: list[dict[str, Any]], iso: IsoFlopFit | None, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    budgets = sorted({r["budget"] for r in records})
    colors = plt.cm.plasma(np.linspace(0, 0.85, max(len(budgets), 1)))
    profiles = {p.C: p for p in (iso.profiles if iso else [])}
    for color, budget in zip(colors, budgets):
        rows = sorted((r["N"], r[LOSS]) for r in records if r["budget"] == budget)
        ax.plot(*zip(*rows), "o", color=color, label=f"C = {budget:.2g}")
        profile = profiles.get(budget)
        if profile is not None:
            x = np.linspace(np.log(rows[0][0]) - 0.3, np.log(rows[-1][0]) + 0.3, 100)
            c2, c1, c0 = profile.coefficients
            ax.plot(np.exp(x), c2 * x**2 + c1 * x + c0, "-", color=color, linewidth=1)
            if profile.bracketed:  # a vertex beyond the sizes run is an extrapolation, not drawn as an optimum
                ax.plot([profile.N_opt], [profile.loss_opt], "*", color=color, markersize=12, markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats per token)")
    title = "IsoFLOP profiles"
    if iso is not None:
        title += f": N_opt ∝ C^{iso.a:.2f}, D_opt ∝ C^{iso.b:.2f}"
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_contours(records: list[dict[str, Any]], fit: ChinchillaFit, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    N = np.array([r["N"] for r in records])
    D = np.array([r["D"] for r in records])
    n_grid = np.geomspace(N.min() / 2, N.max() * 2, 120)
    d_grid = np.geomspace(D.min() / 2, D.max() * 2, 120)
    nn, dd = np.meshgrid(n_grid, d_grid)
    surface = fit.predict(nn, dd)
    levels = np.quantile(surface, np.linspace(0.02, 0.98, 14))
    contour = ax.contour(nn, dd, surface, levels=np.unique(levels), cmap="viridis", linewidths=1)
    ax.clabel(contour, fontsize=6, fmt="%.2f")
    points = ax.scatter(N, D, c=[r[LOSS] for r in records], cmap="viridis", edgecolors="k", zorder=3)
    fig.colorbar(points, ax=ax, label="measured validation loss")
    budgets = np.geomspace(min(r["C"] for r in records) / 3, max(r["C"] for r in records) * 3, 50)
    path_nd = np.array([fit.optimal(C) for C in budgets])
    ax.plot(path_nd[:, 0], path_nd[:, 1], "r--", label="compute-optimal N, D (C = 6ND)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_grid[0], n_grid[-1])
    ax.set_ylim(d_grid[0], d_grid[-1])
    ax.set_xlabel("parameters N")
    ax.set_ylabel("training tokens D")
    ax.set_title(f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_predicted_vs_measured(records: list[dict[str, Any]], fit: ChinchillaFit, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    measured = np.array([r[LOSS] for r in records])
    predicted = fit.predict(np.array([r["N"] for r in records]), np.array([r["D"] for r in records]))
    ax.scatter(measured, predicted, c=np.log10([r["C"] for r in records]), cmap="plasma", edgecolors="k")
    lo, hi = min(measured.min(), predicted.min()), max(measured.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="predicted = measured")
    error = np.abs(predicted / measured - 1)
    ax.set_title(f"fitted law: mean |error| {100 * error.mean():.1f}%, max {100 * error.max():.1f}%")
    ax.set_xlabel("measured validation loss")
    ax.set_ylabel("predicted loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(records: list[dict[str, Any]], out_dir: Path, fit: ChinchillaFit | None = None,
                iso: IsoFlopFit | None = None) -> list[Path]:
    """Every plot the records (and fits, when there are any) allow; returns their paths."""
    out_dir = Path(out_dir)
    records = [r for r in records if r.get(LOSS) is not None]
    if not records:
        return []
    paths = [plot_loss_vs_compute(records, out_dir / "loss_vs_compute.png"),
             plot_isoflop(records, iso, out_dir / "isoflop.png")]
    if fit is not None:
        paths += [plot_contours(records, fit, out_dir / "contours.png"),
                  plot_predicted_vs_measured(records, fit, out_dir / "predicted_vs_measured.png")]
    return paths
