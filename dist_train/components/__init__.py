"""What the loop calls at a step: the loss, the optimizer and its schedule, the guards, and what it records.

Each component owns its policy (whether it is due, what it does); the loop owns the math.

- `loss.py`: the built-in losses, the model's own, the user's function; the per-sample form.
- `optim.py`: the optimizer (fused where exact) and the lr schedule.
- `nonfinite.py`: NaN/inf steps, stopped or skipped; `unused.py`: parameters DDP would fail on.
- `ema.py`: the EMA weights.
- `logger.py`: `metrics.jsonl` and the trackers; `throughput.py`: FLOPs, MFU, memory, data wait; `plot.py`: the curves; `profiling.py`: the profiler window.
"""

from .ema import EMA
from .logger import MetricsLogger, check_trackers_installed
from .loss import Loss, logits_of
from .nonfinite import NonfiniteGuard, grad_norm
from .optim import apply_config, build_optimizer, build_scheduler, can_fuse
from .plot import plot_if_available, plot_run
from .profiling import StepProfiler
from .unused import UnusedParameterCheck

__all__ = [
    "EMA",
    "Loss",
    "MetricsLogger",
    "NonfiniteGuard",
    "StepProfiler",
    "UnusedParameterCheck",
    "apply_config",
    "build_optimizer",
    "build_scheduler",
    "can_fuse",
    "check_trackers_installed",
    "grad_norm",
    "logits_of",
    "plot_if_available",
    "plot_run",
]
