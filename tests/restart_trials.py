"""The kill-and-restart trial, N times in a row: not a test (CI runs tests/test_restart.py once), a soak run by hand.

    python tests/restart_trials.py [--trials 10] [--timeout_s 300] [--num_workers 2] [--keep DIR]

Each trial: `accelerate launch --max_restarts 2` of 2 CPU processes (gloo), SIGKILL one rank once the run
has logged optimizer step 6 (after the checkpoint at step 4), alternating rank 1 and rank 0 (the holder of
the output_dir lock, with DataLoader workers forked from it), then wait for the launcher. A trial passes
when the job exits 0 within the timeout (else: a hang, reported as such) and its final weights are
bitwise those of an uninterrupted run. Prints one line per trial and a summary; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_restart import _args, _finish, _launch, _rank_pid, _wait_for_step

from helpers import SLOW_MODEL, load_weights, write_seed_project


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--timeout_s", type=float, default=300, help="a trial still running this long after the kill is a hang")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one, removed)")
    options = parser.parse_args()
    root = Path(options.keep or tempfile.mkdtemp(prefix="restart-trials-"))
    project = write_seed_project(root / "project", num_train=256, num_val=32, files={"slow_model.py": SLOW_MODEL})
    args = lambda out: _args(
        project,
        out,
        "checkpoint_every=4",
        f"num_workers={options.num_workers}",
        f"model={project / 'slow_model.py'}:SlowModel",
        "model_args.delay_s=0.05",
    )
    reference = _launch(args(root / "reference"), max_restarts=0)
    output = _finish(reference, options.timeout_s)
    if reference.returncode != 0:
        print(output[-4000:])
        return 1
    expected = load_weights(root / "reference")
    results = []
    for trial in range(1, options.trials + 1):
        out, rank = root / f"trial{trial:02d}", trial % 2
        started = time.monotonic()
        run = _launch(args(out), max_restarts=2)
        _wait_for_step(out, run, 6)
        killed_at = time.monotonic()
        os.kill(_rank_pid(run, rank), signal.SIGKILL)
        try:
            output, verdict = _finish(run, options.timeout_s), ""
        except AssertionError:
            output, verdict = "", f"HANG (> {options.timeout_s:.0f} s after the kill)"
        after_kill, total = time.monotonic() - killed_at, time.monotonic() - started
        if not verdict:
            if run.returncode != 0:
                verdict = f"FAILED: exit {run.returncode}"
            else:
                got = load_weights(out)
                equal = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
                verdict = "ok, weights bitwise equal" if equal else "FAILED: weights differ"
        resumed = re.findall(r"resumed from \S+ at optimizer step (\d+)", output)
        restarts = output.count("dist_train: restart ")
        results.append((verdict.startswith("ok"), after_kill, total))
        print(
            f"trial {trial:2d}: killed rank {rank}, {restarts} restart(s), resumed at step {','.join(resumed) or '-'}, "
            f"exit after {after_kill:5.1f} s (run {total:5.1f} s): {verdict}",
            flush=True,
        )
        if not verdict.startswith("ok"):
            (root / f"trial{trial:02d}.log").write_text(output)
    passed = sum(ok for ok, _, _ in results)
    after = [a for _, a, _ in results]
    print(
        f"{passed}/{len(results)} passed; kill -> exit {min(after):.1f}/{statistics.median(after):.1f}/{max(after):.1f} s "
        f"(min/median/max); whole runs {statistics.median(t for _, _, t in results):.1f} s median"
    )
    if not options.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
