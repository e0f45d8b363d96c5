"""One training loop for every objective.

    for step in range(max_steps):                  # or until the time budget is spent
        lr = schedule(step, progress)              # warmup, then cosine/linear decay to a floor
        for micro in range(grad_accum_steps):      # k micro-batches == one batch k× larger
            loss, _ = objective(model, next(batches))
            (loss / grad_accum_steps).backward()   # under autocast for bf16 / fp16
        clip_grad_norm_(params, grad_clip)
        optimizer.step(); optimizer.zero_grad()    # AdamW, decay on matrices only
        every eval_every:       validation loss and bits per byte
        every checkpoint_every: model + training state, atomically; keep the last K and the best

The objective is a plug-in (`objective(model, batch) -> (loss, metrics)`,
see `scribelm.train.objectives`), so pretraining and fine-tuning share this
loop. Only parameters with `requires_grad` are optimized, so an adapter that
freezes the base model trains just its own weights.

Exact resume. A checkpoint holds the model (a normal checkpoint directory,
safetensors) plus `training_state.pt`: optimizer moments, step, elapsed
time, RNG states, the data loader's position and the best validation loss,
written by us with `torch.save` and read back with `weights_only=True`.
Restoring all of it makes the resumed run take the same steps with the same
numbers as a run that was never interrupted (bit for bit on CPU). A
checkpoint is written to a temporary directory and renamed into place when
complete; a damaged one (truncated weights, a training state that does not
load or lacks keys) is skipped with a warning and the one before it used; if
none is usable, resuming is an error rather than a silent fresh start beside
them. Temporaries that killed saves left behind are removed when training
starts and after every save; a full disk ends the run with one line, keeping
the checkpoints already saved.

MFU is relative to `TrainConfig.peak_flops`, else the nominal figure of a
known GPU, else the best of repeated matmuls; a step faster than that peak
raises it (a "peak_flops" progress event), so MFU never exceeds 1.

Several processes. Under `torchrun` the same code wraps the model in DDP
(or FSDP), each rank reads its slice of every global batch, metrics are
averaged over ranks, and rank 0 alone writes files.

Library code does not print: progress goes to an optional callback
`progress(event, info)` with events "start", "step", "eval", "checkpoint",
"peak_flops", "end"; metrics go to `metrics.jsonl` and a plot `loss.png` in `out_dir`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import time
import typing
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scribelm.checkpoint import read_weights, save_checkpoint
from scribelm.errors import CheckpointError, ConfigError, ScribeError, reject_unknown_fields
from scribelm.io import DiskFullError, atomic_file, is_disk_full, write_file_atomically
from scribelm.io import remove_stale_temporaries as remove_stale_temporaries_of
from scribelm.train import distributed as dist_utils
from scribelm.train.objectives import NextTokenObjective
from scribelm.train.schedule import LRSchedule

TRAINING_STATE_FILE = "training_state.pt"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Temporaries of what a run writes (`scribelm.io` names them `.NAME.tmp-PID-XXXX`, `.NAME.old-PID-XXXX`).
_RUN_TEMPORARY = re.compile(r"^\.(step-\d+|best|metrics\.jsonl|loss\.png)\.(?:tmp|old)-")
# Left by earlier versions, which named them without the writer's process id.
_OLDER_TEMPORARY = re.compile(r"^\.(?:step-\d+|best)\.(?:tmp|old)-[A-Za-z0-9_]+$|^\.loss\.png\.tmp\.png$")

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_utils.world_info().local_rank)
        return torch.device("cpu")
    from scribelm.devices import check_device

    device = torch.device(check_device(name))  # a device this build lacks: one clear line, not an assertion
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use device: cpu")
    return device


# Nominal dense peaks (datasheets), matched against the device name in this order.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
# float32 without TF32 runs on the CUDA cores, not the tensor cores.
_GPU_PEAK_FP32 = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "A10": 31.2e12, "L4": 30.3e12, "4090": 82.6e12, "3090": 35.6e12, "V100": 15.7e12, "T4": 8.1e12}


_measured_peaks: dict[tuple[str, torch.dtype], float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s for MFU: a table for known GPUs; on CPU, the best of a few large matmuls
    (measured once per process and device)."""
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPUs have no fast fp16 matmul; autocast's fp16 runs near fp32 speed at best
    key = (str(device), dtype)
    if key not in _measured_peaks:
        _measured_peaks[key] = _measure_peak_flops(device, dtype)
    return _measured_peaks[key]


def _raise_measured_peak(device: torch.device, dtype: torch.dtype, rate: float) -> None:
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    key = (str(device), dtype)
    _measured_peaks[key] = max(_measured_peaks.get(key, 0.0), rate)


def _measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        table = _GPU_PEAK_FP32 if dtype == torch.float32 and not tf32 else _GPU_PEAK_BF16
        for key, flops in table.items():
            if key in name:
                return flops / 2 if dtype == torch.float32 and tf32 else flops  # TF32: half the bf16 rate
    n = 1024 if device.type == "cpu" else 4096
    # Filled without the global RNG: measuring must not change what a resumed run draws next.
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.full((n, n), 0.5, device=device, dtype=dtype)
    best = float("inf")
    # Best of many short runs: on a shared machine some of them get the cores to themselves.
    for _ in range(5 if device.type == "cuda" else 25):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete what interrupted saves of processes no longer running left in out_dir: half-written
    checkpoints (each as large as a complete one), metrics and plot temporaries; only names
    of scribelm's own temporaries. Returns what was removed."""
    out_dir = Path(out_dir)
    removed: list[Path] = []
    for folder in (out_dir / CHECKPOINTS_DIR, out_dir):
        if not folder.is_dir():
            continue
        finals = set()
        for entry in folder.iterdir():
            if match := _RUN_TEMPORARY.match(entry.name):
                finals.add(match.group(1))
            if _OLDER_TEMPORARY.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        for name in sorted(finals):
            removed += remove_stale_temporaries_of(folder / name)
    return removed


def _step_of(checkpoint: Path) -> int:
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def _disk_full(err: BaseException, what: str) -> DiskFullError | None:
    """A one-line error for a full disk (None for other errors)."""
    if not (isinstance(err, DiskFullError) or is_disk_full(err)):
        return None
    return DiskFullError(f"disk full while {what}; free some space and run again")


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints in out_dir, newest first (temporary dirs of unfinished saves never match)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


class Trainer:
    """Train `model` on `objective` over `train_loader`; evaluate on `val_loader`.

    Args:
        model: the module to train (a `scribelm.Transformer` or anything whose
            forward takes the batch's tensors); only parameters with
            `requires_grad=True` are optimized.
        objective: `objective(model, batch) -> (loss, metrics)`; None: next-token
            cross-entropy (`NextTokenObjective`).
        train_loader: iterable of batch dicts (`ids`, `targets`, optional
            `attention_mask`, `positions`). Iterating continues from the
            loader's current position; if it has `state_dict()` and
            `load_state_dict()`, checkpoints save and restore the position.
            Under torchrun each rank's loader yields that rank's slice.
        val_loader: iterable of batch dicts, iterated from its start at every
            evaluation, or None.
        config: a `TrainConfig`.
        out_dir: where checkpoints (`checkpoints/step-N/`, `best/`),
            `metrics.jsonl` and `loss.png` go.
        tokenizer: saved into every checkpoint so each one is a complete model directory.
        run_config: the effective run configuration (recipe), saved as
            `run_config.json` with every checkpoint.
        progress: optional callback `progress(event, info)`.
        save_model: optional `save_model(path, model, extra_files)` that writes a
            model checkpoint directory atomically (default: `scribelm.checkpoint.save_checkpoint`);
            an adapter trainer can save only its own weights.
        load_model_state: optional `load_model_state(path, model)`, the inverse of `save_model`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective | None,
        train_loader: Iterable[dict[str, torch.Tensor]],
        val_loader: Iterable[dict[str, torch.Tensor]] | None,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        tokenizer=None,
        run_config: dict[str, Any] | None = None,
        generation: dict[str, Any] | None = None,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
        save_model: Callable[[Path, torch.nn.Module, dict[str, bytes | str]], Any] | None = None,
        load_model_state: Callable[[Path, torch.nn.Module], None] | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.objective = objective if objective is not None else NextTokenObjective()
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tokenizer = tokenizer
        self.run_config = dict(run_config or {})
        self.generation = generation
        self.progress = progress or (lambda event, info: None)
        self._save_model_fn = save_model
        self._load_model_fn = load_model_state

        self.device = resolve_device(config.device)
        self.world = dist_utils.init_distributed(self.device.type)
        torch.manual_seed(config.seed)

        self.model = model.to(self.device)  # the plain module: state dicts, checkpoints
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no parameters with requires_grad=True; nothing to train")
        wrapped = dist_utils.wrap_model(self.model, config.distributed, self.device)
        self.train_model = torch.compile(wrapped) if config.compile else wrapped  # what forward/backward run through

        self.optimizer = self._make_optimizer()
        self.schedule = LRSchedule(config.lr, config.warmup_steps, config.decay, config.min_lr_ratio)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None

        self.step = 0
        self.tokens_seen = 0
        self.elapsed_s = 0.0  # training time, carried across resumes
        self.best_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._flops_per_token: float | None = None
        self._peak_flops = config.peak_flops
        self._tb = None
        self._last_eval: dict[str, Any] | None = None

    # -- optimizer ----------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Matrices (linear weights, embeddings) are decayed; gains and biases are not.
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kwargs = dict(lr=self.config.lr, betas=(self.config.beta1, self.config.beta2), eps=self.config.eps)
        fused_ok = self.device.type in ("cuda", "cpu") and self.config.distributed != "fsdp"
        if fused_ok:
            try:
                return torch.optim.AdamW(groups, fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError):
                pass
        return torch.optim.AdamW(groups, **kwargs)

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until max_steps or the time budget; evaluate and checkpoint at the end."""
        cfg = self.config
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            if self.step == 0 and self.resumed_from is None:
                self._truncate_metrics(0)  # a fresh start: lines of an earlier attempt would tell two stories
        batches = iter(self.train_loader)
        self._flops_per_token = self._estimate_flops_per_token()
        if self._peak_flops is None:
            self._peak_flops = measure_peak_flops(self.device, self.amp_dtype or torch.float32)
        self.progress("start", {"step": self.step, "max_steps": cfg.max_steps, "time_budget_s": cfg.time_budget_s,
                                "device": str(self.device), "world_size": self.world.world_size,
                                "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                                "peak_flops": self._peak_flops})
        stopped = None
        start_elapsed = self.elapsed_s
        clock = time.process_time if cfg.clock == "process" else time.perf_counter
        t0 = clock()
        window_tokens, window_t = 0, clock()
        self.train_model.train()
        while stopped is None:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                stopped = "max_steps"
                break
            if cfg.time_budget_s is not None and self.elapsed_s >= cfg.time_budget_s:
                stopped = "time_budget"
                break
            lr = self.schedule(self.step, self._progress_fraction())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            try:
                loss, grad_norm, step_tokens = self._train_step(batches)
            except StopIteration:
                stopped = "data_exhausted"
                break
            self.step += 1
            self.tokens_seen += step_tokens
            window_tokens += step_tokens
            now = clock()
            self.elapsed_s = start_elapsed + (now - t0)
            # Agree on time across ranks so all of them stop after the same step.
            if self.world.distributed and cfg.time_budget_s is not None:
                self.elapsed_s = dist_utils.all_reduce_mean([self.elapsed_s], self.device)[0]
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at step {self.step}; "
                    + (f"the last good checkpoint is {self.last_checkpoint}; " if self.last_checkpoint else "no checkpoint was written yet; ")
                    + "lower the learning rate, raise warmup_steps or use fp32/bf16 instead of fp16"
                )
            tokens_per_s = window_tokens / max(now - window_t, 1e-9)
            window_tokens, window_t = 0, now
            record = {
                "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "tokens_per_s": tokens_per_s, "mfu": self._mfu(tokens_per_s), "peak_flops": self._peak_flops,
                "elapsed_s": self.elapsed_s,
            }
            if self.step % cfg.log_every == 0:
                self._log(record)
            record["eta_s"] = self._eta()
            self.progress("step", record)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate_and_log()
                self.train_model.train()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
        if self.val_loader is None:
            final_eval = {}
        elif self._last_eval is not None and self._last_eval.get("step") == self.step:
            final_eval = {k: v for k, v in self._last_eval.items() if k not in ("step", "elapsed_s")}
        else:
            final_eval = self.evaluate_and_log()
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
            self.save()
        self._write_plot()
        result = TrainResult(
            steps=self.step, tokens=self.tokens_seen, elapsed_s=self.elapsed_s, stopped=stopped,
            final_eval=final_eval, best_val_loss=self.best_val_loss, last_checkpoint=self.last_checkpoint,
            best_checkpoint=(self.out_dir / BEST_DIR) if (self.out_dir / BEST_DIR).is_dir() else None,
            resumed_from=self.resumed_from,
        )
        self.progress("end", dataclasses.asdict(result))
        if self._tb is not None:
            self._tb.close()
        return result

    def _progress_fraction(self) -> float:
        """How far along the decay is: the larger of step progress and time progress."""
        fractions = []
        if self.config.max_steps is not None:
            fractions.append(self.schedule.step_progress(self.step, self.config.max_steps))
        if self.config.time_budget_s is not None:
            fractions.append(self.elapsed_s / self.config.time_budget_s)
        return max(fractions)

    def _eta(self) -> float | None:
        eta = []
        if self.config.max_steps is not None and self.step:
            eta.append((self.config.max_steps - self.step) * self.elapsed_s / self.step)
        if self.config.time_budget_s is not None:
            eta.append(self.config.time_budget_s - self.elapsed_s)
        return max(min(eta), 0.0) if eta else None

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _train_step(self, batches) -> tuple[float, float, int]:
        """One optimizer update over grad_accum_steps micro-batches; returns (loss, grad norm, tokens)."""
        cfg = self.config
        k = cfg.grad_accum_steps
        total_loss = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(k):
            batch = _to_device(next(batches), self.device)
            tokens += batch["ids"].numel()
            # Under DDP, all-reduce gradients only once, after the last micro-batch.
            sync = micro == k - 1 or not isinstance(self.train_model, torch.nn.parallel.DistributedDataParallel)
            with (nullcontext() if sync else self.train_model.no_sync()):
                with self._autocast():
                    loss, _ = self.objective(self.train_model, batch)
                scaled = loss / k
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total_loss += scaled.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(total_loss)
        if self.world.distributed:
            loss_value = dist_utils.all_reduce_mean([loss_value], self.device)[0]
            tokens = int(dist_utils.all_reduce_sum([float(tokens)], self.device)[0])
        return loss_value, grad_norm, tokens

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss (per counted token) and, when the objective reports bytes, bits per byte."""
        if self.val_loader is None:
            return {}
        max_batches = self.config.eval_batches if max_batches is None else max_batches
        self.train_model.eval()
        sums: dict[str, float] = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0, "loss": 0.0, "batches": 0.0}
        for i, batch in enumerate(self.val_loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to_device(batch, self.device)
            with self._autocast():
                loss, metrics = self.objective(self.train_model, batch)
            sums["loss"] += float(loss)
            sums["batches"] += 1
            for key in ("nll_sum", "tokens", "bytes"):
                sums[key] += float(metrics.get(key, 0.0))
        keys = list(sums)
        totals = dict(zip(keys, dist_utils.all_reduce_sum([sums[k] for k in keys], self.device)))
        out: dict[str, float] = {}
        if totals["tokens"] > 0:
            out["val_loss"] = totals["nll_sum"] / totals["tokens"]
        elif totals["batches"] > 0:
            out["val_loss"] = totals["loss"] / totals["batches"]
        if totals["bytes"] > 0:
            out["val_bpb"] = totals["nll_sum"] / (math.log(2) * totals["bytes"])
        out["val_tokens"] = totals["tokens"]
        return out

    def evaluate_and_log(self) -> dict[str, float]:
        result = self.evaluate()
        if not result:
            return result
        record = {"step": self.step, "elapsed_s": self.elapsed_s, **result}
        self._last_eval = record
        self._log(record)
        self.progress("eval", record)
        val = result.get("val_loss")
        if val is not None and math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss = val
            if self.config.keep_best:
                self._write_model_dir(self.out_dir / BEST_DIR, {RUN_CONFIG_FILE: self._run_config_json(result)},
                                      what=f"the best checkpoint {self.out_dir / BEST_DIR}")
        self._write_plot()
        return result

    # -- checkpoints --------------------------------------------------------------------
    def _run_config_json(self, extra: dict[str, Any] | None = None) -> str:
        data = {**self.run_config, "train": self.config.to_dict(), "step": self.step}
        if extra:
            data["eval"] = extra
        return json.dumps(data, indent=2, default=str)

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that the next step depends on."""
        state: dict[str, Any] = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "best_val_loss": self.best_val_loss,
            "optimizer": self._optimizer_state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if hasattr(self.train_loader, "state_dict"):
            state["data"] = self.train_loader.state_dict()
        return state

    def _optimizer_state_dict(self) -> dict[str, Any]:
        if self.config.distributed == "fsdp" and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _model_for_saving(self) -> torch.nn.Module:
        if self.config.distributed == "fsdp" and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.world.is_main:
                return None
            from scribelm.model import Transformer

            with torch.device("meta"):
                copy = Transformer(self.model.config)
            copy.load_state_dict(full, assign=True, strict=False)
            if copy.config.tie_embeddings:
                copy.unembedding.weight = copy.token_embedding.weight
            return copy
        return self.model

    def _write_model_dir(self, path: Path, extra_files: dict[str, bytes | str], what: str) -> None:
        model = self._model_for_saving()
        if not self.world.is_main:
            return
        try:
            if self._save_model_fn is not None:
                self._save_model_fn(path, model, extra_files)
            else:
                save_checkpoint(path, model, model.config, self.tokenizer, self.generation, extra_files=extra_files)
        except Exception as err:  # noqa: BLE001 - a Rust writer reports a full disk in a plain exception
            # The atomic save removed its temporary directory; what was saved before is untouched.
            full = _disk_full(err, f"saving {what}")
            if full is None:
                raise
            kept = f" (the last complete checkpoint, {self.last_checkpoint}, is kept)" if self.last_checkpoint else ""
            raise DiskFullError(f"{full}{kept}") from None

    def save(self) -> Path | None:
        """Write checkpoints/step-N (model + training state) atomically; prune old ones. Rank 0 writes.

        Pruning keeps this checkpoint and the newest `keep_last - 1` before it; checkpoints with
        a higher step (left by an attempt this run resumed before) are never counted as newer.
        """
        path = self.out_dir / CHECKPOINTS_DIR / f"step-{self.step:08d}"
        state = self.training_state()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write_model_dir(path, {TRAINING_STATE_FILE: buffer.getvalue(), RUN_CONFIG_FILE: self._run_config_json()},
                              what=f"checkpoint {path}")
        dist_utils.barrier()
        self.last_checkpoint = path
        if self.world.is_main:
            older = [p for p in list_checkpoints(self.out_dir) if _step_of(p) < self.step]
            for old in older[self.config.keep_last - 1:]:
                shutil.rmtree(old, ignore_errors=True)
            remove_stale_temporaries(self.out_dir)
        self.progress("checkpoint", {"step": self.step, "path": str(path)})
        return path

    def resume(self, checkpoint: str | os.PathLike | None = None) -> Path | None:
        """Restore the newest usable checkpoint in out_dir (or `checkpoint`); returns its path or None.

        A checkpoint that fails to load (truncated weights, damaged training
        state) is skipped with a `CheckpointWarning` and the next older one is tried.
        """
        candidates = [Path(checkpoint)] if checkpoint is not None else list_checkpoints(self.out_dir)
        for path in candidates:
            try:
                state = self._read_training_state(path)
                self._load_model_weights(path)
                self._restore_training_state(state)
            except (CheckpointError, OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError) as err:
                if checkpoint is not None:
                    raise CheckpointError(f"cannot resume from {path}: {err}") from None
                warnings.warn(f"skipping checkpoint {path}: {err}", CheckpointWarning, stacklevel=2)
                continue
            self.last_checkpoint = path
            self.resumed_from = path
            self._truncate_metrics(self.step)
            return path
        if candidates:
            # Starting over from random weights beside them would mix two runs in one directory.
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoint(s) in {self.out_dir / CHECKPOINTS_DIR} can be used "
                "(each is damaged, see the warnings); restore one from a copy, or start the run over (--new) or elsewhere"
            )
        return None

    def _read_training_state(self, path: Path) -> dict[str, Any]:
        file = path / TRAINING_STATE_FILE
        if not file.is_file():
            raise CheckpointError(f"{path} has no {TRAINING_STATE_FILE}")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated zip raises several different types
            raise CheckpointError(f"{file} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        _check_training_state(state, file)
        return state

    def _load_model_weights(self, path: Path) -> None:
        if self._load_model_fn is not None:
            self._load_model_fn(path, self.model)
            return
        weights = read_weights(path)
        if self.config.distributed == "fsdp" and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        expected = set(self.model.state_dict())
        tied = getattr(getattr(self.model, "config", None), "tie_embeddings", False)
        missing = sorted(k for k in expected - set(weights) if not (tied and k == "unembedding.weight"))
        if missing:
            raise CheckpointError(f"weights in {path} lack {', '.join(missing[:3])}")
        with torch.no_grad():
            params = self.model.state_dict()
            for name, tensor in weights.items():
                if name not in params:
                    raise CheckpointError(f"weights in {path} have an unexpected tensor {name}")
                if params[name].shape != tensor.shape:
                    raise CheckpointError(f"weight {name} in {path} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
                params[name].copy_(tensor)

    def _restore_training_state(self, state: dict[str, Any]) -> None:
        # The optimizer first: it checks its groups against the model before changing anything.
        if self.config.distributed == "fsdp" and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        if "data" in state and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed_s = float(state["elapsed_s"])
        self.best_val_loss = state.get("best_val_loss")

    # -- metrics ------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            full = _disk_full(err, f"writing {self.out_dir / METRICS_FILE}")
            if full is None:
                raise
            raise full from None
        if self.config.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, record["step"])

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop lines the killed run wrote past the checkpoint, so the file tells one story."""
        file = self.out_dir / METRICS_FILE
        if not self.world.is_main or not file.is_file():
            return
        kept = []
        for line in file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if not isinstance(record, dict) or record.get("step", 0) > step:
                continue
            kept.append(line)
            if step and record.get("step") == step and "val_loss" in record:
                self._last_eval = record  # evaluated already: a resumed run that stops at once need not again
        write_file_atomically(file, "".join(line + "\n" for line in kept))

    def _write_plot(self) -> None:
        if not (self.config.plot and self.world.is_main):
            return
        file = self.out_dir / METRICS_FILE
        if file.is_file():
            try:
                plot_metrics(file, self.out_dir / PLOT_FILE)
            except OSError as err:
                full = _disk_full(err, f"drawing {self.out_dir / PLOT_FILE}")
                if full is None:
                    raise
                raise full from None

    # -- facts --------------------------------------------------------------------------
    def _estimate_flops_per_token(self) -> float:
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "n_layers"):
            from scribelm.inspect.params import flops_per_token

            seq = getattr(self.train_loader, "sequence_length", None) or config.context_length
            return float(flops_per_token(config, seq))
        return 6.0 * sum(p.numel() for p in self.model.parameters())

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilization: achieved training FLOP/s over the device's peak, never above 1.

        A rate above the peak means the peak was wrong (measured while other work held the
        cores, or set too low): the peak is raised to the rate seen, with a "peak_flops" event.
        """
        if not self._peak_flops or not self._flops_per_token:
            return 0.0
        achieved = tokens_per_s * self._flops_per_token / self.world.world_size  # per device
        if achieved > self._peak_flops:
            previous, self._peak_flops = self._peak_flops, achieved
            if self.config.peak_flops is None:  # later runs in this process start from the better figure
                _raise_measured_peak(self.device, self.amp_dtype or torch.float32, achieved)
            self.progress("peak_flops", {"step": self.step, "peak_flops": achieved, "previous": previous})
        return min(achieved / self._peak_flops, 1.0)


# The keys every training state has, with the types they must hold.
_TRAINING_STATE_KEYS: dict[str, tuple[type, ...]] = {
    "step": (int,), "tokens_seen": (int,), "elapsed_s": (int, float), "optimizer": (dict,), "torch_rng": (torch.Tensor,),
}


def _check_training_state(state: Any, file: Path) -> None:
    """Refuse a training state that loads but lacks what a resume needs (a damaged or foreign file)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is damaged (it holds {type(state).__name__}, not a training state)")
    missing = [key for key in _TRAINING_STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{file} is damaged (it lacks {', '.join(missing)})")
    for key, types in _TRAINING_STATE_KEYS.items():
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise CheckpointError(f"{file} is damaged ({key} is {type(state[key]).__name__})")
    if state["step"] < 0 or state["tokens_seen"] < 0:
        raise CheckpointError(f"{file} is damaged (negative step or token count)")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"{file} is damaged (the optimizer state lacks state or param_groups)")
    best = state.get("best_val_loss")
    if best is not None and not isinstance(best, (int, float)):
        raise CheckpointError(f"{file} is damaged (best_val_loss is {type(best).__name__})")
    if "data" in state and not isinstance(state["data"], dict):
        raise CheckpointError(f"{file} is damaged (the data position is {type(state['data']).__name__})")
    if state["torch_rng"].dtype != torch.uint8:
        raise CheckpointError(f"{file} is damaged (torch_rng is not a byte tensor)")


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations during backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in getattr(model, "blocks", []):
        forward = block.forward

        def checkpointed(*args, _forward=forward):
            return checkpoint(_forward, *args, use_reentrant=False)

        block.forward = checkpointed


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
