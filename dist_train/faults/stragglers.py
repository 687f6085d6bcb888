"""Stragglers: which rank is slow, measured where no rank waits for another.

Every rank times its own data loading and forward passes (`HangWatchdog.take_own_s`): the collectives
of backward and the optimizer step make all ranks equally slow, so only this part tells them apart.
At each log step, and only then, the ranks gather these times (one small all-gather); the record gets
the slowest and fastest rank's time per optimizer step and the slowest rank's index. A rank that is
the slowest by more than `margin` over the median in `patience` log intervals in a row gets a warning
naming it and its host.
"""

from __future__ import annotations

import socket
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


class StragglerMonitor:
    def __init__(self, accelerator: Accelerator, margin: float = 0.25, patience: int = 3):
        self.accelerator = accelerator
        self.margin, self.patience = margin, patience
        self.enabled = accelerator.num_processes > 1
        self.hosts = gather_object([socket.gethostname()]) if self.enabled else [socket.gethostname()]
        self._suspect, self._count, self._warned = None, 0, set()

    def record(self, own_s: float, steps: int) -> dict:
        """The straggler fields of a log record (a collective: every rank calls it at the same log step)."""
        if not self.enabled or steps == 0:
            return {}
        per_step = torch.tensor([own_s / steps], dtype=torch.float64, device=self.accelerator.device)
        times = self.accelerator.gather(per_step).tolist()
        slowest = max(range(len(times)), key=times.__getitem__)
        median = sorted(times)[(len(times) - 1) // 2]  # the lower median: with 2 ranks, the other one
        self._track(slowest, times[slowest] > (1 + self.margin) * median, times[slowest], median)
        return {"rank_time_max_s": times[slowest], "rank_time_min_s": min(times), "slowest_rank": slowest}

    def _track(self, slowest: int, slow: bool, seconds: float, median: float) -> None:
        if not slow:
            self._suspect, self._count = None, 0
            return
        self._count = self._count + 1 if slowest == self._suspect else 1
        self._suspect = slowest
        if self._count >= self.patience and slowest not in self._warned and self.accelerator.is_main_process:
            self._warned.add(slowest)
            print(
                f"dist_train: warning: rank {slowest} on {self.hosts[slowest]} is a straggler: {seconds:.3g} s of data "
                f"and forward per optimizer step against a median of {median:.3g} s, in {self._count} log intervals "
                "in a row; check that host (other jobs, a slow disk, thermal throttling).",
                file=sys.stderr,
                flush=True,
            )
