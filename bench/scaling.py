"""Scaling: dist_train on the compute-bound MLP, 2 processes x 1 thread against 1 process x 1 thread.

Both runs go through the real CLI (`accelerate launch --config_file launch_configs/cpu.yaml` for 2
processes, gloo), each at 256 samples per process per step, so the 2-process run moves twice the
samples per step; the figure is global samples/s. To show where the time goes, 2 launched processes
also time the step's parts on their own (`bench/allreduce.py`): compute alone, compute on both
processes at once (with and without the loop's per-step preemption check, an asynchronous all-reduce of
one integer), a bare gloo all-reduce of the gradient.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .arms import dist_train_config
from .workloads import WORKLOADS, build_model

REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIG = REPO / "launch_configs" / "cpu.yaml"


def _launch(module_args: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if nproc == 1:
        command = [sys.executable, "-m", *module_args]
    else:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(LAUNCH_CONFIG),
            "--num_processes",
            str(nproc),
            "--main_process_port",
            str(port),
            "-m",
            *module_args,
        ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def _window_step_ms(nproc: int, steps: int, window: int, workload: str) -> list[float]:
    """dist_train's step time (ms) in each log window after the first, from one CLI run on `nproc` processes."""
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as out:
        cfg = dist_train_config(workload, steps, window, out, world_size=nproc)
        cfg["cpu"] = True
        (Path(out) / "run.yaml").write_text(yaml.safe_dump(cfg))
        _launch(["dist_train", "train", "--config", str(Path(out) / "run.yaml")], nproc)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] * 1e3 for r in records if "step_time_s" in r][1:]


def gradient_numel(workload: str) -> int:
    return sum(p.numel() for p in build_model(workload).parameters())


def run(steps: int = 30, window: int = 5, workload: str = "mlp", allreduce: bool = True, pairs: int = 1, blocks: int = 8) -> dict:
    """`blocks`: the alternating blocks of bench.allreduce's preemption-check timing (fewer for a smoke run)."""
    windows = {1: [], 2: []}
    for pair in range(pairs):  # alternating 1 / 2 processes, as the A/B of the workloads
        for nproc in (1, 2) if pair % 2 == 0 else (2, 1):
            windows[nproc] += _window_step_ms(nproc, steps, window, workload)
    batch = WORKLOADS[workload].batch_size
    one_ms, two_ms = statistics.median(windows[1]), statistics.median(windows[2])
    one_best_ms, two_best_ms = min(windows[1]), min(windows[2])
    numel = gradient_numel(workload)
    result = {
        "workload": workload,
        "batch_size_per_process": batch,
        "threads_per_process": 1,
        "pairs": pairs,
        "one_process_samples_per_s": batch / one_ms * 1e3,
        "one_process_step_ms": one_ms,
        "two_process_samples_per_s": 2 * batch / two_ms * 1e3,
        "two_process_step_ms": two_ms,
        "speedup": 2 * one_ms / two_ms,
        # Best windows (least disturbed by other work on the machine).
        "one_process_best_step_ms": one_best_ms,
        "two_process_best_step_ms": two_best_ms,
        "speedup_best_windows": 2 * one_best_ms / two_best_ms,
        "gradient_mb": numel * 4 / 2**20,
    }
    if allreduce:
        parts = json.loads(_launch(["bench.allreduce", workload, str(blocks)], 2).stdout.strip().splitlines()[-1])
        for key in (
            "solo_step_ms",
            "preemption_check_one_process_us",
            "concurrent_step_ms",
            "concurrent_step_with_check_ms",
            "preemption_call_ms",
            "preemption_check_ms",
            "allreduce_ms",
        ):
            result[key] = parts[key]
        # What the parts do not explain: DDP's bucket copies and averaging, the loop's other per-step work
        # on two processes, and the all-reduce competing with compute for the 2 cores.
        result["unexplained_ms"] = two_ms - parts["concurrent_step_with_check_ms"] - parts["allreduce_ms"]
    return result
