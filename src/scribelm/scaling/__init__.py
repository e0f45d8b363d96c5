"""Scaling laws: sweep model size and data, fit the laws, predict the compute-optimal model.

    plan = plan_sweep(load_sweep_config("recipes/sweep-tiny.yaml"))   # shapes × budgets → runs
    records = run_sweep(plan)                                         # sweep.jsonl, one line per run
    fit = fit_chinchilla(N, D, L)                                     # L = E + A/N^α + B/D^β
    iso = isoflop_optima(records, loss_key="val_loss")                # parabolas per budget → N_opt ∝ C^a
    write_analysis(analyze(records), plan.out_dir)                    # fit.json and the plots

`fit.py` holds the fits, `sweep.py` plans and runs the grid, `analysis.py` turns
records into fits and files, `plots.py` draws them.
"""

from scribelm.scaling.analysis import SweepAnalysis, analyze, write_analysis
from scribelm.scaling.fit import (
    BESIROGLU_2024, HOFFMANN_2022, PARAMETER_CONVENTION, ChinchillaFit, FitError, IsoFlopFit, chinchilla_loss,
    fit_chinchilla, isoflop_optima,
)
from scribelm.scaling.sweep import load_sweep_config, plan_sweep, read_records, run_sweep

__all__ = [
    "BESIROGLU_2024", "HOFFMANN_2022", "PARAMETER_CONVENTION", "ChinchillaFit", "FitError", "IsoFlopFit",
    "SweepAnalysis", "analyze", "chinchilla_loss", "fit_chinchilla", "isoflop_optima", "load_sweep_config",
    "plan_sweep", "read_records", "run_sweep", "write_analysis",
]
