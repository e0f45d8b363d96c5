"""What a run reports as it goes: `metrics.jsonl`, optional TensorBoard events, `loss.png`.

One JSON object per line (a training step: loss, lr, grad_norm, tokens, tokens_per_s,
mfu, ...; an evaluation: val_loss, val_bpb, ...), appended as the run goes, so a person
can plot it while it runs. After a resume the lines a killed run wrote past its
checkpoint are dropped, so the file tells one story; the plot is redrawn atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from scribelm.errors import ConfigError
from scribelm.io import atomic_file, disk_full_while, write_file_atomically

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TASKS_PLOT_FILE = "eval_tasks.png"  # the eval_tasks' metrics ("task/metric" keys), when a run has them


class MetricsLog:
    """The metrics files of the run in `out_dir`; `writer=False` (ranks other than 0) writes nothing."""

    def __init__(self, out_dir: str | os.PathLike, *, writer: bool = True, tensorboard: bool = False, plot: bool = True):
        self.out_dir = Path(out_dir)
        self.writer = writer
        self.tensorboard = tensorboard
        self.plot = plot
        self._tb = None

    @property
    def file(self) -> Path:
        return self.out_dir / METRICS_FILE

    def append(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.file, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            full = disk_full_while(err, f"writing {self.file}")
            if full is None:
                raise
            raise full from None
        if self.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, record["step"])

    def truncate_after(self, step: int) -> dict[str, Any] | None:
        """Drop the lines past `step` (a killed run's, after a resume); returns the evaluation
        recorded at `step`, if there is one (a resumed run that stops at once need not evaluate again)."""
        if not self.writer or not self.file.is_file():
            return None
        kept, evaluated = [], None
        for line in self.file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if not isinstance(record, dict) or record.get("step", 0) > step:
                continue
            kept.append(line)
            if step and record.get("step") == step and "val_loss" in record:
                evaluated = record
        write_file_atomically(self.file, "".join(line + "\n" for line in kept))
        return evaluated

    def write_plot(self) -> None:
        if not (self.plot and self.writer) or not self.file.is_file():
            return
        try:
            plot_metrics(self.file, self.out_dir / PLOT_FILE)
            plot_task_metrics(self.file, self.out_dir / TASKS_PLOT_FILE)
        except OSError as err:
            full = disk_full_while(err, f"drawing {self.out_dir / PLOT_FILE}")
            if full is None:
                raise
            raise full from None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(file: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for line in Path(file).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_file: str | os.PathLike, png: str | os.PathLike) -> Path:
    """Training and validation loss against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    bpb = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    if bpb:
        ax.set_title(f"validation bits per byte at step {bpb[-1][0]}: {bpb[-1][1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    try:
        with atomic_file(png, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return png


def plot_task_metrics(metrics_file: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """Each evaluation task's metrics ("task/metric" keys of metrics.jsonl) against step, one
    panel per task; None (nothing written) when the run evaluates no tasks."""
    records = read_metrics(metrics_file)
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        for key, value in r.items():
            if "/" in key and isinstance(value, (int, float)) and math.isfinite(value):
                task, metric = key.split("/", 1)
                series.setdefault(task, {}).setdefault(metric, []).append((r["step"], value))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.5), dpi=100, squeeze=False)
    for ax, (task, metrics) in zip(axes[0], sorted(series.items())):
        for metric, points in sorted(metrics.items()):
            ax.plot(*zip(*points), "o-", label=metric)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = Path(png)
    try:
        with atomic_file(png, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return png
