"""A run's checkpoints on disk: where they are, which are complete, what a resume reads.

    out_dir/checkpoints/step-00000500/   a checkpoint directory (model, tokenizer, config)
                        training_state.pt  + optimizer moments, step, elapsed time, RNG
                        run_config.json      states, the data loader's position, best loss
    out_dir/best/                        the checkpoint with the lowest validation loss

Every checkpoint is written to a temporary sibling and renamed into place when complete
(`scribelm.io`), so a directory named step-N is always whole; temporaries that killed
saves left behind are removed by name. The training state is written by us with
`torch.save` and read back with `weights_only=True`, then checked key by key, so a
damaged or foreign file is refused with a reason instead of half-restored.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from scribelm.checkpoint import read_weights
from scribelm.errors import CheckpointError
from scribelm.io import remove_stale_temporaries as remove_stale_temporaries_of

TRAINING_STATE_FILE = "training_state.pt"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Temporaries of what a run writes (`scribelm.io` names them `.NAME.tmp-PID-XXXX`, `.NAME.old-PID-XXXX`).
_RUN_TEMPORARY = re.compile(r"^\.(step-\d+|best|metrics\.jsonl|loss\.png)\.(?:tmp|old)-")
# Left by earlier versions, which named them without the writer's process id.
_OLDER_TEMPORARY = re.compile(r"^\.(?:step-\d+|best)\.(?:tmp|old)-[A-Za-z0-9_]+$|^\.loss\.png\.tmp\.png$")


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def step_of(checkpoint: Path) -> int:
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints in out_dir, newest first (temporary dirs of unfinished saves never match)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune_checkpoints(out_dir: str | os.PathLike, step: int, keep_last: int) -> None:
    """Keep the checkpoint of `step` and the newest `keep_last - 1` before it; checkpoints
    with a higher step (left by an attempt this run resumed before) never count as newer."""
    older = [p for p in list_checkpoints(out_dir) if step_of(p) < step]
    for old in older[keep_last - 1:]:
        shutil.rmtree(old, ignore_errors=True)


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


def read_training_state(path: Path) -> dict[str, Any]:
    """The training state of checkpoint `path`, loaded without unpickling code and checked."""
    file = path / TRAINING_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {TRAINING_STATE_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip raises several different types
        raise CheckpointError(f"{file} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    check_training_state(state, file)
    return state


# The keys every training state has, with the types they must hold.
_TRAINING_STATE_KEYS: dict[str, tuple[type, ...]] = {
    "step": (int,), "tokens_seen": (int,), "elapsed_s": (int, float), "optimizer": (dict,), "torch_rng": (torch.Tensor,),
}


def check_training_state(state: Any, file: Path) -> None:
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


def copy_weights_into(model: torch.nn.Module, path: Path) -> None:
    """Copy checkpoint `path`'s weights into `model` in place (the optimizer keeps pointing at
    the same tensors); every name and shape must match."""
    weights = read_weights(path)
    expected = set(model.state_dict())
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    missing = sorted(k for k in expected - set(weights) if not (tied and k == "unembedding.weight"))
    if missing:
        raise CheckpointError(f"weights in {path} lack {', '.join(missing[:3])}")
    with torch.no_grad():
        params = model.state_dict()
        for name, tensor in weights.items():
            if name not in params:
                raise CheckpointError(f"weights in {path} have an unexpected tensor {name}")
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"weight {name} in {path} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(tensor)
