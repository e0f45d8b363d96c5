"""Let the scaling law choose the quickstart's shape: candidates side by side at one budget.

The quickstart's five minutes are a compute budget. Two ways to spend it on a candidate shape:

  at one FLOP budget C   tokens D = C / FLOPs per token, the cosine schedule stretched over exactly those
                         steps (`--fraction`): what the fitted law speaks of, the `law` phase's ranking
  at one time budget     CPU seconds on one thread (`--cpu-seconds`, the Trainer's process clock): what the
                         quickstart can really do, since a small shape runs fewer FLOPs per second on a CPU

Every run trains on one thread (two or more at once, side by side), so the ranking does not depend on
how busy a shared machine is; the table puts validation bits per byte next to each shape's tokens per
CPU second, its FLOPs relative to the old default's, and the CPU seconds it would need to spend C.

    python benchmarks/quickstart_shape.py law --results r.jsonl --cpu-seconds 60   # the law's ranking
    python benchmarks/quickstart_shape.py train --cpu-seconds 60 --results r.jsonl  # every shape, short
    python benchmarks/quickstart_shape.py train --cpu-seconds 60 --parallel 4 \
        --only d2w128@lr=6e-3,d2w128@bs=8,d2w128@bs=32,d3w128                      # lr and batch
    python benchmarks/quickstart_shape.py train --cpu-seconds 150 --parallel 3 --only ref,d2w128,d2w128@bs=8
    python benchmarks/quickstart_shape.py quickstart --old ref   # `scribe quickstart` old vs new at once

`--flops` sets C (default: the old default's FLOPs per token × QUICKSTART_TOKENS_PER_S × QUICKSTART_SECONDS).
Shapes follow the sweep's rule (`scaling.sweep.shape_config`: heads = width / 32, SwiGLU width ≈ 8/3 ·
width rounded to 32); `name@lr=…,bs=…` changes a candidate's peak learning rate or batch size. The law
is docs/scaling/fit.json (fitted with a 1024-token BPE, so its loss is in other units: it only ranks).
Rows are appended to --results as JSON lines. Results: docs/scaling/quickstart_shape.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The old default (4 × 256, 4 heads, MLP 768, batch 16 × 128, lr 3e-3): its measured tokens per CPU second on
#: one thread, and the CPU seconds of the README's long comparison (less than five minutes on two idle cores).
QUICKSTART_TOKENS_PER_S = 3_400
QUICKSTART_SECONDS = 280

def shape(depth: int, width: int, heads: int | None = None, mlp: int | None = None) -> dict:
    """An override of DEFAULT_SETTINGS: the sweep's rule (heads of 32, SwiGLU ≈ 8/3 · width) unless given."""
    heads = heads or max(1, width // 32)
    d_mlp = mlp or max(32, int(round(8 / 3 * width / 32)) * 32)
    return {"model": {"n_layers": depth, "d_model": width, "n_heads": heads, "n_kv_heads": heads, "d_mlp": d_mlp},
            "batch_size": 16, "train": {"lr": 3e-3}}


# "ref" is the old default; the others are named d<depth>w<width>.
CANDIDATES: dict[str, dict] = {"ref": shape(4, 256, heads=4, mlp=768)}
for _d, _w in ((2, 128), (3, 128), (4, 128), (6, 128), (2, 192), (4, 192), (3, 160), (4, 160), (6, 96), (4, 96)):
    CANDIDATES[f"d{_d}w{_w}"] = shape(_d, _w)


def settings_of(name: str) -> dict:
    """A candidate's full quickstart settings: `name` is a candidate, optionally with @lr=…,bs=… after it."""
    from scribelm.train.quickstart import DEFAULT_SETTINGS, _merge

    base, _, extra = name.partition("@")
    s = _merge(DEFAULT_SETTINGS, CANDIDATES[base])
    for item in filter(None, extra.split(",")):
        key, value = item.split("=")
        if key == "lr":
            s["train"]["lr"] = float(value)
        elif key == "bs":
            s["batch_size"] = int(value)
        else:
            raise SystemExit(f"unknown setting {key!r} in {name!r} (lr=, bs=)")
    return s


def model_config(s: dict, vocab_size: int):
    from scribelm.config import ModelConfig

    return ModelConfig(vocab_size=vocab_size, name="quickstart", **s["model"])


def counts(s: dict) -> dict:
    """N (matrix-multiply parameters, output layer included: the law's N) and training FLOPs per token."""
    from scribelm.inspect.params import flops_per_token, parameter_breakdown

    config = model_config(s, s["vocab_size"])
    return {"N": parameter_breakdown(config)["matmul_params"],
            "flops_per_token": float(flops_per_token(config, s["sequence_length"]))}


def prepared(work: Path, vocab_size: int, val_fraction: float) -> Path:
    """The bundled corpus tokenized as the quickstart does it, once per vocabulary size."""
    from scribelm.data.corpora import write_kjv_text
    from scribelm.data.prepare import prepare, train_tokenizer_on

    data_dir = work / f"kjv-{vocab_size}"
    if not (data_dir / "manifest.json").is_file():
        text = write_kjv_text(work / "kjv.txt")
        tokenizer = train_tokenizer_on([text], vocab_size, val_fraction=val_fraction)
        prepare([text], data_dir, tokenizer, val_fraction=val_fraction)
    return data_dir


def train_one(job: dict) -> dict:
    """Train one candidate for `steps` optimizer steps (its share of C) or `cpu_seconds`; evaluate."""
    import torch

    from scribelm.data.loader import TokenBatchLoader
    from scribelm.model import Transformer
    from scribelm.tokenizer import Tokenizer
    from scribelm.train import NextTokenObjective, TrainConfig, Trainer, token_byte_lengths

    torch.set_num_threads(job["threads"])
    s = settings_of(job["name"])
    data_dir = Path(job["data_dir"])
    tokenizer = Tokenizer.load(data_dir)
    torch.manual_seed(job["seed"])
    model = Transformer(model_config(s, tokenizer.vocab_size))
    train = TokenBatchLoader(data_dir, "train", s["batch_size"], s["sequence_length"], seed=job["seed"])
    val = TokenBatchLoader(data_dir, "validation", s["batch_size"], s["sequence_length"], shuffle=False, loop=False)
    # A budget of optimizer steps (a FLOP budget) or of CPU seconds on one thread (what the machine can do).
    budget = {"time_budget_s": job["cpu_seconds"], "clock": "process"} if job.get("cpu_seconds") else {}
    config = TrainConfig(max_steps=job.get("steps"), eval_every=0, checkpoint_every=0, keep_last=1, keep_best=False,
                         plot=False, seed=job["seed"], peak_flops=1e12,  # MFU is unused: skip measuring the peak
                         **budget, **s["train"])
    run_dir = Path(job["work"]) / "runs" / f"{job['name']}-{time.time_ns()}"
    started = time.process_time()
    result = Trainer(model, NextTokenObjective(token_byte_lengths(tokenizer)), train, val, config, run_dir).fit()
    cpu = time.process_time() - started
    return {**job, "steps": result.steps, "C": tokens_flops(s, result.tokens),
            "val_bpb": round(result.final_eval["val_bpb"], 4), "tokens": result.tokens,
            "train_seconds": round(result.elapsed_s, 1), "tokens_per_s": round(result.tokens / result.elapsed_s),
            "tokens_per_cpu_s": round(result.tokens / cpu), "load_avg": round(os.getloadavg()[0], 1)}


def tokens_flops(s: dict, tokens: int) -> float:
    return tokens * counts(s)["flops_per_token"]


def budget_steps(s: dict, flops: float) -> int:
    return max(1, round(flops / counts(s)["flops_per_token"] / (s["batch_size"] * s["sequence_length"])))


def law_table(flops: float, fit_path: Path, measured: dict[str, float], cpu_seconds: float) -> list[dict]:
    """The fitted law's loss for every candidate at C and, where its tokens per CPU second were measured,
    at what it can train in `cpu_seconds` (the law's loss is per token of its own BPE: it only ranks)."""
    law = json.loads(fit_path.read_text())["chinchilla"]

    def loss(N, D):
        return law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"]

    rows = []
    for name in CANDIDATES:
        c = counts(settings_of(name))
        D = flops / c["flops_per_token"]
        row = {"name": name, **c, "tokens": round(D), "tokens_per_param": round(D / c["N"], 1),
               "law_loss": round(loss(c["N"], D), 4)}
        if name in measured:
            row["timed_tokens"] = round(measured[name] * cpu_seconds)
            row["timed_law_loss"] = round(loss(c["N"], row["timed_tokens"]), 4)
        rows.append(row)
    return sorted(rows, key=lambda r: ("timed_law_loss" not in r, r.get("timed_law_loss", r["law_loss"])))


def measured_throughput(results: Path) -> dict[str, float]:
    """Tokens per CPU second of each candidate (plain name, default lr and batch) in earlier result rows."""
    rates: dict[str, list[float]] = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            if row.get("phase") == "train" and "@" not in row["name"]:
                rates.setdefault(row["name"], []).append(row["tokens_per_cpu_s"])
    return {name: sum(r) / len(r) for name, r in rates.items()}


def describe(s: dict) -> str:
    m = s["model"]
    return f"{m['n_layers']}x{m['d_model']} h{m['n_heads']} mlp{m['d_mlp']}"


def print_table(rows: list[dict], flops: float) -> None:
    """One line per run. C/C_old: FLOPs spent relative to the old default's row (else to C); `cpu-s for C`:
    how long this shape needs, at its measured tokens per CPU second, to spend C."""
    ref_c = next((r["C"] for r in rows if r["name"] == "ref"), flops)
    print(f"{'candidate':<16} {'shape':<20} {'N':>9} {'tokens':>10} {'lr':>7} {'batch':>5} {'C/C_old':>7} "
          f"{'val bpb':>8} {'tokens/s':>8} {'tok/cpu-s':>9} {'cpu-s for C':>11}")
    for r in rows:
        s = settings_of(r["name"])
        needed = flops / counts(s)["flops_per_token"] / r["tokens_per_cpu_s"]
        print(f"{r['name']:<16} {describe(s):<20} {counts(s)['N']:>9,} {r['tokens']:>10,} {s['train']['lr']:>7.1e} "
              f"{s['batch_size']:>5} {r['C'] / ref_c:>7.2f} {r['val_bpb']:>8.4f} {r['tokens_per_s']:>8,} "
              f"{r['tokens_per_cpu_s']:>9,} {needed:>11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["law", "probe", "train", "quickstart"])
    parser.add_argument("--flops", type=float, help="the budget C (default: the old quickstart's, see above)")
    parser.add_argument("--fraction", type=float, default=1.0, help="train at this fraction of C (short runs first)")
    parser.add_argument("--cpu-seconds", type=float, dest="cpu_seconds",
                        help="train each for this many CPU seconds on one thread instead of its share of C")
    parser.add_argument("--only", help="comma-separated candidates, each optionally name@lr=…,bs=…")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--steps", type=int, default=40, help="probe: steps per shape")
    parser.add_argument("--old", default="ref", help="quickstart: the old default's candidate name")
    parser.add_argument("--new", help="quickstart: the new candidate (default: the current DEFAULT_SETTINGS)")
    parser.add_argument("--minutes", type=float, default=5.0, help="quickstart: the budget of both runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/scribelm-quickstart-shape")
    parser.add_argument("--results", default="quickstart_shape.jsonl")
    args = parser.parse_args()

    from scribelm.train.quickstart import DEFAULT_SETTINGS

    ref = settings_of("ref")
    flops = args.flops or counts(ref)["flops_per_token"] * QUICKSTART_TOKENS_PER_S * QUICKSTART_SECONDS
    names = args.only.split(",") if args.only else list(CANDIDATES)
    work = Path(args.work)
    print(f"budget C = {flops:.3e} FLOPs (x{args.fraction}); old default: {describe(ref)}, "
          f"{counts(ref)['flops_per_token'] / 1e6:.1f} MFLOP/token", flush=True)

    if args.phase == "law":
        measured = measured_throughput(Path(args.results))
        seconds = args.cpu_seconds or 280
        for r in law_table(flops * args.fraction, ROOT / "docs" / "scaling" / "fit.json", measured, seconds):
            timed = (f"  in {seconds:.0f} cpu-s: D {r['timed_tokens']:>10,}  law loss {r['timed_law_loss']:.4f}"
                     if "timed_tokens" in r else "")
            print(f"{r['name']:<10} {describe(settings_of(r['name'])):<22} N {r['N']:>9,}  at C: D {r['tokens']:>10,}  "
                  f"D/N {r['tokens_per_param']:>6}  law loss {r['law_loss']:.4f}{timed}")
        return

    data_dir = prepared(work, DEFAULT_SETTINGS["vocab_size"], DEFAULT_SETTINGS["val_fraction"])
    if args.phase == "quickstart":
        compare_quickstarts(args, work)
        return
    jobs = []
    for name in names:
        s = settings_of(name)
        steps = args.steps if args.phase == "probe" else budget_steps(s, flops * args.fraction)
        if args.cpu_seconds:
            steps = None
        jobs.append({"name": name, "steps": steps, "cpu_seconds": args.cpu_seconds, "threads": args.threads,
                     "seed": args.seed, "phase": args.phase, "fraction": args.fraction, "flops": flops * args.fraction,
                     "data_dir": str(data_dir), "work": str(work)})
    rows = []
    with ProcessPoolExecutor(max_workers=args.parallel) as pool:
        for row in pool.map(train_one, jobs):
            rows.append(row)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print()
    print_table(rows, flops)


def compare_quickstarts(args, work: Path) -> None:
    """`scribe quickstart` with the old default and with the new one, at the same time, one thread each."""
    from scribelm.train.quickstart import DEFAULT_SETTINGS

    old = settings_of(args.old)
    new = settings_of(args.new) if args.new else DEFAULT_SETTINGS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    code = ("import json, sys, torch; from scribelm.train.quickstart import run_quickstart; torch.set_num_threads(1); "
            "r = run_quickstart(sys.argv[1], minutes=float(sys.argv[2]), settings=json.loads(sys.argv[3]), new=True); "
            "print(json.dumps({'val_bpb': r.val_bpb, 'steps': r.steps, 'tokens': r.tokens, "
            "'train_seconds': r.train_seconds, 'total_seconds': r.total_seconds}))")
    runs = {"old": old, "new": new}
    procs = {label: subprocess.Popen([sys.executable, "-c", code, str(work / f"qs-{label}"), str(args.minutes),
                                      json.dumps(s)], env=env, stdout=subprocess.PIPE, text=True)
             for label, s in runs.items()}
    for label, proc in procs.items():
        out, _ = proc.communicate()
        result = json.loads(out.strip().splitlines()[-1])
        row = {"phase": "quickstart", "which": label, "shape": describe(runs[label]), **result,
               "tokens_per_s": round(result["tokens"] / result["train_seconds"]),
               "load_avg": round(os.getloadavg()[0], 1)}
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
