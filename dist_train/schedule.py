"""Learning-rate schedules, as a multiplier of `lr` per optimizer step."""

from __future__ import annotations

import math

import torch

from .config import Config


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The factor applied to `lr` before optimizer step `step + 1` (step counts steps already taken)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.lr_schedule, cfg.warmup_steps, total_steps)
    )
