"""From a sweep's records to its laws: the fits that the points allow, fit.json and the plots.

`analyze(records)` fits the Chinchilla law (needs 6+ runs) and the IsoFLOP
profiles (needs 2+ budgets with 3+ sizes each) on the final validation
losses; whichever the points do not allow is reported with the reason
instead of failing the whole analysis. `write_analysis` puts fit.json and the
PNGs into the sweep's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scribelm.io import write_file_atomically
from scribelm.scaling.fit import (
    BESIROGLU_2024, HOFFMANN_2022, PARAMETER_CONVENTION, ChinchillaFit, FitError, IsoFlopFit, fit_chinchilla,
    isoflop_optima,
)

FIT_FILE = "fit.json"
PLOTS_DIR = "plots"


@dataclass
class SweepAnalysis:
    records: list[dict[str, Any]]
    chinchilla: ChinchillaFit | None = None
    isoflop: IsoFlopFit | None = None
    problems: list[str] = field(default_factory=list)  # why a fit could not be made

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"convention": PARAMETER_CONVENTION, "runs": len(self.records), "problems": self.problems,
                               "published": {"hoffmann_2022": HOFFMANN_2022, "besiroglu_2024": BESIROGLU_2024}}
        if self.chinchilla is not None:
            out["chinchilla"] = self.chinchilla.to_dict()
            largest = max(r["C"] for r in self.records)
            out["chinchilla"]["tokens_per_parameter_at_largest_budget"] = self.chinchilla.tokens_per_parameter(largest)
        if self.isoflop is not None:
            out["isoflop"] = self.isoflop.to_dict()
        return out


def analyze(records: list[dict[str, Any]], *, bootstrap: int = 100, seed: int = 0) -> SweepAnalysis:
    usable = [r for r in records if r.get("val_loss") is not None]
    analysis = SweepAnalysis(records=usable)
    try:
        analysis.chinchilla = fit_chinchilla([r["N"] for r in usable], [r["D"] for r in usable],
                                             [r["val_loss"] for r in usable], bootstrap=bootstrap, seed=seed)
    except FitError as err:
        analysis.problems.append(f"parametric law: {err}")
    try:
        analysis.isoflop = isoflop_optima(usable, loss_key="val_loss", bootstrap=bootstrap, seed=seed)
    except FitError as err:
        analysis.problems.append(f"IsoFLOP profiles: {err}")
    return analysis


def write_analysis(analysis: SweepAnalysis, out_dir: str | Path) -> list[Path]:
    """fit.json and the plots in `out_dir`; returns the paths written."""
    from scribelm.scaling.plots import write_plots

    out_dir = Path(out_dir)
    fit_path = write_file_atomically(out_dir / FIT_FILE, json.dumps(analysis.to_dict(), indent=2) + "\n")
    return [fit_path, *write_plots(analysis.records, out_dir / PLOTS_DIR, analysis.chinchilla, analysis.isoflop)]
