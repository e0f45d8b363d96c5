"""Scaling-law fits: how loss falls with parameters N and training tokens D.

Two complementary estimates, both from Hoffmann et al. 2022 ("Chinchilla"):

1. **The parametric law** (their approach 3)

       L(N, D) = E + A / N^α + B / D^β

   E is the loss no model reaches (the entropy of the text), A/N^α what a
   finite model costs, B/D^β what finite data costs. It is fitted in log
   space: with a = log A, b = log B, e = log E,

       log L̂ = logsumexp(a − α·log N,  b − β·log D,  e)

   and the parameters minimise Σ Huber_δ(log L̂ − log L) with δ = 1e-3 (nearly
   an L1 loss: robust to a few bad runs), by L-BFGS from a grid of starting
   points, as Hoffmann et al. and the replication by Besiroglu et al. 2024 did.
   The full grid (α, β ∈ {0, .5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25})
   is scored at once and L-BFGS runs from its best `n_starts` points.
   Confidence intervals come from the bootstrap: refit on points resampled
   with replacement (each refit starts from the full fit and the replicate's
   best grid points), report percentiles.

   Compute-optimal allocation under C ≈ 6·N·D (setting ∂L/∂N = 0 along C):

       N_opt = G · (C/6)^(β/(α+β)),   D_opt = (C/6)^(α/(α+β)) / G,   G = (αA / (βB))^(1/(α+β))

2. **IsoFLOP profiles** (their approach 2): for each compute budget, loss
   against log N is close to a parabola; its vertex is that budget's optimal
   N (and, from the runs at that budget, the matching D). Power laws through
   the vertices give N_opt ∝ C^a and D_opt ∝ C^b (a + b ≈ 1 when C ∝ N·D).

Parameter counting (one convention, stated with every result): N counts the
parameters that take part in matrix multiplies: every block matrix *and the
output layer* (counted even when it is tied to the input embedding, since its
compute is real), but not the input embedding look-up, norms or biases. This
follows Porian et al. 2024, who traced much of the Kaplan-vs-Chinchilla
disagreement to leaving the output layer out. The sweep also records the
total with embeddings and Kaplan's non-embedding count beside it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scribelm.errors import ScribeError

PARAMETER_CONVENTION = (
    "N = parameters in matrix multiplies: all block matrices plus the output layer (counted even when tied to the "
    "input embedding, as in Porian et al. 2024); input embedding, norms and biases excluded"
)
CHINCHILLA_NAMES = ("E", "A", "B", "alpha", "beta")
# Published constants, for comparison only (different data and tokenizers: exponents and ratios compare, E/A/B do not).
HOFFMANN_2022 = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BESIROGLU_2024 = {"E": 1.82, "A": 482.0, "B": 2085.4, "alpha": 0.348, "beta": 0.366}


class FitError(ScribeError, ValueError):
    """Data a scaling law cannot be fitted to (too few points, non-positive values, no curvature)."""


# ----------------------------------------------------------------------------- the parametric law


def chinchilla_loss(N, D, E: float, A: float, B: float, alpha: float, beta: float):
    """L(N, D) = E + A/N^α + B/D^β (arrays broadcast)."""
    return E + A / np.asarray(N, dtype=float) ** alpha + B / np.asarray(D, dtype=float) ** beta


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_l: np.ndarray, delta: float):
    """Σ Huber_δ(log L̂ − log L) and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])  # (3, n)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l  # (n,) residuals in log-loss
    weights /= total  # softmax: ∂ logsumexp / ∂ term
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    slope = np.where(small, r, delta * np.sign(r))  # Huber'(r)
    grad = np.array([
        (slope * weights[0]).sum(), (slope * weights[1]).sum(), (slope * weights[2]).sum(),
        -(slope * weights[0] * x).sum(), -(slope * weights[1] * y).sum(),
    ])
    return value, grad


def _grid_scores(x, y, log_l, delta, grid: np.ndarray) -> np.ndarray:
    """The Huber objective at every grid point at once: (G,)."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))  # (G, 1)
    log_pred = np.logaddexp(np.logaddexp(a - alpha * x, b - beta * y), e)  # (G, n)
    r = np.abs(log_pred - log_l)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum(axis=1)


def _start_grid() -> np.ndarray:
    exps = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.01, 5.0)
    return np.array(list(itertools.product(abs_, abs_, es, exps, exps)))  # (a, b, e, α, β)


_GRID = _start_grid()


def _minimize(starts: Iterable[np.ndarray], x, y, log_l, delta) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    best_theta, best_value = None, math.inf
    for start in starts:
        # Tight tolerances: with δ = 1e-3 the objective and its gradient are tiny numbers.
        result = minimize(_objective, start, args=(x, y, log_l, delta), jac=True, method="L-BFGS-B",
                          options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)
    return best_theta, best_value


def _fit_theta(x, y, log_l, delta, n_starts, extra_starts=()) -> tuple[np.ndarray, float]:
    scores = _grid_scores(x, y, log_l, delta, _GRID)
    order = np.argsort(scores)[:n_starts]
    return _minimize(list(extra_starts) + list(_GRID[order]), x, y, log_l, delta)


def _named(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


@dataclass
class ChinchillaFit:
    """A fitted L(N, D) = E + A/N^α + B/D^β, with bootstrap samples for intervals."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # Σ Huber on log-loss residuals at the optimum
    n_points: int
    delta: float = 1e-3
    level: float = 0.95
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)), repr=False)  # (bootstraps, 5) in CHINCHILLA_NAMES order
    convention: str = PARAMETER_CONVENTION

    def __getitem__(self, name: str) -> float:
        if name not in CHINCHILLA_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def params(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in CHINCHILLA_NAMES}

    def intervals(self) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap intervals at `level` for each constant ({} without bootstrap)."""
        if len(self.samples) < 2:
            return {}
        tail = 100 * (1 - self.level) / 2
        lo, hi = np.percentile(self.samples, [tail, 100 - tail], axis=0)
        return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(CHINCHILLA_NAMES)}

    def predict(self, N, D):
        return chinchilla_loss(N, D, **self.params())

    def predict_interval(self, N: float, D: float) -> tuple[float, float] | None:
        if len(self.samples) < 2:
            return None
        s = self.samples
        values = s[:, 0] + s[:, 1] / N ** s[:, 3] + s[:, 2] / D ** s[:, 4]
        tail = 100 * (1 - self.level) / 2
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    def optimal(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L at compute C = 6·N·D."""
        return _optimal(C, self.A, self.B, self.alpha, self.beta)

    def optimal_interval(self, C: float) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of N_opt, D_opt and D_opt/N_opt at compute C ({} without bootstrap)."""
        if len(self.samples) < 2:
            return {}
        rows = np.array([_optimal(C, A, B, al, be) for _, A, B, al, be in self.samples])
        tail = 100 * (1 - self.level) / 2
        out = {}
        for name, values in (("N", rows[:, 0]), ("D", rows[:, 1]), ("tokens_per_parameter", rows[:, 1] / rows[:, 0])):
            lo, hi = np.percentile(values, [tail, 100 - tail])
            out[name] = (float(lo), float(hi))
        return out

    def tokens_per_parameter(self, C: float) -> dict[str, Any]:
        """The compute-optimal D/N at compute C, with its bootstrap interval."""
        n, d = self.optimal(C)
        return {"C": C, "value": d / n, "interval": self.optimal_interval(C).get("tokens_per_parameter")}

    def to_dict(self) -> dict[str, Any]:
        return {**self.params(), "objective": self.objective, "n_points": self.n_points, "delta": self.delta,
                "bootstraps": len(self.samples), "level": self.level,
                "intervals": {k: list(v) for k, v in self.intervals().items()}, "convention": self.convention}


def _optimal(C: float, A: float, B: float, alpha: float, beta: float) -> tuple[float, float]:
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n = G * (C / 6) ** (beta / (alpha + beta))
    return float(n), float(C / 6 / n)


def _as_positive_array(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise FitError(f"every {name} must be a positive finite number")
    return array


def fit_chinchilla(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, delta: float = 1e-3,
                   n_starts: int = 64, bootstrap: int = 100, level: float = 0.95, seed: int = 0) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^α + B/D^β to measured losses (see the module docstring).

    `fit["alpha"]` etc. read the constants; `fit.intervals()` the bootstrap intervals
    (`bootstrap` refits; 0 for none).
    """
    x = np.log(_as_positive_array(N, "N"))
    y = np.log(_as_positive_array(D, "D"))
    log_l = np.log(_as_positive_array(L, "loss"))
    if not len(x) == len(y) == len(log_l):
        raise FitError(f"N, D and L must have the same length, got {len(x)}, {len(y)} and {len(log_l)}")
    if len(x) <= 5:
        raise FitError(f"the law has 5 constants (E, A, B, α, β); {len(x)} point(s) cannot determine them: "
                       "use at least 6, better 15 or more (e.g. 4 budgets × 4 sizes)")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise FitError("N and D must each take more than one value to fit how loss depends on them")
    theta, value = _fit_theta(x, y, log_l, delta, n_starts)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) == 0 or np.ptp(y[pick]) == 0:
            continue
        replicate, _ = _fit_theta(x[pick], y[pick], log_l[pick], delta, n_starts=4, extra_starts=[theta])
        named = _named(replicate)
        samples.append([named[k] for k in CHINCHILLA_NAMES])
    return ChinchillaFit(**_named(theta), objective=value, n_points=len(x), delta=delta, level=level,
                         samples=np.array(samples).reshape(-1, 5))


# ----------------------------------------------------------------------------- IsoFLOP profiles


@dataclass
class IsoFlopProfile:
    """One budget: the parabola L ≈ c2·(ln N)² + c1·ln N + c0 and its vertex."""

    C: float
    N_opt: float
    D_opt: float
    loss_opt: float
    coefficients: tuple[float, float, float]  # (c2, c1, c0)
    bracketed: bool  # the vertex lies inside the sizes run (else it is an extrapolation)
    points: int


@dataclass
class IsoFlopFit:
    """Per-budget optima and the power laws through them: N_opt = kN·C^a, D_opt = kD·C^b."""

    profiles: list[IsoFlopProfile]
    a: float
    b: float
    kN: float
    kD: float
    skipped: list[str] = field(default_factory=list)  # budgets without a minimum, and why
    power_law_budgets: list[float] = field(default_factory=list)  # the budgets the power laws were fitted through
    intervals: dict[str, Any] = field(default_factory=dict)  # bootstrap: "a", "b", "tokens_per_parameter" -> (lo, hi)
    convention: str = PARAMETER_CONVENTION

    def optimal(self, C: float) -> tuple[float, float]:
        return self.kN * C**self.a, self.kD * C**self.b

    def tokens_per_parameter(self) -> dict[str, Any]:
        """D_opt/N_opt at each budget the power laws went through, their geometric mean and range."""
        ratios = [p.D_opt / p.N_opt for p in self.profiles if p.C in self.power_law_budgets or not self.power_law_budgets]
        return {"per_budget": ratios, "value": float(np.exp(np.mean(np.log(ratios)))),
                "range": (float(min(ratios)), float(max(ratios)))}

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "kN": self.kN, "kD": self.kD, "skipped": self.skipped,
                "power_law_budgets": self.power_law_budgets, "intervals": self.intervals,
                "tokens_per_parameter": self.tokens_per_parameter(), "convention": self.convention,
                "profiles": [{"C": p.C, "N_opt": p.N_opt, "D_opt": p.D_opt, "loss_opt": p.loss_opt,
                              "coefficients": list(p.coefficients), "bracketed": p.bracketed, "points": p.points}
                             for p in self.profiles]}


def isoflop_optima(records: Iterable[Mapping[str, Any]], *, budget_key: str = "budget", loss_key: str = "loss",
                   bootstrap: int = 0, level: float = 0.95, seed: int = 0) -> IsoFlopFit:
    """IsoFLOP analysis of runs given as mappings with N, D, a loss and a budget.

    `bootstrap` > 0 refits on runs resampled with replacement within each budget and puts
    percentile intervals of a, b and the tokens per parameter in `intervals` (replicates
    that lose a budget's minimum are dropped; `intervals["replicates"]` counts the rest).

    Runs are grouped by `budget_key` (falling back to "C"); each group needs 3 or more
    sizes for its parabola, and 2 or more budgets with a minimum are needed for the power
    laws (a budget whose loss does not curve upward is listed in `skipped`). The power laws
    go through the vertices that lie inside the sizes run, when there are two or more. Within a
    budget ln D is fitted as a straight line in ln N (exact when C ∝ N·D) to read D at the vertex.
    """
    groups: dict[float, list[Mapping[str, Any]]] = {}
    for record in records:
        key = record.get(budget_key, record.get("C"))
        if key is None:
            raise FitError(f"each record needs a {budget_key!r} or 'C' (its compute budget)")
        groups.setdefault(float(key), []).append(record)
    fit = _isoflop(groups, loss_key)
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(bootstrap):
            resampled = {C: [g[i] for i in rng.integers(0, len(g), len(g))] for C, g in groups.items()}
            try:
                replicate = _isoflop(resampled, loss_key)
            except FitError:
                continue
            rows.append((replicate.a, replicate.b, replicate.tokens_per_parameter()["value"]))
        if len(rows) >= 2:
            tail = 100 * (1 - level) / 2
            lo, hi = np.percentile(np.array(rows), [tail, 100 - tail], axis=0)
            fit.intervals = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(("a", "b", "tokens_per_parameter"))}
            fit.intervals["replicates"] = len(rows)
    return fit


def _isoflop(groups: dict[float, list[Mapping[str, Any]]], loss_key: str) -> IsoFlopFit:
    usable = {C: rows for C, rows in groups.items() if len({float(r["N"]) for r in rows}) >= 3}
    if len(usable) < 2:
        raise FitError(f"IsoFLOP profiles need at least 2 budgets with 3 or more model sizes each; "
                       f"got {len(usable)} such budget(s) among {len(groups)}")
    profiles, skipped = [], []
    for C in sorted(usable):
        rows = usable[C]
        x = np.log(_as_positive_array([r["N"] for r in rows], "N"))
        y = np.log(_as_positive_array([r["D"] for r in rows], "D"))
        loss = np.asarray([float(r[loss_key]) for r in rows])
        c2, c1, c0 = np.polyfit(x, loss, 2)
        if c2 <= 0:
            skipped.append(f"at budget {C:.3g} FLOPs loss does not curve upward in log N, so it has no minimum; "
                           "add sizes on both sides of the best one")
            continue
        vertex = -c1 / (2 * c2)
        slope, intercept = np.polyfit(x, y, 1)
        profiles.append(IsoFlopProfile(
            C=C, N_opt=float(np.exp(vertex)), D_opt=float(np.exp(slope * vertex + intercept)),
            loss_opt=float(c0 - c1**2 / (4 * c2)), coefficients=(float(c2), float(c1), float(c0)),
            bracketed=bool(x.min() <= vertex <= x.max()), points=len(rows),
        ))
    if len(profiles) < 2:
        raise FitError("IsoFLOP profiles need at least 2 budgets with a minimum: " + "; ".join(skipped))
    # The power laws go through vertices inside the sizes run when there are two or more: an extrapolated
    # vertex (the optimum beyond the smallest or largest size) is a guess, not a measurement.
    through = [p for p in profiles if p.bracketed]
    if len(through) < 2:
        through = profiles
    log_c = np.log([p.C for p in through])
    a, log_kn = np.polyfit(log_c, np.log([p.N_opt for p in through]), 1)
    b, log_kd = np.polyfit(log_c, np.log([p.D_opt for p in through]), 1)
    return IsoFlopFit(profiles=profiles, a=float(a), b=float(b), kN=float(np.exp(log_kn)), kD=float(np.exp(log_kd)),
                      skipped=skipped, power_law_budgets=[p.C for p in through])
