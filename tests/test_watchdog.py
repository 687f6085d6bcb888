"""Hangs explain themselves, and stragglers are named: real gloo ranks on CPU."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from dist_train.faults.watchdog import HANG_FILE, LEAVE_AFTER_S, REPORT_FILE, describe_hang
from helpers import read_metrics, run_cli, seed_project_args, write_seed_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = write_seed_project(tmp_path_factory.mktemp("watchdog_seed"), num_train=128, num_val=20)
    (folder / "sleepy.py").write_text(
        textwrap.dedent('''
        import os, time
        from model import MyModel

        class SleepyModel(MyModel):
            """Rank 1 falls asleep forever in its 6th training forward; with slow_s every forward of rank 1 is slower."""

            def __init__(self, hang=True, slow_s=0.0):
                super().__init__()
                self.hang, self.slow_s, self.forwards = hang, slow_s, 0

            def forward(self, x):
                if self.training and os.environ.get("RANK") == "1":
                    self.forwards += 1
                    time.sleep(self.slow_s)
                    if self.hang and self.forwards == 6:
                        self.sleep_forever()
                return super().forward(x)

            def sleep_forever(self):
                while True:
                    time.sleep(1)
    ''')
    )
    return folder


def _args(project, out, *extra):
    return [
        a if not a.startswith("model=") else f"model={project / 'sleepy.py'}:SleepyModel"
        for a in seed_project_args(project, out, "batch_size=8", *extra)
    ]


def test_a_rank_asleep_in_forward_fails_the_job_in_time_naming_it(project, tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    result = run_cli(_args(project, out, "epochs=2", "hang_timeout_s=5", "collective_timeout_s=120"), nproc=2, check=False, timeout=180)
    elapsed = time.monotonic() - start
    ended_after_declared_s = time.time() - (out / "diagnostics" / HANG_FILE).stat().st_mtime
    assert result.returncode != 0
    assert elapsed < 5 + LEAVE_AFTER_S + 40, elapsed  # hang_timeout_s, the ranks' leaving, the start-up of two processes
    # Every rank leaves by itself once the hang is declared (whichever rank declares it), never held for the
    # launcher's kill timeout (torchrun: TERM, then 30 s, then KILL; rank 1 asleep in Python takes TERM as
    # "save at the next step boundary").
    assert ended_after_declared_s < LEAVE_AFTER_S + 5, ended_after_declared_s
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("dist_train: error: no progress for 5 s")]
    assert (out / "diagnostics" / REPORT_FILE).read_text() == line + "\n"
    assert "rank 1 (" in line and "in forward at optimizer step 6, micro-batch 1" in line and "the other ranks wait for it" in line
    assert "rank 0 (" not in line
    stacks = (out / "diagnostics" / "rank1.txt").read_text()
    assert "sleep_forever" in stacks and "in forward" in stacks  # the function where rank 1 is stuck
    assert "backward" in (out / "diagnostics" / "rank0.txt").read_text()  # rank 0 waits in the gradient all-reduce
    assert json.loads((out / "diagnostics" / "rank0.json").read_text())["phase"] == "backward"


def test_a_slow_rank_is_named_in_the_records_and_warned_about(project, tmp_path):
    out = tmp_path / "run"
    result = run_cli(_args(project, out, "epochs=1", "log_every=2", "model_args={hang: false, slow_s: 0.05}"), nproc=2)
    records = [r for r in read_metrics(out) if "lr" in r]
    assert len(records) == 4 and all(r["slowest_rank"] == 1 for r in records)
    assert all(r["rank_time_max_s"] > 0.05 > r["rank_time_min_s"] for r in records)
    output = result.stdout + result.stderr  # (the launcher may pass the ranks' stderr on through its stdout)
    assert "warning: rank 1 on" in output and "is a straggler" in output


def test_the_report_names_the_ranks_behind_and_the_silent_ones(tmp_path):
    positions = [
        {"rank": 0, "host": "a", "step": 7, "micro_batch": 2, "phase": "backward"},
        {"rank": 1, "host": "a", "step": 7, "micro_batch": 2, "phase": "forward"},
        {"rank": 2, "host": "b", "step": 7, "micro_batch": 2, "phase": "backward"},
    ]
    line = describe_hang(positions, 4, 30, tmp_path)
    assert line.startswith("no progress for 30 s (hang_timeout_s): rank 1 (a) in forward at optimizer step 8, micro-batch 2;")
    assert "no stacks from rank(s) [3]" in line and str(tmp_path / "rank1.txt") in line
