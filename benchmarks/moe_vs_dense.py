"""A tiny mixture of experts against a dense model with the same active parameters and the same tokens.

    python benchmarks/moe_vs_dense.py                   # 300 steps of 16 × 128 tokens each, bundled corpus
    python benchmarks/moe_vs_dense.py --steps 600 --experts 8 --top-k 2
    python benchmarks/moe_vs_dense.py --only moe       # one of the two (run both at once on two machines)

Both have the shape the quickstart used before it was re-chosen by the scaling law (width 256,
4 layers, batch 16, 4096-token BPE on the bundled King James Bible), its schedule and optimizer. The dense model's SwiGLU MLP has width 768; the MoE has E experts
of width 768 / top_k each, so the k experts a token uses add up to the dense MLP's
parameters and FLOPs (plus a tiny router).
Both see the same batches in the same order for the same number of steps, with the
same schedule; the MoE adds the load-balancing loss (router_aux_loss_coef 0.01).
Prints validation loss and bits per byte of each, total and active parameters, and time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scribelm.config import ModelConfig  # noqa: E402
from scribelm.data.corpora import write_kjv_text  # noqa: E402
from scribelm.data.loader import TokenBatchLoader  # noqa: E402
from scribelm.data.prepare import prepare, train_tokenizer_on  # noqa: E402
from scribelm.inspect.params import parameter_breakdown  # noqa: E402
from scribelm.model import Transformer  # noqa: E402
from scribelm.train.config import TrainConfig  # noqa: E402
from scribelm.train.objectives import NextTokenObjective, token_byte_lengths  # noqa: E402
from scribelm.train.quickstart import DEFAULT_SETTINGS as QUICKSTART  # noqa: E402

# The earlier quickstart shape, kept fixed here so the recorded numbers stay reproducible.
DEFAULT_SETTINGS = dict(QUICKSTART, batch_size=16, model=dict(QUICKSTART["model"], d_model=256, n_layers=4, d_mlp=768))
from scribelm.train.trainer import Trainer  # noqa: E402


def train(config: ModelConfig, data_dir: Path, tokenizer, steps: int, out: Path) -> dict:
    s = DEFAULT_SETTINGS
    torch.manual_seed(0)
    model = Transformer(config)
    train_loader = TokenBatchLoader(data_dir, "train", s["batch_size"], s["sequence_length"], seed=0)
    val_loader = TokenBatchLoader(data_dir, "validation", s["batch_size"], s["sequence_length"], shuffle=False, loop=False)
    cfg = TrainConfig(max_steps=steps, eval_every=0, checkpoint_every=0, keep_last=1, keep_best=False, seed=0,
                      plot=False, **s["train"])
    t0 = time.perf_counter()
    result = Trainer(model, NextTokenObjective(token_byte_lengths(tokenizer)), train_loader, val_loader, cfg, out,
                     tokenizer=tokenizer).fit()
    b = parameter_breakdown(config)
    return {"val_loss": result.final_eval["val_loss"], "val_bpb": result.final_eval["val_bpb"], "tokens": result.tokens,
            "total": b["total"], "active": b["active"], "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--only", choices=["dense", "moe"], help="train just one of the two")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = write_kjv_text(tmp / "kjv.txt")
        tokenizer = train_tokenizer_on([text], DEFAULT_SETTINGS["vocab_size"], val_fraction=DEFAULT_SETTINGS["val_fraction"])
        prepare([text], tmp / "data", tokenizer, val_fraction=DEFAULT_SETTINGS["val_fraction"])
        dense = ModelConfig(vocab_size=tokenizer.vocab_size, name="dense", **DEFAULT_SETTINGS["model"])
        moe = dense.replace(name="moe", n_experts=args.experts, experts_per_token=args.top_k,
                            d_expert=dense.d_mlp // args.top_k)
        rows = {}
        for name, config in (("dense", dense), (f"moe {args.experts}x top-{args.top_k}", moe)):
            if args.only and not name.startswith(args.only):
                continue
            rows[name] = train(config, tmp / "data", tokenizer, args.steps, tmp / name)
            r = rows[name]
            print(f"{name:>16}: val loss {r['val_loss']:.4f}  val bpb {r['val_bpb']:.4f}  "
                  f"params {r['total']:,} total / {r['active']:,} active  {r['tokens']:,} tokens  {r['seconds']:.0f} s",
                  flush=True)
        if len(rows) < 2:
            return
        d, m = rows["dense"], rows[f"moe {args.experts}x top-{args.top_k}"]
        print(f"moe - dense: val loss {m['val_loss'] - d['val_loss']:+.4f}, time ×{m['seconds'] / d['seconds']:.2f}")


if __name__ == "__main__":
    main()
