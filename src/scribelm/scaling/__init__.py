"""Scaling laws: sweep model size and data, fit the laws, predict the compute-optimal model.

    plan = plan_sweep(load_sweep_config("recipes/sweep-tiny.yaml"))   # shapes × budgets → runs
    records = run_sweep(plan)                                         # sweep.jsonl, one line per run
    fit = fit_chinchilla(N, D, L)                                     # L = E + A/N^α + B/D^β
    iso = isoflop_optima(records)                                     # parabolas per budget → N_opt ∝ C^a

`fit.py` holds the fits, `sweep.py` plans and runs the grid, `plots.py` draws it.
"""

from scribelm.scaling.fit import (
    BESIROGLU_2024, HOFFMANN_2022, PARAMETER_CONVENTION, ChinchillaFit, FitError, IsoFlopFit, chinchilla_loss,
    fit_chinchilla, isoflop_optima,
)

__all__ = [
    "BESIROGLU_2024", "HOFFMANN_2022", "PARAMETER_CONVENTION", "ChinchillaFit", "FitError", "IsoFlopFit",
    "chinchilla_loss", "fit_chinchilla", "isoflop_optima",
]
