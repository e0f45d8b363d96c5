"""Sweep the quickstart's settings: train each for a fixed wall-clock time, report val bpb and tokens/s.

    python benchmarks/quickstart_sweep.py --seconds 75 --grid small
    python benchmarks/quickstart_sweep.py --seconds 75 --set '{"vocab_size": 4096, "model": {"d_model": 192}}'

Each setting overrides scribelm.train.quickstart.DEFAULT_SETTINGS. Data is prepared once per vocabulary
size under --work. Results are appended as JSON lines to --results; the load average is recorded with
each row because a shared machine makes tokens/s noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from scribelm.train.quickstart import DEFAULT_SETTINGS, _merge

GRIDS = {
    "cpu": [
        {},
        {"vocab_size": 1024},
        {"vocab_size": 4096},
        {"model": {"d_model": 128, "n_heads": 4, "n_kv_heads": 4, "d_mlp": 384}},
        {"model": {"d_model": 192, "n_heads": 6, "n_kv_heads": 6, "d_mlp": 512}},
        {"model": {"n_layers": 2}},
        {"sequence_length": 64, "batch_size": 32},
        {"batch_size": 8},
        {"train": {"lr": 1.5e-3}},
        {"train": {"lr": 6e-3}},
        {"train": {"precision": "bf16"}},
    ],
    "small": [
        {},
        {"vocab_size": 1024},
        {"vocab_size": 4096},
        {"model": {"d_model": 192, "n_heads": 6, "n_kv_heads": 6, "d_mlp": 512}},
        {"model": {"n_layers": 6}},
        {"sequence_length": 64, "batch_size": 32},
        {"sequence_length": 256, "batch_size": 8},
        {"train": {"lr": 1e-3}},
        {"train": {"lr": 6e-3}},
        {"train": {"precision": "bf16"}},
    ],
}


def prepared(work: Path, vocab_size: int, val_fraction: float) -> tuple[Path, object]:
    from scribelm.data.corpora import write_kjv_text
    from scribelm.data.prepare import prepare, train_tokenizer_on
    from scribelm.tokenizer import Tokenizer

    data_dir = work / f"kjv-{vocab_size}"
    if not (data_dir / "manifest.json").is_file():
        text = write_kjv_text(work / "kjv.txt")
        tok = train_tokenizer_on([text], vocab_size, val_fraction=val_fraction)
        prepare([text], data_dir, tok, val_fraction=val_fraction)
    return data_dir, Tokenizer.load(data_dir)


def run_one(work: Path, override: dict, seconds: float, seed: int = 0, clock: str = "wall") -> dict:
    from scribelm.config import ModelConfig
    from scribelm.data.loader import TokenBatchLoader
    from scribelm.model import Transformer
    from scribelm.train import NextTokenObjective, TrainConfig, Trainer, token_byte_lengths

    s = _merge(DEFAULT_SETTINGS, override)
    data_dir, tok = prepared(work, s["vocab_size"], s["val_fraction"])
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **s["model"]))
    train = TokenBatchLoader(data_dir, "train", s["batch_size"], s["sequence_length"], seed=seed)
    val = TokenBatchLoader(data_dir, "validation", s["batch_size"], s["sequence_length"], shuffle=False, loop=False)
    cfg = TrainConfig(time_budget_s=seconds, keep_best=False, plot=False, seed=seed, clock=clock, **s["train"])
    run_dir = work / "runs" / str(time.time_ns())
    result = Trainer(model, NextTokenObjective(token_byte_lengths(tok)), train, val, cfg, run_dir).fit()
    return {
        "override": override, "seconds": seconds, "clock": clock, "threads": torch.get_num_threads(), "val_bpb": round(result.final_eval["val_bpb"], 4),
        "steps": result.steps, "tokens_per_s": round(result.tokens / result.elapsed_s),
        "params": model.num_parameters(), "load_avg": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=75)
    parser.add_argument("--grid", choices=sorted(GRIDS))
    parser.add_argument("--set", action="append", default=[], help="JSON override, repeatable")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: budget in CPU seconds, to rank settings fairly on a busy machine")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--work", default="/tmp/scribelm-sweep")
    parser.add_argument("--results", default="sweep.jsonl")
    args = parser.parse_args()
    overrides = list(GRIDS.get(args.grid, [])) + [json.loads(s) for s in args.set]
    work = Path(args.work)
    if args.threads:
        torch.set_num_threads(args.threads)
    for override in overrides:
        row = run_one(work, override, args.seconds, clock=args.clock)
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
