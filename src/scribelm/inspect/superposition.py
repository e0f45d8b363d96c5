"""Superposition, made visible: more features than dimensions.

A layer of width d has only d orthogonal directions, yet models seem to store
far more features than that. Two small experiments show how.

1. Counting. In high dimensions random directions are almost orthogonal: the
   cosine of two random unit vectors in d dimensions has mean 0 and standard
   deviation 1/√d, so in d = 100 ten thousand random vectors all lie within
   roughly 90° ± 30° of each other (`angle_range`), and gradient descent that
   pushes the largest overlaps down (`spread_apart`) tightens that further.
   "Nearly orthogonal" directions are exponentially many in d.

2. The toy model of superposition (Elhage et al., 2022). n sparse features
   x ∈ [0, 1]^n (each nonzero with probability p = 1 − sparsity) are squeezed
   through d < n dimensions and read back with a ReLU:

       h  = W x              (d,)      W: (d, n), column i is feature i's direction
       x̂  = ReLU(Wᵀ h + b)   (n,)
       loss = Σ_i I_i (x_i − x̂_i)²      I_i: how much feature i matters

   When features are dense the model keeps the d most important ones and drops
   the rest; when they are sparse it packs them all in, at angles where the
   ReLU can filter the interference: 5 features in 2 dimensions form a pentagon.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from scribelm.errors import ScribeError


class SuperpositionError(ScribeError, ValueError):
    """An experiment setting that cannot work."""


# --------------------------------------------------------------------------- counting


def random_unit_vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n directions drawn uniformly on the sphere in d dimensions: (n, d)."""
    if n < 2 or d < 1:
        raise SuperpositionError(f"need at least 2 vectors and 1 dimension, got n={n}, d={d}")
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True)


@torch.no_grad()
def angle_range(vectors: torch.Tensor, *, epsilon: float = 5.0, chunk: int = 2048) -> dict[str, float]:
    """Angles (degrees) between every pair of the unit vectors (n, d), chunked so n = 10,000
    needs no 10,000² matrix at once: min, max, mean, std, the largest |angle − 90°|, and
    the share of pairs within 90° ± epsilon."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    n = len(unit)
    smallest, largest, total, total_sq, within, pairs = 1.0, -1.0, 0.0, 0.0, 0, 0
    bound = math.sin(math.radians(epsilon))  # |cos| < sin ε  ⇔  angle within 90° ± ε
    for start in range(0, n, chunk):
        cos = unit[start : start + chunk] @ unit.T  # (c, n)
        rows = torch.arange(start, min(start + chunk, n))
        upper = torch.arange(n)[None, :] > rows[:, None]  # each pair once, no self-pairs
        values = cos[upper]
        if len(values) == 0:
            continue
        smallest, largest = min(smallest, values.min().item()), max(largest, values.max().item())
        angles = torch.rad2deg(torch.arccos(values.clamp(-1, 1)).double())
        total += angles.sum().item()
        total_sq += angles.pow(2).sum().item()
        within += int((values.abs() < bound).sum())
        pairs += len(values)
    mean = total / pairs
    min_angle, max_angle = math.degrees(math.acos(min(1.0, largest))), math.degrees(math.acos(max(-1.0, smallest)))
    return {
        "n": n, "d": unit.shape[1], "pairs": pairs,
        "min_angle": min_angle, "max_angle": max_angle,
        "largest_deviation": max(90.0 - min_angle, max_angle - 90.0),
        "mean_angle": mean, "std_angle": math.sqrt(max(0.0, total_sq / pairs - mean * mean)),
        "epsilon": epsilon, "within_epsilon": within / pairs,
    }


def spread_apart(vectors: torch.Tensor, *, steps: int = 200, lr: float = 0.01, rows_per_step: int = 1024,
                 power: int = 8, seed: int = 0) -> torch.Tensor:
    """Push unit vectors (n, d) towards orthogonality: each step, a random subset of rows
    lowers the mean of cos^power against all others (a high power weighs the worst
    overlaps most), and the vectors go back on the sphere. Returns new unit vectors."""
    if steps < 0 or lr <= 0 or power < 2 or power % 2:
        raise SuperpositionError("steps must be ≥ 0, lr positive and power an even number ≥ 2")
    v = (vectors / vectors.norm(dim=-1, keepdim=True)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = len(v)
    for _ in range(steps):
        rows = torch.randperm(n, generator=generator)[: min(rows_per_step, n)]
        unit = v / v.norm(dim=-1, keepdim=True)
        cos = unit[rows] @ unit.T  # (r, n)
        cos = cos.masked_fill(rows[:, None] == torch.arange(n)[None, :], 0.0)
        loss = cos.pow(power).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            v /= v.norm(dim=-1, keepdim=True)
    return v.detach()


# --------------------------------------------------------------------------- the toy model


@dataclass
class ToyModelSettings:
    n_features: int = 5
    d_hidden: int = 2
    sparsity: float = 0.9  # the chance that a feature is zero in an example
    importance_decay: float = 1.0  # I_i = decay^i
    instances: int = 8  # trained side by side from different seeds; the best is kept
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-2
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.d_hidden < self.n_features:
            raise SuperpositionError(f"the toy model squeezes n features into d < n dimensions; got n={self.n_features}, d={self.d_hidden}")
        if not 0.0 <= self.sparsity < 1.0:
            raise SuperpositionError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.instances < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SuperpositionError("instances, steps, batch_size and lr must be positive")


def sparse_features(batch: int, n: int, sparsity: float, generator: torch.Generator, instances: int = 1) -> torch.Tensor:
    """(instances, batch, n): each feature U[0, 1] with probability 1 − sparsity, else 0."""
    values = torch.rand(instances, batch, n, generator=generator)
    keep = torch.rand(instances, batch, n, generator=generator) >= sparsity
    return values * keep


def toy_forward(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W (I, d, n), b (I, n), x (I, B, n) -> x̂ (I, B, n)."""
    h = torch.einsum("idn,ibn->ibd", W, x)  # (I, B, d)
    return torch.relu(torch.einsum("idn,ibd->ibn", W, h) + b[:, None, :])


def train_toy_model(settings: ToyModelSettings) -> dict[str, Any]:
    """Train `instances` toy models side by side; returns the best one:
    {"W" (d, n), "b" (n,), "loss", "norms" (n,) of each feature's direction,
    "angles" (degrees) of the represented features (norm > 0.5) in 2-D, sorted}."""
    settings.check()
    I, n, d = settings.instances, settings.n_features, settings.d_hidden
    generator = torch.Generator().manual_seed(settings.seed)
    W = (torch.randn(I, d, n, generator=generator) * math.sqrt(2.0 / (n + d))).requires_grad_(True)
    b = torch.zeros(I, n, requires_grad=True)
    importance = settings.importance_decay ** torch.arange(n, dtype=torch.float32)  # (n,)
    optimizer = torch.optim.AdamW([W, b], lr=settings.lr, weight_decay=0.0)
    for step in range(settings.steps):
        x = sparse_features(settings.batch_size, n, settings.sparsity, generator, I)  # (I, B, n)
        loss = (importance * (x - toy_forward(W, b, x)).pow(2)).mean((1, 2)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = sparse_features(8192, n, settings.sparsity, generator, I)
        losses = (importance * (x - toy_forward(W, b, x)).pow(2)).mean((1, 2))  # (I,)
        best = int(losses.argmin())
        W_best, b_best = W[best].detach(), b[best].detach()
    norms = W_best.norm(dim=0)  # (n,)
    result = {"W": W_best, "b": b_best, "loss": losses[best].item(), "norms": norms.tolist(),
              "represented": int((norms > 0.5).sum())}
    if d == 2:
        angles = torch.rad2deg(torch.atan2(W_best[1], W_best[0]))[norms > 0.5].sort().values  # (m,)
        gaps = torch.diff(torch.cat([angles, angles[:1] + 360.0])) if len(angles) else angles
        result["angles"], result["gaps"] = angles.tolist(), gaps.tolist()
    return result


# --------------------------------------------------------------------------- plots


def plot_feature_directions(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """PNG of the toy model: each feature's direction (columns of W) for d = 2, and WᵀW
    (which features share dimensions) for any d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scribelm.io import atomic_file

    W = result["W"]
    d, n = W.shape
    figure, axes = plt.subplots(1, 2 if d == 2 else 1, figsize=(9 if d == 2 else 4.5, 4.5), squeeze=False)
    axes = axes[0]
    if d == 2:
        ax = axes[0]
        for i in range(n):
            ax.plot([0, W[0, i]], [0, W[1, i]], marker="o", label=f"feature {i}")
        limit = max(1.1, float(W.abs().max()) * 1.1)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.8", lw=0.5)
        ax.axvline(0, color="0.8", lw=0.5)
        ax.set_title("feature directions (columns of W)")
        ax.legend(fontsize=7, loc="upper right")
    gram = (W.T @ W).numpy()
    image = axes[-1].imshow(gram, cmap="RdBu_r", vmin=-1, vmax=1)
    axes[-1].set_title("WᵀW: features sharing dimensions")
    figure.colorbar(image, ax=axes[-1], fraction=0.046)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def plot_angle_histograms(before: torch.Tensor, after: torch.Tensor, path: str | os.PathLike, sample: int = 2000) -> None:
    """PNG: histograms of pairwise angles of random and of spread-apart unit vectors
    (the pairs of the first `sample` vectors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scribelm.io import atomic_file

    figure, ax = plt.subplots(figsize=(6, 4))
    for vectors, label in ((before, "random"), (after, "spread apart")):
        unit = vectors[:sample] / vectors[:sample].norm(dim=-1, keepdim=True)
        cos = unit @ unit.T
        upper = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
        ax.hist(torch.rad2deg(torch.arccos(cos[upper].clamp(-1, 1))).numpy(), bins=120, alpha=0.6, label=label, density=True)
    ax.set_xlabel("angle between two vectors (degrees)")
    ax.set_title(f"{len(before)} unit vectors in {before.shape[1]} dimensions")
    ax.legend()
    figure.tight_layout()
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
