"""`scribe pretrain --config recipes/X.yaml [--section.key value ...]`."""

from __future__ import annotations

import math

from scribelm.cli.common import console


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="train a model from a recipe (works under torchrun for DDP/FSDP)",
        description="Train from a YAML recipe. Any recipe key can be overridden: --train.lr 3e-4 --data.batch_size 8. "
                    "A run resumes from the newest usable checkpoint in its out_dir.",
    )
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
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
                          + (f", resuming at step {info['step']}" if info["step"] else ""))
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


def run(args) -> int:
    from scribelm.train.distributed import world_info
    from scribelm.train.pretrain import apply_overrides, build_run, load_recipe

    recipe = apply_overrides(load_recipe(args.config), args.overrides)
    main = world_info().is_main
    with TrainingDisplay() as display:
        trainer = build_run(recipe, progress=display if main else None)
        if trainer.resumed_from is not None and main:
            console.print(f"resumed from {trainer.resumed_from}")
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
