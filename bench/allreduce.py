"""Where a 2-process step's time goes (run by bench.scaling, under `accelerate launch`, 2 gloo processes).

    accelerate launch --config_file launch_configs/cpu.yaml -m bench.allreduce mlp

Prints one JSON line (rank 0) with, per optimizer step of the workload (1 thread per process):
- `solo_step_ms`: forward, backward and fused AdamW step on rank 0 while rank 1 waits idle (no DDP);
- `concurrent_step_ms`: the same on both ranks at once, without communication: what sharing the
  machine (caches, memory bandwidth, the other core) costs before any gradient is exchanged;
- `allreduce_ms`: a gloo all-reduce of a gradient-sized float32 buffer, both ranks otherwise idle;
- `small_allgather_ms`: a one-integer all-gather (a per-step agreement between ranks, e.g. preemption).
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

from .workloads import WORKLOADS, build_model, make_tensors


def _train_step_ms(workload: str, rank: int, steps: int = 12) -> float:
    torch.manual_seed(rank)
    model = build_model(workload)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = WORKLOADS[workload].batch_size
    inputs, targets = make_tensors(workload, batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def _timed(collective, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        collective()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    workload = sys.argv[1]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # Rank 0 alone, before the process group exists: rank 1 then blocks in the rendezvous, idle.
    solo = _train_step_ms(workload, rank) if rank == 0 else None
    dist.init_process_group("gloo")
    dist.barrier()
    concurrent = _train_step_ms(workload, rank)
    numel = sum(p.numel() for p in build_model(workload).parameters())
    buffer = torch.ones(numel)
    allreduce = _timed(lambda: dist.all_reduce(buffer), 12)
    flag, flags = torch.zeros(1, dtype=torch.long), torch.zeros(dist.get_world_size(), dtype=torch.long)
    allgather = _timed(lambda: dist.all_gather_into_tensor(flags, flag), 52)
    if rank == 0:
        print(json.dumps({"workload": workload, "numel": numel, "solo_step_ms": solo, "concurrent_step_ms": concurrent,
                          "allreduce_ms": allreduce, "small_allgather_ms": allgather}))
    dist.barrier()  # both ranks finish their collectives before either tears the group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
