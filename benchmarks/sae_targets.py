"""Sparse autoencoders on the quickstart model: how well they reach the targets.

    scribe quickstart --out qs                                  # the model and its prepared data
    python benchmarks/sae_targets.py qs/model --data qs/data    # layer 1's MLP, 8× dictionary

Trains, on the activations of `blocks.1.mlp.hook_post` streamed from the
prepared training split, a top-k SAE (k = 32) and a ReLU + L1 SAE, each with
8 × d_mlp features, and reports on the validation split, side by side:
explained variance (target ≥ 0.8), L0 (target ≤ 32), dead features (target
< 5%: never firing on the held-out tokens, and, with more tokens to fire on,
on --dead-tokens tokens of the training split), and the next-token loss
clean / with the reconstruction spliced in / with the activation zeroed.
--save keeps the SAEs (`scribe explain MODEL TEXT --sae` reads a directory
written by `scribe explain sae`, which also holds the report).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

import scribelm
from scribelm.inspect.sae_train import SAETraining, evaluate_sae, firing_counts, token_batches, train_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="prepared data directory (scribe prepare / quickstart's data)")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1", type=float, default=1.0)
    parser.add_argument("--aux", type=float, default=1.0, help="top-k's dead-feature loss coefficient")
    parser.add_argument("--aux-k", type=int, help="dead features in that loss (default half the width)")
    parser.add_argument("--aux-normalized", action="store_true", help="Gao et al.'s form of that loss")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resample-every", type=int, default=0, help="resample dead features every N steps (0: never)")
    parser.add_argument("--dead-window", type=int, default=50, help="steps without firing that make a feature dead")
    parser.add_argument("--only", choices=["topk", "relu"])
    parser.add_argument("--dead-tokens", type=int, default=131072,
                        help="also count dead features on this many training-split tokens (0: skip)")
    parser.add_argument("--save", help="directory to keep the trained SAEs in (KIND.safetensors)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    lm = scribelm.load(args.model, device=args.device)
    windows = dict(batch_size=8, sequence_length=128)
    rows = []
    for kind in ("topk", "relu"):
        if args.only and kind != args.only:
            continue
        settings = SAETraining(layer=args.layer, site="mlp", expansion=8, k=args.k if kind == "topk" else None,
                               l1_coefficient=args.l1, aux_coefficient=args.aux, aux_k=args.aux_k,
                               aux_normalized=args.aux_normalized, grad_clip=args.grad_clip, lr=args.lr, steps=args.steps,
                               batch_tokens=args.batch_tokens, resample_every=args.resample_every,
                               dead_window=args.dead_window)
        start = time.perf_counter()
        def progress(step: int, entry: dict) -> None:
            if step % 50 == 0:
                print(f"  {kind} step {step}: mse {entry['mse']:.2f}, L0 {entry['l0']:.1f}, dead {100 * entry['dead_fraction']:.1f}%",
                      flush=True)

        sae, _ = train_sae(lm, token_batches(lm, args.data, **windows), settings, on_step=progress)
        seconds = time.perf_counter() - start
        held_out = itertools.islice(token_batches(lm, args.data, split="validation", loop=False, **windows), 32)
        metrics = evaluate_sae(lm, sae, held_out, args.layer, "mlp")
        if args.dead_tokens:
            sample = itertools.islice(token_batches(lm, args.data, seed=1, **windows), max(1, args.dead_tokens // 1024))
            counts, tokens = firing_counts(lm, sae, sample, args.layer, "mlp")
            metrics["dead_fraction_train"] = (counts == 0).float().mean().item()
            metrics["dead_tokens_train"] = tokens
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            sae.save(Path(args.save) / f"{kind}.safetensors")
        rows.append((kind, sae.config.n_features, metrics, seconds))
        print(f"{kind}: trained in {seconds:.0f} s", flush=True)
    torch.set_printoptions(precision=4)
    print(f"dead: never fired on the {rows[0][2]['tokens']:,} held-out tokens"
          + (f"; dead (train): never fired on {rows[0][2]['dead_tokens_train']:,} training-split tokens" if args.dead_tokens else ""))
    print(f"{'SAE':<6} {'features':>8} {'EV':>6} {'L0':>6} {'dead':>6} {'dead (train)':>12} {'loss clean':>10} {'spliced':>8} "
          f"{'zeroed':>8} {'increase':>9}")
    for kind, features, m, _ in rows:
        dead_train = f"{100 * m['dead_fraction_train']:11.1f}%" if "dead_fraction_train" in m else f"{'-':>12}"
        print(f"{kind:<6} {features:>8} {m['explained_variance']:6.3f} {m['l0']:6.1f} {100 * m['dead_fraction']:5.1f}% {dead_train} "
              f"{m['loss_clean']:10.4f} {m['loss_spliced']:8.4f} {m['loss_zero_ablated']:8.4f} {m['loss_increase']:+9.4f}")


if __name__ == "__main__":
    main()
