"""The run's length in optimizer steps, counted from where the run stands.

`epochs: E` means E epochs, each sample of each epoch once, whatever happened before. So the length is
not `E x steps_per_epoch` at today's step size: a run resumed with another global step (batch size,
`grad_accum_steps`, world size) took its first steps at the old size. It is the steps already taken,
plus the rest of the epoch in progress from its position (`TrainState.samples_consumed`) at this run's
step size, plus the later epochs at this run's step size. An uninterrupted run, or one resumed with the
same step, gets `E x steps_per_epoch` exactly as before. The lr schedule (warmup, linear, cosine) is
spread over this length, so it reaches its end on the run's real last step (components/optim.py).
"""

from __future__ import annotations

import math

from ..config import Config
from ..errors import UserError
from ..state import TrainState
from .epoch import EpochSampler
from .streams import StreamBatches


def steps_left(position, loader, epoch: int, samples_consumed: int, grad_accum_steps: int) -> int | None:
    """Optimizer steps from `samples_consumed` into epoch `epoch` to that epoch's end, at this run's step size;
    None for a stream without a length (its epoch ends when the data does)."""
    if isinstance(position, EpochSampler):
        return position.steps_from(epoch, samples_consumed)
    if isinstance(position, StreamBatches):
        try:
            batches = len(position)  # the user's batches; a TypeError without a length or for a per-rank stream
        except TypeError:
            return None
        left = max(batches - samples_consumed // position.unit_samples, 0)
        return math.ceil(math.ceil(left / position.processes) / grad_accum_steps)  # global micro-batches, then steps
    try:  # a loader dist_train does not position: it cannot stop mid-epoch (resume refuses that), so a whole epoch
        return math.ceil(len(loader) / grad_accum_steps)
    except TypeError:
        return None


def planned_steps(cfg: Config, position, loader, state: TrainState) -> float:
    """The run's total optimizer steps: `max_steps`, or the steps taken plus what the remaining epochs take
    (see the module docstring); inf for a stream without a length under a constant schedule."""
    if cfg.max_steps is not None:
        total = cfg.max_steps
    elif state.epoch >= cfg.epochs:
        total = state.optimizer_step  # finished: nothing left
    else:
        this_epoch = steps_left(position, loader, state.epoch, state.samples_consumed, cfg.grad_accum_steps)
        later = steps_left(position, loader, state.epoch + 1, 0, cfg.grad_accum_steps) if cfg.epochs > state.epoch + 1 else 0
        if this_epoch is None or later is None:
            if cfg.lr_schedule != "constant":
                raise UserError(
                    f"lr_schedule: {cfg.lr_schedule} needs the run's length in optimizer steps, and the training data is a "
                    "stream without a length (an IterableDataset without __len__, or one split per rank); set max_steps, or lr_schedule: constant."
                )
            return math.inf  # the epochs end when the data does
        total = state.optimizer_step + this_epoch + (cfg.epochs - state.epoch - 1) * later
    if cfg.warmup_steps > total:
        raise UserError(f"warmup_steps ({cfg.warmup_steps}) is larger than the run's {total} optimizer steps; lower warmup_steps.")
    return total


def replanned(saved_total: int | None, total: float, state: TrainState, cfg: Config) -> str | None:
    """The one line a resume says when the run's length (and so its lr schedule) is not what the checkpoint's
    run planned: another step size, more epochs, another max_steps. None when it is the same."""
    if saved_total is None or not math.isfinite(total) or saved_total == total:
        return None
    schedule = cfg.lr_schedule + (f" after {cfg.warmup_steps} warmup steps" if cfg.warmup_steps else "")
    return (
        f"dist_train: the run's length is recomputed from where it stands (epoch {state.epoch}, {state.samples_consumed} "
        f"samples into it, at this run's step size): {int(total) - state.optimizer_step} optimizer steps remain, "
        f"{int(total)} in all (the checkpoint's run planned {saved_total}); the lr schedule ({schedule}) spans them"
    )
