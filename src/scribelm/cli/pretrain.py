"""`scribe pretrain --config recipes/X.yaml [--section.key value ...]`."""

from __future__ import annotations

import math

from scribelm.cli.common import console
from scribelm.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="train a model from a recipe (works under torchrun for DDP/FSDP)",
        description="Train from a YAML recipe. Any recipe key can be overridden: --train.lr 3e-4 --data.batch_size 8. "
                    "Running the same recipe again resumes from the newest usable checkpoint in its out_dir; "
                    "a different recipe is refused unless --new.",
    )
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--new", "--force", dest="new", action="store_true",
                   help="start over in an out_dir that holds an earlier run: removes that run's checkpoints, metrics "
                        "and plots (never other files; refused on a directory scribelm did not write)")
    p.add_argument("--peak-flops", type=float, dest="peak_flops",
                   help="FLOP/s per device that MFU is relative to (default: the GPU's nominal figure, "
                        "else the best of repeated matmuls)")
    p.set_defaults(handler=run, takes_overrides=True)


class TrainingDisplay:
    """A rich progress bar fed by Trainer events; prints evaluations and checkpoints above it."""

    def __init__(self, quiet_steps: bool = False) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self.task = None
        self.by_time = False

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            self.by_time = info.get("max_steps") is None
            total = info["time_budget_s"] if self.by_time else info["max_steps"]
            where = f"{info['device']}" + (f" × {info['world_size']} processes" if info["world_size"] > 1 else "")
            console.print(f"training {info['parameters']:,} parameters on {where}"
                          + (f" from step {info['step']}" if info["step"] else "")
                          + (f"; MFU relative to {info['peak_flops'] / 1e12:.3g} TFLOP/s per device" if info.get("peak_flops") else ""))
            self.task = self.progress.add_task("train", total=total, status="starting")
        elif event == "step" and self.task is not None:
            eta = info.get("eta_s")
            eta_text = f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else ""
            status = (f"step {info['step']}  loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                      f"{info['tokens_per_s']:,.0f} tok/s  MFU {100 * info['mfu']:.1f}%  {eta_text}")
            completed = info["elapsed_s"] if self.by_time else info["step"]
            self.progress.update(self.task, completed=completed, status=status)
        elif event == "eval":
            bpb = info.get("val_bpb")
            console.print(f"step {info['step']}: validation loss {info['val_loss']:.4f}"
                          + (f", {bpb:.4f} bits per byte" if bpb is not None and math.isfinite(bpb) else ""))
        elif event == "checkpoint":
            console.print(f"[dim]checkpoint {info['path']}[/dim]")
        elif event == "peak_flops":
            console.print(f"[dim]step {info['step']} ran faster than the peak of {info['previous'] / 1e12:.3g} TFLOP/s: "
                          f"MFU is now relative to {info['peak_flops'] / 1e12:.3g} TFLOP/s[/dim]")


def describe_run_directory(claim, resumed_from, step: int) -> None:
    """One line on what happens to the output directory: a new run, a fresh start, or a resume."""
    if claim is None:
        return
    if resumed_from is not None:
        changed = f"; changed: {', '.join(claim.changed)}" if claim.changed else ""
        console.print(f"resuming from step {step} ({resumed_from}){changed}")
    elif claim.removed:
        console.print(f"starting over in {claim.path}: removed the earlier run's {len(claim.removed)} file(s) and folder(s)")
    elif claim.status == "resume":
        console.print(f"{claim.path} holds this run but no checkpoint yet: starting from step 0")


def run(args) -> int:
    from scribelm.train.distributed import world_info
    from scribelm.train.pretrain import apply_overrides, build_run, load_recipe

    overrides = list(args.overrides)
    if args.peak_flops is not None:
        if not args.peak_flops > 0:
            raise ConfigError(f"--peak-flops must be positive, got {args.peak_flops}")
        overrides += ["--train.peak_flops", repr(args.peak_flops)]
    recipe = apply_overrides(load_recipe(args.config), overrides)
    main = world_info().is_main
    with TrainingDisplay() as display:
        trainer = build_run(recipe, progress=display if main else None, new=args.new)
        if main:
            describe_run_directory(trainer.run_directory, trainer.resumed_from, trainer.step)
        result = trainer.fit()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if main:
        ev = result.final_eval
        line = f"done: {result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s ({result.stopped})"
        if "val_bpb" in ev:
            line += f"; validation loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits per byte"
        console.print(line)
        console.print(f"last checkpoint: {result.last_checkpoint}" + (f"; best: {result.best_checkpoint}" if result.best_checkpoint else ""))
    return 0
