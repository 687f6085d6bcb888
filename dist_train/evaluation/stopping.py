"""Early stopping: owns the policy of when validation says to stop; its counters live in TrainState."""

from __future__ import annotations

import math

from ..config import Config
from ..errors import UserError
from ..state import TrainState


class EarlyStopping:
    def __init__(self, cfg: Config):
        self.monitor = cfg.monitor
        self.sign = 1.0 if cfg.monitor_mode == "min" else -1.0
        self.patience = cfg.early_stopping_patience

    def update(self, state: TrainState, metrics: dict) -> bool:
        """Record one validation in `state`; return whether the monitored metric improved."""
        if metrics.get(self.monitor) is None:
            logged = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
            raise UserError(f"monitor: {self.monitor!r} is never logged by validation; choose one of: {logged}.")
        value = float(metrics[self.monitor])
        improved = math.isfinite(value) and (state.best_metric is None or self.sign * value < self.sign * state.best_metric)
        if improved:
            state.best_metric, state.best_step = value, state.optimizer_step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        return improved

    def should_stop(self, state: TrainState) -> bool:
        return self.patience is not None and state.evals_without_improvement >= self.patience
