"""The profiler window: a torch.profiler trace of the optimizer steps named by `profile_steps`.

`profile_steps: [start, end]` records from the moment `start` optimizer steps are done until `end`
are done, i.e. the steps numbered start+1 .. end in the logs. Each rank writes its own trace,
`output_dir/profile/rank{R}.pt.trace.json`: a Chrome trace (open it in chrome://tracing or
https://ui.perfetto.dev) that the TensorBoard profiler plug-in also reads
(`tensorboard --logdir output_dir/profile`).

The loop enters the component once around training and calls `step(optimizer_step)` after every
optimizer step; the component decides when to start and stop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    def __init__(self, profile_steps: list[int] | None, output_dir: str | Path, rank: int, device: torch.device):
        self.window = tuple(profile_steps) if profile_steps else None
        self.path = Path(output_dir) / "profile" / f"rank{rank}.pt.trace.json"
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profiler: profile | None = None
        self._done = False

    def __enter__(self) -> StepProfiler:
        return self

    def start_at(self, optimizer_step: int) -> None:
        """Where training begins (0, or a resumed step): the window may open right away."""
        self.step(optimizer_step)

    def step(self, optimizer_step: int) -> None:
        """Called with the number of optimizer steps completed so far."""
        if self.window is None or self._done:
            return
        start, end = self.window
        if self._profiler is None and start <= optimizer_step < end:
            self._profiler = profile(activities=self.activities, record_shapes=True)
            self._profiler.start()
        elif self._profiler is not None and optimizer_step >= end:
            self._finish()

    def _finish(self) -> None:
        self._profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.path))
        self._profiler, self._done = None, True

    def __exit__(self, *exc_info) -> None:
        # A run that ends (or fails) inside the window still leaves the trace of what it did.
        if self._profiler is not None:
            self._finish()
