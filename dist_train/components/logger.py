"""Training metrics: `metrics.jsonl` on the main process, plus Accelerate's trackers.

The loop calls `observe` every micro-batch and `log_step` every optimizer step; this component decides
when a record is due (`log_every`). The loss stays on the device between logs, summed there, so the
hot loop never waits for it: it is read back only when a record is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator

from ..config import Config
from ..data import batch_size_of, real_tokens
from ..errors import UserError
from ..state import TrainState
from .throughput import Throughput, memory_fields


def check_trackers_installed(log_with: list[str]) -> None:
    """Raise a UserError for the first `log_with` tracker whose package is missing.

    Accelerate itself only warns and drops such a tracker, and the run would go on unlogged. Its own
    `is_<tracker>_available` checks are asked, so we accept exactly what it accepts (tensorboard: the
    `tensorboard` or `tensorboardX` package). The extras in pyproject.toml are named after the trackers.
    """
    for tracker in log_with:
        available = getattr(accelerate.utils, f"is_{tracker}_available", None)
        if available is None:
            raise UserError(
                f"log_with: {tracker!r} is not supported by accelerate {accelerate.__version__}; "
                f"upgrade it (pip install -U accelerate) or remove {tracker} from log_with."
            )
        if not available():
            raise UserError(
                f"log_with: {tracker!r} needs the {tracker} package, which is not installed; "
                f"run pip install 'dist-train[{tracker}]', or remove {tracker} from log_with."
            )


class _RunningMean:
    """A sum kept on the device, read back only on demand; `count` is in micro-batches of whole steps (the loop's
    `grad_accum_steps` per optimizer step), so that a short step, its losses weighted, counts as one step."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.total = torch.zeros((), dtype=torch.float32, device=accelerator.device)
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        self.total += value.detach().float()

    def carry(self) -> list:
        """[mean over ranks of the running sum, count]: what a checkpoint keeps (a collective)."""
        return [self.accelerator.reduce(self.total.clone(), "mean").item(), self.count]

    def restore(self, carried: list) -> None:
        self.total.fill_(carried[0])
        self.count = int(carried[1])

    def pop(self) -> float | None:
        """The mean over every rank's values since the last pop (a collective: all ranks call it)."""
        if self.count == 0:
            return None
        mean = self.accelerator.reduce(self.total.clone(), "mean").item() / self.count
        self.total.zero_()
        self.count = 0
        return mean


class MetricsLogger:
    """`metrics.jsonl` continues with the run: a fresh start rewrites it, a resume at optimizer step N
    keeps the records up to N (those after it were written by the interrupted run and come again)."""

    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        resumed_step: int = 0,
        rank_times=None,
        resumed_losses: dict | None = None,
        data_wait_s=None,
    ):
        self.cfg = cfg
        self.accelerator = accelerator
        self.is_main_process = accelerator.is_main_process
        self.rank_times = rank_times  # steps -> the straggler fields (a collective; see faults/stragglers.py)
        self.data_wait_s = data_wait_s  # () -> seconds this rank waited for batches since the last call
        self.throughput = Throughput(accelerator.device, cfg.mixed_precision, cfg.flops_per_sample, cfg.peak_tflops, cfg.compile)
        self.log_every = cfg.log_every
        self._interval_loss = _RunningMean(accelerator)
        self._eval_loss = _RunningMean(accelerator)
        self._means = {"interval": self._interval_loss, "eval": self._eval_loss}
        self._samples = 0
        self._tokens = 0
        self._steps = 0
        self._last_time = time.perf_counter()
        self._untimed_s = 0.0
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self._file = self._continue(resumed_step) if self.is_main_process else None
        for name, carried in (resumed_losses or {}).items() if resumed_step else ():
            self._means[name].restore(carried)
        if cfg.log_with:
            accelerator.init_trackers("dist_train", config={k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))})

    def _continue(self, resumed_step: int):
        kept = []
        if resumed_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line cut short by a crash is dropped
                    if json.loads(line).get("step", 0) <= resumed_step:
                        kept.append(line + "\n")
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)  # atomic: a crash here leaves the old file or the new one
        return open(self.path, "a")

    def carry_into(self, state: TrainState) -> None:
        """Before a checkpoint (all ranks): the loss sums not yet logged go into `state`, so a resume continues them."""
        state.open_losses = {name: mean.carry() for name, mean in self._means.items()}

    @contextlib.contextmanager
    def untimed(self):
        """Validation and checkpointing inside a log interval do not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._untimed_s += time.perf_counter() - start

    def observe(self, loss: torch.Tensor, inputs, weight: float = 1.0) -> None:
        """Account one micro-batch (on this rank); no host sync. Its loss is weighted as the gradient is (the exact
        mean over a short step's samples, data/epoch.py): a stand-in (weight 0) adds nothing, and no samples."""
        value = loss if weight == 1 else loss * weight
        self._interval_loss.add(value)
        self._eval_loss.add(value)
        if not weight:
            return
        self._samples += batch_size_of(inputs, None)
        tokens = real_tokens(inputs)  # padding left out where an attention mask says so; a device tensor then
        if tokens is not None:
            self._tokens = self._tokens + tokens

    def log_step(self, state: TrainState, lr: float, grad_norm: torch.Tensor | None) -> dict | None:
        """Called once per optimizer step; writes a record every `log_every` steps and returns it."""
        self._steps += 1
        for mean in self._means.values():
            mean.count += self.cfg.grad_accum_steps
        if state.optimizer_step % self.log_every != 0:
            return None
        now = time.perf_counter()
        seconds = now - self._last_time - self._untimed_s
        world = self.accelerator.num_processes
        # Summed over the ranks in one collective: tokens (uneven with padding), samples, seconds waiting for data.
        waited_s = self.data_wait_s() if self.data_wait_s is not None else 0.0
        sums = torch.tensor([float(self._tokens), float(self._samples), waited_s], dtype=torch.float64, device=self.accelerator.device)
        tokens, samples, waited_s = (self.accelerator.reduce(sums, "sum") if world > 1 else sums).tolist()
        record = {
            "epoch": state.epoch,
            "step": state.optimizer_step,
            "train_loss": self._interval_loss.pop(),
            "lr": lr,
            "samples_per_s": samples / seconds,
            "samples_per_s_per_device": samples / seconds / world,
            "step_time_s": seconds / self._steps,
            "data_wait_share": waited_s / world / seconds,
            **self.throughput.fields(samples, seconds, world),
            **memory_fields(self.accelerator.device),
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if tokens:
            record["tokens_per_s"] = tokens / seconds
            record["tokens_per_s_per_device"] = tokens / seconds / world
        if state.nonfinite_skipped:
            record["nonfinite_skipped"] = state.nonfinite_skipped
        if self.cfg.mixed_precision == "fp16":
            record["overflow_skipped"] = state.overflow_skipped
        if self.rank_times is not None:
            record.update(self.rank_times(self._steps))
        self._samples = self._tokens = self._steps = 0
        self._last_time, self._untimed_s = now, 0.0
        self.write(record)
        return record

    def log_eval(self, state: TrainState, val_metrics: dict) -> dict:
        record = {
            "epoch": state.epoch,
            "step": state.optimizer_step,
            "train_loss": self._eval_loss.pop(),
            **val_metrics,
            "num_processes": self.accelerator.num_processes,
        }
        self.write(record)
        return record

    def write(self, record: dict) -> None:
        if self.cfg.log_with:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, step=record["step"])
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        # Only the trackers: `accelerator.end_training()` would also destroy the process group the loop still uses.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self._file is not None:
            self._file.close()
            self._file = None
