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


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: Config) -> None:
    """Make the (resumed) optimizer and schedule follow `cfg`: its lr, weight decay and momentum.

    A checkpoint carries the hyper-parameters its run had in the optimizer's param groups and the
    scheduler's base rates; without this, a run continued with a new `lr` would keep the old one while
    config.yaml claims the new. The schedule (warmup, decay, the step budget) is a function of the
    optimizer step and the current config, so the next step's rate is recomputed from it here.
    """
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, multiplier in zip(optimizer.param_groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas)):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * multiplier
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
