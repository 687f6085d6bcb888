"""The trainer's own progress, registered with the Accelerator so every checkpoint carries it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainState:
    """Where the run is. Resume reads this back; nothing is ever parsed from a folder name."""

    epoch: int = 0
    """The epoch in progress (0-based)."""
    optimizer_step: int = 0
    """Optimizer steps taken since the start of the run (not micro-batches)."""
    samples_consumed: int = 0
    """Training samples of the current epoch already consumed, summed over all ranks."""
    best_metric: Optional[float] = None
    """Best value of `cfg.monitor` seen so far."""
    best_step: Optional[int] = None
    """Optimizer step at which `best_metric` was reached."""
    evals_without_improvement: int = 0
    """Validations since `best_metric` last improved (early stopping's counter)."""
    nonfinite_skipped: int = 0
    """Optimizer steps dropped because of a non-finite loss or gradient (`on_nonfinite: skip`)."""
    overflow_skipped: int = 0
    """Optimizer steps the fp16 loss scaler skipped."""
    planned_steps: Optional[int] = None
    """The run's length in optimizer steps as last computed from where it stood (None: a stream without a
    length); a resume that computes another (another step size, more epochs) says so (data/run_length.py)."""
    open_losses: Optional[dict] = None
    """Loss sums not yet logged (the log interval's and the validation record's), so a resumed run logs
    the same train_loss as an uninterrupted one: name -> [mean over ranks of the sum, micro-batches]."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)
