"""The optimizer and its learning-rate schedule: built from the config, fused where that is exact.

The schedule is a multiplier of `lr` per optimizer step (warmup, then constant, linear or cosine
decay over the run's step budget). A resumed run follows the current config (`apply_config`).
"""

from __future__ import annotations

import math

import torch
from accelerate.utils import DistributedType

from ..accelerate_internals import PLAIN_BACKENDS
from ..config import Config


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: torch's one-kernel-per-parameter implementation (CPU and CUDA). On CPU torch's default
    is the per-tensor loop, ~12x slower for AdamW on a 1M-parameter matrix (bench/RESULTS.md)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, fused=fused or None)
    optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def can_fuse(model: torch.nn.Module, mixed_precision: str, distributed_type: DistributedType) -> bool:
    """Whether dist_train's built-in optimizer may be torch's fused one (much faster on CPU; see bench/).

    Not under fp16: GradScaler hands fused optimizers its found-inf flag and always calls their step,
    so Accelerate would no longer see skipped steps. Not under FSDP/DeepSpeed, which manage the
    optimizer's parameters themselves. Not with sparse embedding gradients, which fused kernels refuse.
    """
    sparse = any(getattr(module, "sparse", False) is True for module in model.modules())
    return mixed_precision != "fp16" and distributed_type in PLAIN_BACKENDS and not sparse


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


def _schedule(cfg: Config, total_steps: float):
    # A plain function, so that LambdaLR's state_dict leaves it out: a checkpoint never brings back an old length.
    return lambda step: lr_multiplier(step, cfg.lr_schedule, cfg.warmup_steps, total_steps)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: Config, total_steps: float) -> None:
    """Make the (resumed) optimizer and schedule follow `cfg`: its lr, weight decay and momentum, and the
    schedule over `total_steps`, the run's length from where it stands (data/run_length.py).

    A checkpoint carries the hyper-parameters its run had in the optimizer's param groups and the
    scheduler's base rates; without this, a run continued with a new `lr` would keep the old one while
    config.yaml claims the new. The schedule (warmup, decay, the step budget) is a function of the
    optimizer step, the current config and the run's length, so the next step's rate is recomputed here.
    """
    scheduler.lr_lambdas = [_schedule(cfg, total_steps) for _ in optimizer.param_groups]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, multiplier in zip(optimizer.param_groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas)):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * multiplier
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
