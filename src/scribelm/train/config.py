"""How to train (`TrainConfig`), what came of it (`TrainResult`), and how it can fail.

The model's shape lives in `ModelConfig` and the data in its loaders; a TrainConfig holds
the rest, every field typed and checked when it is made, so a recipe with a wrong value
is refused in one line before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scribelm.errors import ConfigError, ScribeError, reject_unknown_fields
from scribelm.train.schedule import LRSchedule


class TrainingDiverged(ScribeError):
    """The loss became NaN or infinite."""


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be used (and was skipped)."""


@dataclass
class TrainConfig:
    """How to train (the model's shape lives in ModelConfig, the data in its loaders)."""

    max_steps: int | None = None  # optimizer updates; None: until time_budget_s runs out
    time_budget_s: float | None = None  # wall-clock budget; the LR decay follows elapsed/budget
    grad_accum_steps: int = 1
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # decay floor as a fraction of the peak
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # on matrices only: not on norms, biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA or CPU) | fp16 (autocast + grad scaler)
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    eval_batches: int | None = None  # validation batches per evaluation; None: the whole loader
    eval_tasks: str = ""  # evaluation tasks run at each evaluation too (as `scribe eval --tasks`: names or YAML files, comma-separated)
    eval_tasks_limit: int | None = None  # documents per task at each evaluation; None: all
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # step checkpoints kept (older ones are deleted)
    keep_best: bool = True  # also keep the checkpoint with the lowest validation loss in out_dir/best
    log_every: int = 1  # steps between metrics.jsonl lines
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    distributed: str = "ddp"  # under torchrun: ddp | fsdp | none
    peak_flops: float | None = None  # FLOP/s per device that MFU is relative to; None: the nominal figure of known GPUs, else the best of repeated matmuls
    tensorboard: bool = False  # also write TensorBoard events to out_dir/tensorboard
    plot: bool = True  # write out_dir/loss.png
    clock: str = "wall"  # what time_budget_s counts: wall seconds, or "process" CPU seconds (fair comparisons on a busy machine)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
            if value is None and type(None) in allowed:
                continue
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, tuple(a for a in allowed if a is not type(None))) or (
                isinstance(value, bool) and bool not in allowed
            ):
                raise ConfigError(f"train setting '{f.name}' must be {' or '.join(a.__name__ for a in allowed)}, got {value!r}")
        if self.max_steps is None and self.time_budget_s is None:
            raise ConfigError("set max_steps or time_budget_s (or both) so training knows when to stop")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16; got {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp", "none"):
            raise ConfigError(f"distributed must be ddp, fsdp or none; got {self.distributed!r}")
        if self.clock not in ("wall", "process"):
            raise ConfigError(f"clock must be wall or process; got {self.clock!r}")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit < 1:
            raise ConfigError(f"eval_tasks_limit must be >= 1, got {self.eval_tasks_limit}")
        LRSchedule(self.lr, self.warmup_steps, self.decay, self.min_lr_ratio)  # validates

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        reject_unknown_fields(data, cls, "train setting", ConfigError)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    stopped: str  # "max_steps" | "time_budget" | "data_exhausted"
    final_eval: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    resumed_from: Path | None = None
