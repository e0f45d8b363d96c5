"""The scaling-law fits on synthetic data drawn from known constants."""

import numpy as np
import pytest

from scribelm.scaling.fit import (
    BESIROGLU_2024, FitError, chinchilla_loss, fit_chinchilla, isoflop_optima,
)

TRUE = BESIROGLU_2024


def analytic_optimum(C):
    """N_opt, D_opt of the true law at C = 6·N·D, from dL/dN = 0 along the budget."""
    a, b = TRUE["alpha"], TRUE["beta"]
    G = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b))
    n = G * (C / 6) ** (b / (a + b))
    return n, C / 6 / n


def isoflop_grid(budgets, sizes, spread, offset=1.0):
    """Runs as an IsoFLOP sweep lays them out: per budget, sizes around the optimum, D = C / 6N."""
    rows = []
    for C in budgets:
        n_opt, _ = analytic_optimum(C)
        for factor in np.geomspace(1 / spread, spread, sizes):
            n = n_opt * factor * offset
            rows.append({"budget": C, "N": n, "D": C / (6 * n)})
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chinchilla_fit_recovers_the_replication_constants_under_one_percent_noise(seed):
    rows = isoflop_grid(np.geomspace(1e17, 1e22, 8), sizes=9, spread=10)
    N = np.array([r["N"] for r in rows])
    D = np.array([r["D"] for r in rows])
    rng = np.random.default_rng(seed)
    L = chinchilla_loss(N, D, **TRUE) * (1 + 0.01 * rng.standard_normal(len(N)))
    fit = fit_chinchilla(N, D, L, bootstrap=0)
    assert abs(fit["alpha"] - TRUE["alpha"]) <= 0.02
    assert abs(fit["beta"] - TRUE["beta"]) <= 0.02
    assert abs(fit["E"] - TRUE["E"]) <= 0.05


def test_bootstrap_intervals_cover_the_truth_and_predictions_carry_them():
    rows = isoflop_grid(np.geomspace(1e17, 1e22, 6), sizes=7, spread=10)
    N = np.array([r["N"] for r in rows])
    D = np.array([r["D"] for r in rows])
    L = chinchilla_loss(N, D, **TRUE) * (1 + 0.01 * np.random.default_rng(7).standard_normal(len(N)))
    fit = fit_chinchilla(N, D, L, bootstrap=40, seed=3)
    intervals = fit.intervals()
    for name in ("alpha", "beta", "E"):
        lo, hi = intervals[name]
        assert lo < hi
        assert lo - 0.01 <= TRUE[name] <= hi + 0.01, (name, lo, hi)
    lo, hi = fit.predict_interval(1e9, 2e10)
    assert lo <= float(fit.predict(1e9, 2e10)) <= hi
    ratio = fit.tokens_per_parameter(1e21)
    true_n, true_d = analytic_optimum(1e21)
    assert ratio["interval"][0] < ratio["value"] < ratio["interval"][1]
    assert ratio["value"] == pytest.approx(true_d / true_n, rel=0.5)
    assert fit.to_dict()["convention"].startswith("N = parameters in matrix multiplies")


def test_isoflop_optima_equal_the_analytic_optimum_on_noise_free_data():
    budgets = np.geomspace(1e18, 1e22, 5)
    rows = isoflop_grid(budgets, sizes=9, spread=4, offset=1.3)  # the sizes are not centred on the optimum
    for r in rows:
        r["loss"] = float(chinchilla_loss(r["N"], r["D"], **TRUE))
    fit = isoflop_optima(rows)
    assert len(fit.profiles) == 5
    for profile in fit.profiles:
        n_opt, d_opt = analytic_optimum(profile.C)
        assert profile.N_opt == pytest.approx(n_opt, rel=0.01)
        assert profile.D_opt == pytest.approx(d_opt, rel=0.01)
        assert profile.bracketed
    a, b = TRUE["alpha"], TRUE["beta"]
    assert fit.a == pytest.approx(b / (a + b), rel=0.01)
    assert fit.b == pytest.approx(a / (a + b), rel=0.01)
    n, d = fit.optimal(1e20)
    assert n == pytest.approx(analytic_optimum(1e20)[0], rel=0.02)
    noisy = [{**r, "loss": r["loss"] * (1 + 0.002 * z)} for r, z in zip(rows, np.random.default_rng(0).standard_normal(len(rows)))]
    resampled = isoflop_optima(noisy, bootstrap=30)
    lo, hi = resampled.intervals["a"]
    assert lo < resampled.a < hi and resampled.intervals["replicates"] >= 20
    per_budget = fit.tokens_per_parameter()["per_budget"]
    assert per_budget == pytest.approx([analytic_optimum(C)[1] / analytic_optimum(C)[0] for C in budgets], rel=0.02)


def test_too_few_points_or_shapeless_data_are_refused():
    with pytest.raises(FitError, match="5 constants"):
        fit_chinchilla([1e6, 2e6, 4e6, 8e6, 1e7], [1e8] * 5, [3.0, 2.9, 2.8, 2.7, 2.6])
    with pytest.raises(FitError, match="positive"):
        fit_chinchilla([1e6, -1, 4e6, 8e6, 1e7, 2e7], [1e8] * 6, [3.0] * 6)
    two_sizes = [{"budget": C, "N": n, "D": C / (6 * n), "loss": 3.0} for C in (1e12, 1e13) for n in (1e5, 2e5)]
    with pytest.raises(FitError, match="3 or more model sizes"):
        isoflop_optima(two_sizes)
    frown = [{"budget": C, "N": n, "D": C / (6 * n), "loss": loss}
             for C in (1e12, 1e13) for n, loss in ((1e5, 3.0), (2e5, 3.5), (4e5, 3.0))]
    with pytest.raises(FitError, match="does not curve upward"):
        isoflop_optima(frown)
    smile = [{"budget": 1e14, "N": n, "D": 1e14 / (6 * n), "loss": loss} for n, loss in ((1e5, 3.0), (2e5, 2.5), (4e5, 3.0))]
    smile += [{**r, "budget": 1e15, "D": r["D"] * 10} for r in smile]
    fit = isoflop_optima(frown + smile)  # the budgets without a minimum are set aside, and said so
    assert [p.C for p in fit.profiles] == [1e14, 1e15] and len(fit.skipped) == 2
