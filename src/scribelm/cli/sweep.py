"""`scribe sweep --config recipes/sweep-tiny.yaml [--parallel K] [--predict N D] [--optimal C]`."""

from __future__ import annotations

import math

from scribelm.cli.common import console, human_count
from scribelm.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="scaling-law sweep: train shapes × compute budgets, fit L(N, D), plot it",
        description="Train every shape of the sweep recipe at every compute budget (tokens = budget / FLOPs per token), "
                    "record the runs in OUT/sweep.jsonl, fit the Chinchilla law and IsoFLOP profiles, write OUT/fit.json "
                    "and OUT/plots/*.png. Running it again skips recorded runs and continues a stopped one. "
                    "With --predict or --optimal only the recorded runs are fitted: nothing trains.",
    )
    p.add_argument("--config", required=True, help="sweep recipe YAML (see recipes/sweep-tiny.yaml)")
    p.add_argument("--parallel", type=int, help="runs trained at once, each on its share of the cores (default: the recipe's, else 1)")
    p.add_argument("--predict", nargs=2, type=float, metavar=("N", "D"), help="print the fitted loss of N parameters trained on D tokens")
    p.add_argument("--optimal", type=float, metavar="C", help="print the compute-optimal N and D for C training FLOPs")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for the intervals (default 100)")
    p.add_argument("--plan", action="store_true", help="print the planned runs and stop")
    p.set_defaults(handler=run)


def run(args) -> int:
    from scribelm.scaling.analysis import analyze, write_analysis
    from scribelm.scaling.sweep import load_sweep_config, plan_sweep, read_records, run_sweep

    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    recipe = load_sweep_config(args.config)
    fit_only = args.predict is not None or args.optimal is not None
    if fit_only:
        from pathlib import Path

        records = read_records(Path(recipe.get("out_dir") or "runs/sweep"))
        if not records:
            raise ConfigError(f"no runs recorded in {recipe.get('out_dir') or 'runs/sweep'}/sweep.jsonl yet; run the sweep first")
        _answer(args, analyze(records, bootstrap=args.bootstrap))
        return 0

    plan = plan_sweep(recipe, parallel=args.parallel)
    budgets = sorted({r.budget for r in plan.runs})
    console.print(f"sweep: {len(plan.runs)} runs ({len({(r.depth, r.width) for r in plan.runs})} shapes × "
                  f"{len(budgets)} budgets, {budgets[0]:.2g}–{budgets[-1]:.2g} FLOPs), "
                  f"{plan.parallel} at a time, in {plan.out_dir}")
    for line in plan.left_out:
        console.print(f"[dim]left out (less than one batch): {line}[/dim]")
    if args.plan:
        for r in plan.runs:
            console.print(f"  {r.name:<24} N {human_count(r.N):>8}  D {human_count(r.tokens):>8}  "
                          f"C {r.flops:.3g}  {r.steps} steps  D/N {r.tokens / r.N:.1f}")
        return 0
    records = run_sweep(plan, progress=_show)
    analysis = analyze(records, bootstrap=args.bootstrap)
    paths = write_analysis(analysis, plan.out_dir)
    _summary(analysis)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _show(event: str, info: dict) -> None:
    if event == "stage":
        console.print(info["message"])
    elif event == "skip":
        console.print(f"[dim]{info['run']}: recorded already, skipped[/dim]")
    elif event in ("run_start", "run_queued"):
        console.print(f"{info['run']}: N {human_count(info['N'])}, D {human_count(info['D'])}, {info['steps']} steps")
    elif event == "run_end":
        bpb = info.get("val_bpb")
        console.print(f"{info['run']}: validation loss {info['val_loss']:.4f}"
                      + (f", {bpb:.4f} bits per byte" if bpb is not None else "")
                      + f" ({info['wall_seconds']:.0f} s)")


def _summary(analysis) -> None:
    from scribelm.scaling.fit import PARAMETER_CONVENTION

    console.print(f"[dim]{PARAMETER_CONVENTION}[/dim]")
    fit = analysis.chinchilla
    if fit is not None:
        iv = fit.intervals()

        def show(name: str, fmt: str) -> str:
            text = format(fit[name], fmt)
            return text + (f" [{format(iv[name][0], fmt)}, {format(iv[name][1], fmt)}]" if name in iv else "")

        console.print(f"L(N, D) = E + A/N^α + B/D^β: E {show('E', '.3f')}, A {show('A', '.4g')}, B {show('B', '.4g')}, "
                      f"α {show('alpha', '.3f')}, β {show('beta', '.3f')}  ({100 * fit.level:.0f}% bootstrap intervals)")
        largest = max(r["C"] for r in analysis.records)
        ratio = fit.tokens_per_parameter(largest)
        interval = ratio["interval"]
        console.print(f"compute-optimal tokens per parameter at {largest:.2g} FLOPs: {ratio['value']:.1f}"
                      + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else ""))
    iso = analysis.isoflop
    if iso is not None:
        tpp = iso.tokens_per_parameter()
        iv = iso.intervals

        def band(key: str, fmt: str) -> str:
            return f" [{format(iv[key][0], fmt)}, {format(iv[key][1], fmt)}]" if key in iv else ""

        console.print(f"IsoFLOP: N_opt ∝ C^{iso.a:.3f}{band('a', '.2f')}, D_opt ∝ C^{iso.b:.3f}{band('b', '.2f')}; "
                      f"tokens per parameter {tpp['value']:.1f}{band('tokens_per_parameter', '.1f')} "
                      f"(per budget {tpp['range'][0]:.1f}–{tpp['range'][1]:.1f})")
        for reason in iso.skipped:
            console.print(f"[yellow]{reason}[/yellow]")
        for p in iso.profiles:
            if not p.bracketed:
                console.print(f"[yellow]at {p.C:.2g} FLOPs the optimum lies outside the sizes run (an extrapolation)[/yellow]")
    for problem in analysis.problems:
        console.print(f"[yellow]{problem}[/yellow]")


def _answer(args, analysis) -> None:
    fit = analysis.chinchilla
    if fit is None:
        raise ConfigError("; ".join(analysis.problems))
    if args.predict is not None:
        n, d = args.predict
        if not (n > 0 and d > 0 and math.isfinite(n) and math.isfinite(d)):
            raise ConfigError("--predict needs a positive N and D")
        loss = float(fit.predict(n, d))
        interval = fit.predict_interval(n, d)
        console.print(f"predicted loss for N = {human_count(n)}, D = {human_count(d)}: {loss:.4f}"
                      + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""))
    if args.optimal is not None:
        C = args.optimal
        if not (C > 0 and math.isfinite(C)):
            raise ConfigError("--optimal needs a positive compute budget in FLOPs")
        n, d = fit.optimal(C)
        iv = fit.optimal_interval(C)
        def band(key: str) -> str:
            return f" [{human_count(iv[key][0])}, {human_count(iv[key][1])}]" if key in iv else ""
        console.print(f"compute-optimal at {C:.3g} FLOPs (C = 6ND): N {human_count(n)}{band('N')}, "
                      f"D {human_count(d)}{band('D')}, {d / n:.1f} tokens per parameter"
                      + (f" [{iv['tokens_per_parameter'][0]:.1f}, {iv['tokens_per_parameter'][1]:.1f}]" if iv else "")
                      + f", predicted loss {float(fit.predict(n, d)):.4f}")
