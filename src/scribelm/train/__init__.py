"""Training: one Trainer loop, pluggable objectives, schedules, processes.

    from scribelm.train import Trainer, TrainConfig, NextTokenObjective

    trainer = Trainer(model, NextTokenObjective(token_bytes), train_loader, val_loader,
                      TrainConfig(max_steps=1000, lr=1e-3, eval_every=100), "runs/tiny")
    trainer.resume()          # newest usable checkpoint in runs/tiny, if any
    result = trainer.fit()    # TrainResult: steps, final_eval (val_loss, val_bpb), checkpoints
"""

from scribelm.train.objectives import IGNORE_INDEX, NextTokenObjective, token_byte_lengths
from scribelm.train.schedule import LRSchedule
from scribelm.train.trainer import (
    CheckpointWarning,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainResult,
    list_checkpoints,
)

__all__ = [
    "CheckpointWarning", "IGNORE_INDEX", "LRSchedule", "NextTokenObjective", "TrainConfig", "TrainResult",
    "Trainer", "TrainingDiverged", "list_checkpoints", "token_byte_lengths",
]
