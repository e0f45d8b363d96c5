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

Beside the loop: `config.py` (TrainConfig, TrainResult), `checkpoints.py` (a
checkpoint's files, which ones are complete, what a resume reads), `metrics.py`
(metrics.jsonl, TensorBoard, the plot) and `flops.py` (the peak MFU is relative to).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from scribelm.checkpoint import read_weights, save_checkpoint
from scribelm.errors import CheckpointError, ConfigError
from scribelm.io import DiskFullError, disk_full_while
from scribelm.train import distributed as dist_utils
from scribelm.train.checkpoints import (
    BEST_DIR, CHECKPOINTS_DIR, RUN_CONFIG_FILE, TRAINING_STATE_FILE, checkpoint_path, copy_weights_into,
    list_checkpoints, prune_checkpoints, read_training_state, remove_stale_temporaries,
)
from scribelm.train.config import CheckpointWarning, TrainConfig, TrainingDiverged, TrainResult
from scribelm.train.flops import measure_peak_flops, raise_measured_peak, training_flops_per_token
from scribelm.train.metrics import MetricsLog
from scribelm.train.objectives import NextTokenObjective
from scribelm.train.schedule import LRSchedule

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


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
        self._train_metrics: dict[str, Any] = {}  # what the objective reported for the last micro-batch
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._flops_per_token: float | None = None
        self._peak_flops = config.peak_flops
        self.metrics = MetricsLog(self.out_dir, writer=self.world.is_main, tensorboard=config.tensorboard, plot=config.plot)
        self._last_eval: dict[str, Any] | None = None
        self._eval_tasks = self._load_eval_tasks()

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
                self.metrics.truncate_after(0)  # a fresh start: lines of an earlier attempt would tell two stories
        batches = iter(self.train_loader)
        self._flops_per_token = training_flops_per_token(self.model, getattr(self.train_loader, "sequence_length", None))
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
            record.update(self._train_metrics)  # e.g. the router's balance
            if self.step % cfg.log_every == 0:
                self.metrics.append(record)
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
        self.metrics.write_plot()
        result = TrainResult(
            steps=self.step, tokens=self.tokens_seen, elapsed_s=self.elapsed_s, stopped=stopped,
            final_eval=final_eval, best_val_loss=self.best_val_loss, last_checkpoint=self.last_checkpoint,
            best_checkpoint=(self.out_dir / BEST_DIR) if (self.out_dir / BEST_DIR).is_dir() else None,
            resumed_from=self.resumed_from,
        )
        self.progress("end", dataclasses.asdict(result))
        self.metrics.close()
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
                    loss, self._train_metrics = self.objective(self.train_model, batch)
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

    def _load_eval_tasks(self) -> list:
        """The `eval_tasks` and their requests, read once (a mistake in them stops the run before it trains)."""
        names = [n.strip() for n in self.config.eval_tasks.split(",") if n.strip()]
        if not names:
            return []
        if self.world.distributed:
            raise ConfigError("eval_tasks runs in one process; evaluate the saved checkpoints with `scribe eval` instead")
        if self.tokenizer is None:
            raise ConfigError("eval_tasks needs the tokenizer: pass tokenizer= to the Trainer")
        from scribelm.evaluate import load_tasks

        tasks = load_tasks(names)
        return [(task, task.requests(limit=self.config.eval_tasks_limit)) for task in tasks]

    @torch.no_grad()
    def evaluate_tasks(self) -> dict[str, float]:
        """Each eval task's metrics on the model as it is now, as "task/metric" keys."""
        if not self._eval_tasks:
            return {}
        from scribelm.evaluate import evaluate
        from scribelm.evaluate.scoring import ScoringModel

        self.model.eval()
        try:
            results = evaluate(ScoringModel(self.model, self.tokenizer), [t for t, _ in self._eval_tasks],
                               requests=[r for _, r in self._eval_tasks])
        finally:
            self.model.train()
        return {f"{r.name}/{metric}": value for r in results for metric, (value, _) in r.metrics.items()}

    def evaluate_and_log(self) -> dict[str, float]:
        result = {**self.evaluate(), **self.evaluate_tasks()}
        if not result:
            return result
        record = {"step": self.step, "elapsed_s": self.elapsed_s, **result}
        self._last_eval = record
        self.metrics.append(record)
        self.progress("eval", record)
        val = result.get("val_loss")
        if val is not None and math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss = val
            if self.config.keep_best:
                self._write_model_dir(self.out_dir / BEST_DIR, {RUN_CONFIG_FILE: self._run_config_json(result)},
                                      what=f"the best checkpoint {self.out_dir / BEST_DIR}")
        self.metrics.write_plot()
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
            full = disk_full_while(err, f"saving {what}")
            if full is None:
                raise
            kept = f" (the last complete checkpoint, {self.last_checkpoint}, is kept)" if self.last_checkpoint else ""
            raise DiskFullError(f"{full}{kept}") from None

    def save(self) -> Path | None:
        """Write checkpoints/step-N (model + training state) atomically; prune old ones. Rank 0 writes.

        Pruning keeps this checkpoint and the newest `keep_last - 1` before it; checkpoints with
        a higher step (left by an attempt this run resumed before) are never counted as newer.
        """
        path = checkpoint_path(self.out_dir, self.step)
        state = self.training_state()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write_model_dir(path, {TRAINING_STATE_FILE: buffer.getvalue(), RUN_CONFIG_FILE: self._run_config_json()},
                              what=f"checkpoint {path}")
        dist_utils.barrier()
        self.last_checkpoint = path
        if self.world.is_main:
            prune_checkpoints(self.out_dir, self.step, self.config.keep_last)
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
                state = read_training_state(path)
                self._load_model_weights(path)
                self._restore_training_state(state)
            except (CheckpointError, OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError) as err:
                if checkpoint is not None:
                    raise CheckpointError(f"cannot resume from {path}: {err}") from None
                warnings.warn(f"skipping checkpoint {path}: {err}", CheckpointWarning, stacklevel=2)
                continue
            self.last_checkpoint = path
            self.resumed_from = path
            evaluated = self.metrics.truncate_after(self.step)
            if evaluated is not None:
                self._last_eval = evaluated  # evaluated already: a resumed run that stops at once need not again
            return path
        if candidates:
            # Starting over from random weights beside them would mix two runs in one directory.
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoint(s) in {self.out_dir / CHECKPOINTS_DIR} can be used "
                "(each is damaged, see the warnings); restore one from a copy, or start the run over (--new) or elsewhere"
            )
        return None

    def _load_model_weights(self, path: Path) -> None:
        if self._load_model_fn is not None:
            self._load_model_fn(path, self.model)
            return
        if self.config.distributed == "fsdp" and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, read_weights(path), options=StateDictOptions(full_state_dict=True, strict=False))
            return
        copy_weights_into(self.model, path)

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

    # -- facts --------------------------------------------------------------------------
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
                raise_measured_peak(self.device, self.amp_dtype or torch.float32, achieved)
            self.progress("peak_flops", {"step": self.step, "peak_flops": achieved, "previous": previous})
        return min(achieved / self._peak_flops, 1.0)


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
