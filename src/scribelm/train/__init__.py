"""Training: one Trainer loop, pluggable objectives, schedules, processes.

    from scribelm.train import Trainer, TrainConfig, NextTokenObjective

    trainer = Trainer(model, NextTokenObjective(token_bytes), train_loader, val_loader,
                      TrainConfig(max_steps=1000, lr=1e-3, eval_every=100), "runs/tiny")
    trainer.resume()          # newest usable checkpoint in runs/tiny, if any
    result = trainer.fit()    # TrainResult: steps, final_eval (val_loss, val_bpb), checkpoints

    trainer.py      the loop: optimizer, schedule, accumulation, precision, evaluation, save/resume
    config.py       TrainConfig (how to train), TrainResult (what came of it)
    checkpoints.py  a run's checkpoint directories and training state on disk
    metrics.py      metrics.jsonl, TensorBoard events, loss.png
    flops.py        the peak FLOP/s that MFU is relative to
    objectives.py   next-token, masked-LM and the other losses
    schedule.py     warmup and decay of the learning rate
    distributed.py  torchrun: DDP / FSDP wrapping, ranks, reductions
    run_dir.py      claiming a run directory (one run per directory)
    pretrain.py     `scribe pretrain`: a recipe -> data, model, Trainer
    quickstart.py   `scribe quickstart`: the bundled corpus end to end
    memory.py       memory estimates of a training step
"""

from scribelm.train.checkpoints import list_checkpoints
from scribelm.train.config import CheckpointWarning, TrainConfig, TrainingDiverged, TrainResult
from scribelm.train.objectives import IGNORE_INDEX, NextTokenObjective, token_byte_lengths
from scribelm.train.schedule import LRSchedule
from scribelm.train.trainer import Trainer

__all__ = [
    "CheckpointWarning", "IGNORE_INDEX", "LRSchedule", "NextTokenObjective", "TrainConfig", "TrainResult",
    "Trainer", "TrainingDiverged", "list_checkpoints", "token_byte_lengths",
]
