"""`scribe quickstart [--minutes 5] [--corpus PATH] [--out DIR]`: a model from nothing, on a CPU."""

from __future__ import annotations

from rich.panel import Panel

from scribelm.cli.common import console
from scribelm.errors import ScribeError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="train a tokenizer and a small model on the bundled corpus in about 5 minutes, then sample",
        description="Trains a byte-level BPE and a small transformer on the King James Bible that ships with the "
                    "package (no network), reports validation bits per byte and prints sampled continuations.",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget for the whole run (default 5)")
    p.add_argument("--corpus", help="your own text: a file or directory of text/JSONL/Parquet (default: the bundled Bible)")
    p.add_argument("--out", default="quickstart",
                   help="output directory (default ./quickstart); the same command again resumes the run there")
    p.add_argument("--new", "--force", dest="new", action="store_true",
                   help="start over in an --out that holds an earlier quickstart: removes what that run wrote "
                        "(never other files; refused on a directory scribelm did not write)")
    p.add_argument("--peak-flops", type=float, dest="peak_flops",
                   help="FLOP/s that MFU is relative to (default: the best of repeated matmuls on this machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from scribelm.cli.pretrain import TrainingDisplay
    from scribelm.train.quickstart import run_quickstart

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_flops is not None and not args.peak_flops > 0:
        raise ScribeError(f"--peak-flops must be positive, got {args.peak_flops}")
    with TrainingDisplay() as display:
        result = run_quickstart(
            args.out, minutes=args.minutes, corpus=args.corpus, seed=args.seed, new=args.new, peak_flops=args.peak_flops,
            stage=lambda message: console.print(f"[bold]·[/bold] {message}"), progress=display,
        )
    console.print(
        f"\n[bold]validation: {result.val_bpb:.3f} bits per byte[/bold] (loss {result.val_loss:.3f} nats/token) on the "
        f"held-out split of {result.corpus}, after {result.steps} steps / {result.tokens:,} tokens "
        f"in {result.train_seconds:.0f} s of training ({result.total_seconds:.0f} s in all)"
    )
    for prompt, text in result.samples:
        console.print(Panel(f"[bold]{prompt}[/bold]{text}", title="sample", title_align="left", expand=False))
    console.print(f"model: {result.model_dir}  (try: scribe generate {result.model_dir} \"In the beginning\")")
    console.print(f"metrics: {result.run_dir / 'metrics.jsonl'}, plot: {result.run_dir / 'loss.png'}")
    return 0
