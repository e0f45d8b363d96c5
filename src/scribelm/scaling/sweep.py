"""A scaling sweep: model shapes × compute budgets, each trained for exactly its budget.

    shapes   depth × width; heads = width / head_dim, d_mlp = mlp_ratio · width (a multiple of 32)
    budgets  training FLOPs C
    run      tokens D = C / (6·N + attention term)   (FLOPs per token of `inspect.params.flops_per_token`)
             steps = D / (batch_size · sequence_length), the cosine schedule stretched over them
    record   one line of OUT/sweep.jsonl: N (three counts), D, C, final validation loss and bits per byte, time

A sweep recipe (YAML):

    data:                      # a prepared directory (`scribe prepare`) ...
      dir: data/kjv
      corpus: kjv              # ... or a corpus prepared once into OUT/data: kjv (bundled) or a text path
      vocab_size: 2048
      val_fraction: 0.02
      batch_size: 16
      sequence_length: 128
    model: {activation: swiglu, ...}     # ModelConfig fields every shape shares
    shapes: {depths: [2, 4], widths: [64, 128], head_dim: 32, mlp_ratio: 2.667}
    budgets: [1e12, 3e12, 1e13]          # FLOPs
    train: {lr: 3e-3, warmup_steps: 20}  # TrainConfig fields (max_steps comes from the budget)
    out_dir: runs/sweep

Each run is an ordinary training run (`train.pretrain.build_run`) in
OUT/runs/<name>: a sweep stopped halfway continues where it stopped, a run
already in sweep.jsonl is skipped, a run that finished training but was not
recorded yet is evaluated from its final checkpoint without retraining.
`parallel` runs several at once, each on its share of the cores.

Before anything trains the plan is checked: a budget that gives no shape a
single batch is refused (a shape that gets no batch at one budget is left out
of that budget and listed), and so is a grid whose largest shape does not fit
in memory (with the estimate).

Parameter counts (`scaling.fit.PARAMETER_CONVENTION`): "N" is the count the
fits use (matrix-multiply parameters, output layer included), "N_total" all
parameters with embeddings, "N_non_embedding" Kaplan's count.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scribelm.errors import ConfigError

SWEEP_FILE = "sweep.jsonl"
SWEEP_KEYS = ("data", "model", "shapes", "budgets", "train", "out_dir", "parallel")
# The sweep's recipe may grow (more shapes, more budgets) or change how it runs without becoming another sweep;
# what each run computes is pinned by its own run directory.
SWEEP_MAY_CHANGE = ("shapes", "budgets", "parallel", "out_dir", "train.eval_batches", "train.device")
DEFAULT_MODEL = dict(activation="swiglu", norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False,
                     attn_out_bias=False, mlp_bias=False, tie_embeddings=True)
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class PlannedRun:
    name: str
    depth: int
    width: int
    budget: float  # the budget asked for (FLOPs)
    steps: int
    tokens: int  # D: steps · batch · sequence
    flops: float  # C actually spent: D · FLOPs per token
    flops_per_token: float
    N: int  # matrix-multiply parameters, output layer included (the fits' N)
    N_total: int
    N_non_embedding: int
    model: dict[str, Any]
    memory_bytes: float


@dataclass
class SweepPlan:
    recipe: dict[str, Any]
    out_dir: Path
    data_dir: Path
    batch_size: int
    sequence_length: int
    runs: list[PlannedRun]
    left_out: list[str] = field(default_factory=list)  # "d2-w256 at 1e12 FLOPs: 1.6 of one batch"
    parallel: int = 1


def load_sweep_config(path: str | os.PathLike) -> dict[str, Any]:
    from scribelm.train.pretrain import load_recipe

    recipe = load_recipe(path)
    unknown = sorted(set(recipe) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key(s): {', '.join(unknown)}; known: {', '.join(SWEEP_KEYS)}")
    return recipe


def shape_config(depth: int, width: int, vocab_size: int, context_length: int, *, head_dim: int = 32,
                 mlp_ratio: float = 8 / 3, model: dict[str, Any] | None = None):
    """The ModelConfig of one shape: heads from head_dim, MLP width from mlp_ratio (rounded to 32)."""
    from scribelm.config import ModelConfig

    if width % head_dim:
        raise ConfigError(f"width {width} is not a multiple of head_dim {head_dim}")
    heads = width // head_dim
    d_mlp = max(32, int(round(mlp_ratio * width / 32)) * 32)
    fields = {**DEFAULT_MODEL, **(model or {})}
    return ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=width, n_layers=depth,
                       n_heads=heads, n_kv_heads=fields.pop("n_kv_heads", heads), d_mlp=d_mlp,
                       name=f"sweep-d{depth}-w{width}", **fields)


def _shapes(section: Any) -> list[tuple[int, int]]:
    if not isinstance(section, dict):
        raise ConfigError("shapes must be a mapping: {depths: [...], widths: [...]} or {list: [[depth, width], ...]}")
    if "list" in section:
        pairs = [tuple(int(v) for v in pair) for pair in section["list"]]
    else:
        depths, widths = section.get("depths"), section.get("widths")
        if not depths or not widths:
            raise ConfigError("shapes needs depths and widths (lists), or list: [[depth, width], ...]")
        pairs = [(int(d), int(w)) for d in depths for w in widths]
    if any(d < 1 or w < 1 for d, w in pairs):
        raise ConfigError("every depth and width must be positive")
    return sorted(set(pairs))


def _budget_name(budget: float) -> str:
    return f"{budget:.2e}".replace("+", "")


def plan_sweep(recipe: dict[str, Any], *, vocab_size: int | None = None, parallel: int | None = None,
               check_memory: bool = True) -> SweepPlan:
    """Every run of the sweep with its exact token budget; refuses budgets and grids that cannot work.

    `vocab_size` is the data's (read from data.dir when None and the data is prepared).
    """
    from scribelm.inspect.params import flops_per_token, parameter_breakdown
    from scribelm.train.memory import GiB, available_memory, estimate_training_memory

    recipe = dict(recipe)
    data = dict(recipe.get("data") or {})
    out_dir = Path(recipe.get("out_dir") or "runs/sweep")
    if "dir" in data and "corpus" in data:
        raise ConfigError("data takes dir (prepared shards) or corpus (prepared into the sweep's folder), not both")
    if "dir" not in data and "corpus" not in data:
        raise ConfigError("the sweep needs data.dir (made by `scribe prepare`) or data.corpus (kjv, or a text file)")
    data_dir = Path(data["dir"]) if "dir" in data else out_dir / "data"
    batch_size = int(data.get("batch_size", 16))
    sequence_length = int(data.get("sequence_length", 128))
    if batch_size < 1 or sequence_length < 2:
        raise ConfigError("data.batch_size must be >= 1 and data.sequence_length >= 2")
    if vocab_size is None:
        if "dir" in data:
            from scribelm.data.prepare import read_manifest

            vocab_size = int(read_manifest(data_dir)["vocab_size"])
        else:
            vocab_size = int(data.get("vocab_size", 2048))
    shapes_section = dict(recipe.get("shapes") or {})
    head_dim = int(shapes_section.get("head_dim", 32))
    mlp_ratio = float(shapes_section.get("mlp_ratio", 8 / 3))
    shapes = _shapes(shapes_section)
    budgets = recipe.get("budgets")
    if not isinstance(budgets, list) or not budgets:
        raise ConfigError("budgets must be a list of training FLOPs, e.g. [1e12, 3e12, 1e13]")
    try:
        budgets = sorted({float(b) for b in budgets})
    except (TypeError, ValueError):
        raise ConfigError(f"budgets must be numbers of training FLOPs, got {budgets}") from None
    if any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise ConfigError("every budget must be a positive number of FLOPs")
    train = dict(recipe.get("train") or {})
    for key in ("max_steps", "time_budget_s"):
        if key in train:
            raise ConfigError(f"train.{key} cannot be set in a sweep: each run's length comes from its compute budget")
    parallel = int(parallel if parallel is not None else recipe.get("parallel", 1))
    if parallel < 1:
        raise ConfigError(f"parallel must be >= 1, got {parallel}")

    batch_tokens = batch_size * sequence_length
    runs, left_out = [], []
    largest = None
    per_token_of: dict[tuple[int, int], float] = {}
    for depth, width in shapes:
        config = shape_config(depth, width, vocab_size, sequence_length, head_dim=head_dim, mlp_ratio=mlp_ratio,
                              model=recipe.get("model"))
        counts = parameter_breakdown(config)
        per_token = float(flops_per_token(config, sequence_length))
        per_token_of[(depth, width)] = per_token
        memory = estimate_training_memory(config, batch_size, sequence_length,
                                          precision=str(train.get("precision", "fp32")))
        if largest is None or memory["total"] > largest[1]["total"]:
            largest = (f"d{depth}-w{width}", memory)
        for budget in budgets:
            steps = int(budget / per_token // batch_tokens)
            if steps < 1:
                left_out.append(f"d{depth}-w{width} at {budget:.3g} FLOPs ({budget / per_token / batch_tokens:.2f} of one batch)")
                continue
            tokens = steps * batch_tokens
            runs.append(PlannedRun(
                name=f"d{depth}-w{width}-C{_budget_name(budget)}", depth=depth, width=width, budget=budget,
                steps=steps, tokens=tokens, flops=tokens * per_token, flops_per_token=per_token,
                N=int(counts["matmul_params"]), N_total=int(counts["total"]),
                N_non_embedding=int(counts["non_embedding"]), model=config.to_dict(), memory_bytes=memory["total"],
            ))
    if check_memory and largest is not None:
        free = available_memory(_device_of(train))
        need = largest[1]["total"] * parallel
        if need > free:
            detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in largest[1].items() if k != "total")
            raise ConfigError(
                f"the largest shape, {largest[0]}, needs about {largest[1]['total'] / GiB:.2f} GiB to train ({detail} GiB)"
                + (f", × {parallel} runs at once" if parallel > 1 else "")
                + f", but only {free / GiB:.1f} GiB is free; use smaller widths or depths, a smaller batch, or less --parallel"
            )
    cheapest = min(per_token_of.values())  # the smallest shape's FLOPs per token
    for budget in budgets:
        if not any(r.budget == budget for r in runs):
            raise ConfigError(
                f"budget {budget:.3g} FLOPs is too small for even the smallest shape to train on one batch of "
                f"{batch_tokens} tokens (that needs {cheapest * batch_tokens:.3g} FLOPs); raise it or use a smaller batch"
            )
    runs.sort(key=lambda r: (r.budget, r.N))  # the cheap budgets first: a sweep stopped early still has whole profiles
    return SweepPlan(recipe=recipe, out_dir=out_dir, data_dir=data_dir, batch_size=batch_size,
                     sequence_length=sequence_length, runs=runs, left_out=left_out, parallel=parallel)


def _device_of(train: dict[str, Any]):
    from scribelm.train.trainer import resolve_device

    return resolve_device(str(train.get("device", "auto")))


# ----------------------------------------------------------------------------- data


def prepare_sweep_data(recipe: dict[str, Any], out_dir: Path, say: Callable[[str], None] = lambda m: None) -> Path:
    """data.dir as it is, or data.corpus prepared once into OUT/data (reused when already there)."""
    from scribelm.data.prepare import prepare, read_manifest, read_split, train_tokenizer_on

    data = recipe.get("data") or {}
    if "dir" in data:
        read_manifest(data["dir"])
        return Path(data["dir"])
    data_dir = out_dir / "data"
    try:
        read_split(data_dir, "train")
        if (data_dir / "tokenizer.json").is_file():
            return data_dir
    except Exception:  # noqa: BLE001 - anything short of complete shards: prepare them
        pass
    corpus = str(data["corpus"])
    val_fraction = float(data.get("val_fraction", 0.02))
    if corpus == "kjv":
        from scribelm.data.corpora import write_kjv_text

        say("writing the bundled corpus (King James Bible) as text")
        inputs = [write_kjv_text(out_dir / "corpus" / "kjv.txt")]
    else:
        inputs = [Path(corpus)]
    vocab_size = int(data.get("vocab_size", 2048))
    say(f"training a {vocab_size}-token BPE and tokenizing {corpus} into {data_dir}")
    tokenizer = train_tokenizer_on(inputs, vocab_size, val_fraction=val_fraction)
    prepare(inputs, data_dir, tokenizer, val_fraction=val_fraction)
    return data_dir


# ----------------------------------------------------------------------------- running


def run_recipe(plan: SweepPlan, run: PlannedRun) -> dict[str, Any]:
    """The ordinary training recipe of one run of the sweep."""
    train = {"warmup_steps": 20, "eval_every": 0, "checkpoint_every": 0, "keep_last": 1, "keep_best": False,
             "plot": False, "log_every": 10, **(plan.recipe.get("train") or {})}
    train["max_steps"] = run.steps
    # A short run still decays: warmup takes at most a fifth of it.
    train["warmup_steps"] = min(int(train["warmup_steps"]), max(run.steps // 5, 0))
    return {
        "model": dict(run.model),
        "data": {"dir": str(plan.data_dir), "batch_size": plan.batch_size, "sequence_length": plan.sequence_length},
        "train": train,
        "out_dir": str(plan.out_dir / "runs" / run.name),
        "resume": True,
    }


def train_one(recipe: dict[str, Any], run: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Train (or finish, or just evaluate) one run; returns its sweep.jsonl record."""
    import torch

    from scribelm.train.pretrain import build_run

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    trainer = build_run(recipe)
    result = trainer.fit()
    return {
        "run": run["name"], "depth": run["depth"], "width": run["width"],
        "N": run["N"], "N_total": run["N_total"], "N_non_embedding": run["N_non_embedding"],
        "D": result.tokens, "C": result.tokens * run["flops_per_token"], "budget": run["budget"],
        "steps": result.steps, "flops_per_token": run["flops_per_token"],
        "val_loss": result.final_eval.get("val_loss"), "val_bpb": result.final_eval.get("val_bpb"),
        "train_seconds": result.elapsed_s, "wall_seconds": time.perf_counter() - started,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }


def read_records(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The runs recorded in OUT/sweep.jsonl ([] when there is none yet)."""
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path} line {number} is not JSON; remove that line to rerun its run") from None
        if isinstance(record, dict) and "run" in record:
            records.append(record)
    return records


def _write_records(out_dir: Path, records: list[dict[str, Any]]) -> None:
    from scribelm.io import write_file_atomically

    records = sorted(records, key=lambda r: (r["budget"], r["N"]))
    write_file_atomically(out_dir / SWEEP_FILE, "".join(json.dumps(r) + "\n" for r in records))


def run_sweep(plan: SweepPlan, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train every planned run not yet recorded; returns all records of the sweep (sweep.jsonl's lines)."""
    from scribelm.train.run_dir import claim_run_directory

    say = progress or (lambda event, info: None)
    defining = {k: v for k, v in plan.recipe.items() if k not in ("out_dir", "parallel")}
    claim_run_directory(plan.out_dir, "sweep", defining, may_change=SWEEP_MAY_CHANGE)
    data_dir = prepare_sweep_data(plan.recipe, plan.out_dir, lambda message: say("stage", {"message": message}))
    from scribelm.data.prepare import read_manifest

    vocab_size = int(read_manifest(data_dir)["vocab_size"])
    if plan.runs and plan.runs[0].model["vocab_size"] != vocab_size:  # the tokenizer came out smaller than asked
        plan = plan_sweep(plan.recipe, vocab_size=vocab_size, parallel=plan.parallel, check_memory=False)
    done = {r["run"]: r for r in read_records(plan.out_dir)}
    todo = []
    for run in plan.runs:
        recorded = done.get(run.name)
        if recorded is not None and recorded.get("steps") == run.steps:
            say("skip", {"run": run.name, "val_loss": recorded.get("val_loss")})
        else:
            todo.append(run)
    records = dict(done)
    say("plan", {"runs": len(plan.runs), "todo": len(todo), "left_out": plan.left_out})

    def record(result: dict[str, Any]) -> None:
        records[result["run"]] = result
        _write_records(plan.out_dir, list(records.values()))
        say("run_end", result)

    if plan.parallel <= 1:
        for run in todo:
            say("run_start", {"run": run.name, "steps": run.steps, "N": run.N, "D": run.tokens})
            record(train_one(run_recipe(plan, run), asdict(run)))
    else:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // plan.parallel)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=plan.parallel, mp_context=context) as pool:
            pending = set()
            for run in todo:
                say("run_queued", {"run": run.name, "steps": run.steps, "N": run.N, "D": run.tokens})
                pending.add(pool.submit(train_one, run_recipe(plan, run), asdict(run), threads))
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(future.result())
    return [records[r] for r in sorted(records, key=lambda name: (records[name]["budget"], records[name]["N"]))]
