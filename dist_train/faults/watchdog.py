"""Hangs explain themselves: a rank that makes no progress for `hang_timeout_s` stops the job, saying where.

The loop marks its progress with `watchdog.at(phase)` (a string and a clock read: nothing else on the
hot path). A daemon thread on every rank checks the mark once a second. When a rank has not moved for
`hang_timeout_s`, or another rank has already declared a hang, it writes the Python stacks of all its
threads to `output_dir/diagnostics/rank{R}.txt` and its position to `rank{R}.json`. The first rank to
declare the hang (an exclusive create of `diagnostics/hang.json`, so on a shared file system exactly
one) waits a few seconds for the others' files, prints one line naming the rank(s) that are behind the
others and the files to read (kept in `diagnostics/hang_report.txt`), and ends its process with status
1. The other ranks leave right after it, status 1 too, rather than wait for the launcher to stop them: a
rank stuck in a C++ collective never runs a Python signal handler, and one that does takes TERM as "save
at the next step boundary", which never comes, so torchrun would wait out its 30 s before its SIGKILL.

"Behind" is decided from the positions: the ranks at the smallest (optimizer step, micro-batch, phase)
are the culprits, since the others are waiting for them in a collective. With NCCL, PyTorch's flight
recorder is also asked to dump its trace of the collectives into the same folder on a timeout
(`TORCH_NCCL_DUMP_ON_TIMEOUT`), see `enable_flight_recorder`.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

# The phases of one micro-batch, in order: a rank in an earlier phase at the same position is behind.
PHASES = ("data", "forward", "backward", "optimizer", "step boundary", "validation", "checkpoint")
HANG_FILE, REPORT_FILE = "hang.json", "hang_report.txt"
GRACE_S = 10.0  # how long the declaring rank waits for the other ranks' stacks
LEAVE_AFTER_S = GRACE_S + 5.0  # the longest a rank that did not declare waits for the report before it leaves


def clear_stale(output_dir: str | Path) -> None:
    """Remove a previous run's hang declaration (main process, before any rank starts watching)."""
    folder = Path(output_dir) / "diagnostics"
    for stale in [folder / HANG_FILE, folder / REPORT_FILE, *folder.glob("rank*.json")]:
        stale.unlink(missing_ok=True)


def enable_flight_recorder(diagnostics: Path) -> None:
    """Ask NCCL's flight recorder to dump on a collective timeout (read when the process group is made)."""
    diagnostics.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(diagnostics / "nccl_trace_rank_"))


class HangWatchdog:
    def __init__(self, timeout_s: float | None, output_dir: str | Path, rank: int, world_size: int):
        self.timeout_s = timeout_s
        self.folder = Path(output_dir) / "diagnostics"
        self.rank, self.world_size = rank, world_size
        self.phase, self.step, self.micro = "data", 0, 0
        self._since = time.monotonic()
        self._own_s = 0.0  # time in phases that wait for no other rank (data, forward), for the straggler check
        self._data_s = 0.0  # time waiting for the next batch, for the log's data_wait_share
        self._stop = threading.Event()
        self._thread = None
        if timeout_s:
            self._thread = threading.Thread(target=self._watch, name="dist_train-hang-watchdog", daemon=True)

    def __enter__(self) -> HangWatchdog:
        if self._thread is not None:
            self._since = time.monotonic()
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()

    def at(self, phase: str, step: int | None = None) -> None:
        """Mark progress: this rank entered `phase` (at optimizer step `step`, when given)."""
        now = time.monotonic()
        if self.phase in ("data", "forward"):
            self._own_s += now - self._since
            if self.phase == "data":
                self._data_s += now - self._since
        if phase == "forward":
            self.micro += 1
        if step is not None:
            self.step, self.micro = step, 0
        self.phase, self._since = phase, now

    def take_own_s(self) -> float:
        """Seconds this rank spent loading data and in forward since the last call (no collective waits)."""
        own, self._own_s = self._own_s, 0.0
        return own

    def take_data_s(self) -> float:
        """Seconds this rank waited for batches since the last call."""
        waited, self._data_s = self._data_s, 0.0
        return waited

    # ---- the watching thread ------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            stalled_s = time.monotonic() - self._since
            declared = (self.folder / HANG_FILE).exists()
            if stalled_s < self.timeout_s and not declared:
                continue
            self._dump(stalled_s)
            if not declared and self._declare(stalled_s):
                self._report_and_exit()
            # Another rank reports the hang and leaves; this one has left its stacks and follows it.
            deadline = time.monotonic() + LEAVE_AFTER_S
            while not (self.folder / REPORT_FILE).exists() and time.monotonic() < deadline:
                if self._stop.wait(0.5):
                    return
            self._stop.wait(1.0)  # so that the launcher sees the declaring rank fail first, as the root cause
            os._exit(1)

    def _position(self, stalled_s: float) -> dict:
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step,
            "micro_batch": self.micro,
            "phase": self.phase,
            "stalled_s": round(stalled_s, 1),
        }

    def _dump(self, stalled_s: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        position = self._position(stalled_s)
        with open(self.folder / f"rank{self.rank}.txt", "w") as f:
            f.write(f"{json.dumps(position)}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        tmp = self.folder / f".rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(position))
        os.replace(tmp, self.folder / f"rank{self.rank}.json")  # complete or absent, for the reporter

    def _declare(self, stalled_s: float) -> bool:
        try:
            fd = os.open(self.folder / HANG_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._position(stalled_s), f)
        return True

    def _report_and_exit(self) -> None:
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and len(self._positions()) < self.world_size:
            time.sleep(0.5)
        line = f"dist_train: error: {describe_hang(self._positions(), self.world_size, self.timeout_s, self.folder)}"
        print(line, file=sys.stderr, flush=True)
        try:
            (self.folder / REPORT_FILE).write_text(line + "\n")  # after the print: the others leave once it is there
        except OSError:
            pass  # (a full disk) the others leave after LEAVE_AFTER_S instead
        os._exit(1)  # the main thread is stuck

    def _positions(self) -> list[dict]:
        found = []
        for rank in range(self.world_size):
            try:
                found.append(json.loads((self.folder / f"rank{rank}.json").read_text()))
            except (OSError, ValueError):
                continue
        return found


def describe_hang(positions: list[dict], world_size: int, timeout_s: float, folder: Path) -> str:
    """One line: which rank(s) are behind the others, where, and which files to read."""
    key = lambda p: (p["step"], p["micro_batch"], PHASES.index(p["phase"]) if p["phase"] in PHASES else 0)
    earliest = min(map(key, positions))
    behind = [p for p in positions if key(p) == earliest]
    silent = sorted(set(range(world_size)) - {p["rank"] for p in positions})
    where = "; ".join(
        f"rank {p['rank']} ({p['host']}) in {p['phase']} at optimizer step {p['step'] + 1}, micro-batch {p['micro_batch']}" for p in behind
    )
    others = "" if len(behind) == len(positions) else f"; the other ranks wait for it (stacks in {folder}/rank*.txt)"
    culprit_files = ", ".join(str(folder / f"rank{p['rank']}.txt") for p in behind)
    unheard = f"; no stacks from rank(s) {silent} (dead, or on a node without this output_dir)" if silent else ""
    return f"no progress for {timeout_s:g} s (hang_timeout_s): {where}{others}{unheard}. Read {culprit_files} for where it is stuck."
