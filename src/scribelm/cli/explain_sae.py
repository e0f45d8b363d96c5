"""`scribe explain sae MODEL --data TEXT_OR_SHARDS --layer L`: train a sparse autoencoder
on one layer's MLP hidden units (or residual stream), streaming activations from the
data; report explained variance, L0, dead features and the loss increase when the
reconstruction is spliced back in; write the SAE, the numbers, every feature's
top-activating contexts (features.json, which `scribe explain MODEL TEXT --sae DIR`
shows on the explain page) and a page of the most frequent features' contexts."""

from __future__ import annotations

import json

from scribelm.cli.common import console, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("sae", help="train a sparse autoencoder on a layer's activations and show its features",
                              description=__doc__)
    p.add_argument("model", help="checkpoint directory, Hugging Face model directory or stored model name")
    p.add_argument("--data", nargs="+", required=True,
                   help="text / JSONL / Parquet files or directories, or a prepared data directory (scribe prepare)")
    p.add_argument("--eval-data", nargs="+", help="held-out text for the report (default: a prepared directory's "
                   "validation split, else 16 other random windows of --data)")
    p.add_argument("--layer", type=int, required=True, help="the block whose activations to read (0-based)")
    p.add_argument("--site", choices=["mlp", "resid"], default="mlp",
                   help="mlp: the MLP's hidden units (blocks.L.mlp.hook_post); resid: the residual stream after the block")
    p.add_argument("--features", type=int, help="dictionary size (default 8 × the activation width)")
    p.add_argument("--k", type=int, help="top-k SAE with k active features; without it: ReLU with an L1 penalty")
    p.add_argument("--l1", type=float, default=1.0, help="L1 coefficient of the ReLU SAE (default 1.0)")
    p.add_argument("--resample-every", type=int, help="resample dead features every N steps (default: 250 for ReLU; "
                   "never for top-k, whose auxiliary loss revives them)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="activations per step (default 1024)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--sequence-length", type=int, default=128, help="tokens per window (default 128, at most the context)")
    p.add_argument("--show", type=int, default=20, help="features to show on the page (the most frequent; default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="explain-sae", help="directory for the SAE and its report (default ./explain-sae)")
    p.add_argument("--force", action="store_true", help="replace an earlier run's directory")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (default cpu)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import itertools
    from pathlib import Path

    import scribelm
    from scribelm.errors import ScribeError
    from scribelm.inspect.sae_report import render_sae_report
    from scribelm.inspect.sae_train import SAETraining, check_site, evaluate_sae, hook_name, token_batches, top_contexts, train_sae
    from scribelm.io import atomic_directory, claim_output_directory

    settings = SAETraining(layer=args.layer, site=args.site, features=args.features, k=args.k, l1_coefficient=args.l1,
                           steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed,
                           resample_every=args.resample_every if args.resample_every is not None else (0 if args.k else 250))
    settings.check()
    out = claim_output_directory(args.output, force=args.force, kind="sparse autoencoder")
    lm = scribelm.load(args.model, device=args.device)
    if lm.tokenizer is None:
        raise ScribeError(f"{args.model} has no tokenizer (tokenizer.json), so it cannot read the data")
    check_site(lm.model, args.layer, args.site)
    windows = dict(batch_size=8, sequence_length=args.sequence_length)
    prepared = len(args.data) == 1 and (Path(args.data[0]) / "manifest.json").is_file()

    def held_out():
        if args.eval_data:
            return itertools.islice(token_batches(lm, args.eval_data, loop=False, **windows), 64)
        if prepared:
            return itertools.islice(token_batches(lm, args.data[0], split="validation", loop=False, **windows), 64)
        return itertools.islice(token_batches(lm, args.data, loop=True, seed=args.seed + 1, **windows), 16)

    def progress(step: int, entry: dict) -> None:
        if not args.json and (step % max(1, args.steps // 10) == 0 or step == args.steps):
            console.print(f"step {step}/{args.steps}: mse {entry['mse']:.3f}, L0 {entry['l0']:.1f}, "
                          f"dead {100 * entry['dead_fraction']:.1f}%")

    sae, log = train_sae(lm, token_batches(lm, args.data, seed=args.seed, **windows), settings, on_step=progress)
    metrics = evaluate_sae(lm, sae, held_out(), args.layer, args.site)
    counts = metrics.pop("firing_counts")
    shown = sorted(range(len(counts)), key=lambda f: -counts[f])[: max(0, args.show)]
    contexts = top_contexts(lm, sae, held_out(), args.layer, args.site, range(sae.config.n_features))
    title = f"{args.model}: sparse autoencoder on {hook_name(args.layer, args.site)} ({sae.config.n_features} features, {sae.config.kind})"
    report = {"model": args.model, "hook": hook_name(args.layer, args.site), "layer": args.layer, "site": args.site,
              "features": sae.config.n_features,
              "kind": sae.config.kind, "k": sae.config.k, "steps": args.steps, **metrics,
              "contexts": {str(f): contexts[f] for f in shown}}
    with atomic_directory(out, kind="sparse autoencoder") as tmp:
        sae.save(tmp / "sae.safetensors")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "features.json").write_text(json.dumps({"hook": report["hook"], "contexts": {str(f): c for f, c in contexts.items() if c}},
                                                      ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "features.html").write_text(render_sae_report(title, metrics, {f: contexts[f] for f in shown}, counts),
                                           encoding="utf-8")
    if args.json:
        print_json(report)
        return 0
    console.print(f"explained variance {metrics['explained_variance']:.3f}, L0 {metrics['l0']:.1f}, "
                  f"dead {100 * metrics['dead_fraction']:.1f}%, loss {metrics['loss_clean']:.4f} → "
                  f"{metrics['loss_spliced']:.4f} spliced (+{metrics['loss_increase']:.4f}; zeroed {metrics['loss_zero_ablated']:.4f})")
    console.print(f"wrote {out / 'sae.safetensors'}, {out / 'report.json'}, {out / 'features.json'} and {out / 'features.html'}")
    console.print(f"see its features on a text: scribe explain {args.model} \"TEXT\" --sae {out}")
    return 0
