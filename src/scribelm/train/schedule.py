"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor.

    lr
    peak ┤    ╭──╮_
         │   ╱     ╲_
         │  ╱        ╲__
    floor┤ ╱             ╲____  ← peak · min_lr_ratio
         └─┴──────────────────► progress
          warmup

Warmup counts optimizer steps (the first updates are the fragile ones, however
long the run). Decay follows *progress*, a fraction in [0, 1]: steps done over
the planned steps, or, for a run with a wall-clock budget, seconds spent over
the budget — so a run that must stop after five minutes still ends its decay
at the floor, whatever speed the machine turns out to have.

The schedule is a pure function of (step, progress): nothing to save but the
step and the elapsed time, which the Trainer keeps in its training state.
"""

from __future__ import annotations

import math

from scribelm.errors import ConfigError

DECAYS = ("cosine", "linear", "constant")


class LRSchedule:
    def __init__(self, peak_lr: float, warmup_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.1) -> None:
        if decay not in DECAYS:
            raise ConfigError(f"lr decay must be one of {', '.join(DECAYS)}; got {decay!r}")
        if peak_lr <= 0:
            raise ConfigError(f"the learning rate must be positive, got {peak_lr}")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.peak_lr, self.warmup_steps, self.decay, self.min_lr_ratio = peak_lr, warmup_steps, decay, min_lr_ratio

    def __call__(self, step: int, progress: float) -> float:
        """Learning rate for optimizer step `step` (0-based) at `progress` in [0, 1] of the run."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        floor = self.peak_lr * self.min_lr_ratio
        p = min(max(progress, 0.0), 1.0)
        if self.decay == "constant":
            return self.peak_lr
        if self.decay == "linear":
            return self.peak_lr - (self.peak_lr - floor) * p
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    def step_progress(self, step: int, max_steps: int) -> float:
        """Progress of the decay phase after `step` updates out of `max_steps`."""
        span = max_steps - self.warmup_steps
        if span <= 0:
            return 1.0
        return (step - self.warmup_steps) / span
