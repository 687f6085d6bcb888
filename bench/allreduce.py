"""Where a 2-process step's time goes (run by bench.scaling, under `accelerate launch`, 2 gloo processes).

    accelerate launch --config_file launch_configs/cpu.yaml -m bench.allreduce mlp [BLOCKS]

Prints one JSON line (rank 0) with, per optimizer step of the workload (1 thread per process):
- `solo_step_ms`: forward, backward and fused AdamW step on rank 0 while rank 1 waits idle (no DDP);
- `preemption_check_one_process_us`: the loop's preemption check (`dist_train.faults.preemption.Preemption.
  requested`) on that one process: no collective, a flag read;
- `concurrent_step_ms`: the same step on both ranks at once, without communication: what sharing the
  machine (caches, memory bandwidth, the other core) costs before any gradient is exchanged;
- `concurrent_step_with_check_ms`: the same, with the loop's preemption check after every step, as the
  loop makes it on 2 ranks: wait for the asynchronous all-reduce (MAX) of one integer started by the
  previous check, read it, start the next one; BLOCKS (default 8) blocks of steps with and without it alternate;
- `preemption_call_ms`: host time inside that check (the wait, the read, the start of the next round);
- `preemption_check_ms`: what the check adds to a step, all of it (the median over the block pairs of
  with - without): the call, plus gloo's thread working for the all-reduce on the cores both ranks
  compute on; noisy on a loaded machine, and may come out < 0;
- `allreduce_ms`: a gloo all-reduce of a gradient-sized float32 buffer, both ranks otherwise idle.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_train.faults.preemption import Preemption

from .workloads import WORKLOADS, build_model, make_tensors


def _training_step(workload: str, rank: int):
    """One optimizer step of the workload (fused AdamW, as dist_train builds it), as a function."""
    torch.manual_seed(rank)
    model = build_model(workload)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    inputs, targets = make_tensors(workload, WORKLOADS[workload].batch_size)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    return step


def _time_steps(step, steps: int, check=None) -> tuple[list[float], list[float]]:
    """Seconds per step (the check included) and seconds inside `check`, for `steps` steps."""
    step_times, check_times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if check is not None:
            before = time.perf_counter()
            check()
            check_times.append(time.perf_counter() - before)
        step_times.append(time.perf_counter() - start)
    return step_times, check_times


def _timed(collective, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        collective()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _two_process_parts(workload: str, rank: int, step, blocks: int = 8) -> dict:
    """The parts timed on both ranks at once (inside the process group)."""
    if step is None:
        step = _training_step(workload, rank)
    dist.barrier()
    preemption = Preemption(accelerator=None)  # 2 ranks: the asynchronous all-reduce round, as in the loop
    try:
        without, with_check, calls, differences = [], [], [], []
        _time_steps(step, 2, preemption.requested)  # warm-up; the first check starts the first round
        for _ in range(blocks):  # alternating blocks, so load from elsewhere falls on both alike
            dist.barrier()
            block_without = _time_steps(step, 5)[0]
            dist.barrier()
            block_with, check_times = _time_steps(step, 5, preemption.requested)
            without += block_without
            with_check += block_with
            calls += check_times
            differences.append(statistics.median(block_with) - statistics.median(block_without))
    finally:
        preemption.close()  # waits for the round in flight: both ranks made the same number of checks
    numel = sum(p.numel() for p in build_model(workload).parameters())
    buffer = torch.ones(numel)
    return {
        "numel": numel,
        "concurrent_step_ms": _ms(without),
        "concurrent_step_with_check_ms": _ms(with_check),
        "preemption_call_ms": _ms(calls),
        "preemption_check_ms": _ms(differences),
        "allreduce_ms": _timed(lambda: dist.all_reduce(buffer), 12),
    }


def main() -> None:
    workload = sys.argv[1]
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report = {"workload": workload, "solo_step_ms": None, "preemption_check_one_process_us": None}
    step = None
    if rank == 0:  # rank 0 alone, before the process group exists: rank 1 then blocks in the rendezvous, idle
        step = _training_step(workload, rank)
        report["solo_step_ms"] = _ms(_time_steps(step, 12)[0][2:])
        preemption = Preemption(accelerator=None)  # one process (no process group): `requested` skips the collective
        try:
            report["preemption_check_one_process_us"] = _ms(_time_steps(lambda: None, 1000, preemption.requested)[1]) * 1e3
        finally:
            preemption.close()
    dist.init_process_group("gloo")
    report.update(_two_process_parts(workload, rank, step, blocks))
    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.barrier()  # both ranks finish their collectives before either tears the group down
    dist.destroy_process_group()
    # Leave without the interpreter's finalization: there, about 1 run in 10 under load from other
    # processes, rank 1 aborted in C++ ("terminate called without an active exception", SIGABRT,
    # faulthandler: no Python frame left) although both ranks had passed the barrier and destroyed the
    # group, and the run then failed. Everything this process had to do is done and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
