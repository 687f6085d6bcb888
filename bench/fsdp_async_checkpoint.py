"""The training stall per checkpoint under FSDP2, `async_checkpoint` on vs off, on 2 gloo processes on CPU.

    python -m bench.fsdp_async_checkpoint [--mib 128] [--saves 3] [--steps 30] [--pairs 3] [--dir PATH]

Launches itself as `accelerate launch --config_file launch_configs/fsdp_cpu.yaml --num_processes 2` (FSDP2
through dist_train's `shard_on_cpu`; the parameters are asserted to be DTensors). A model of `--mib` MiB of
fp32 weights (square Linear layers, one FSDP unit) trains with SGD + momentum, so a checkpoint holds twice
the model, half of it on each rank. Two `Checkpointer`s share the model: synchronous (every rank writes its
shards through torch.distributed.checkpoint, hashes and fsyncs them; the main process writes the manifest
and renames) and `async_checkpoint: true` (every rank copies its shards at the step boundary, a thread per
rank writes them: sharded_save.py). Windows of `--steps` steps with `--saves` saves alternate between them,
A B B A ... (`--pairs` of each), so a drift in the shared machine's load falls on both.

The stall of a save is the time `Checkpointer.save()` keeps the training thread, the slower rank's (the
next step's collectives wait for it). The asynchronous window ends waiting for its last write (not a stall:
reported apart). The median step shows what the background writes cost the training meanwhile (they share
the cores), and the window time the whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[1]
MODES = ("sync", "async")


def _worker(args) -> None:
    """One rank: train, save, time; the main process writes every rank's figures to --json."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object
    from torch.distributed.tensor import DTensor

    from dist_train.accelerate_internals import shard_on_cpu
    from dist_train.checkpoint import Checkpointer
    from dist_train.checkpoint.async_save import HostCopier
    from dist_train.checkpoint.sharded_save import take_shards
    from dist_train.config import Config
    from dist_train.state import TrainState

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    shard_on_cpu(accelerator, "no")
    width = 1024
    layers = max(1, round(args.mib * 2**20 / (width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    assert accelerator.distributed_type == DistributedType.FSDP and isinstance(next(model.parameters()), DTensor)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    checkpointers = {
        mode: Checkpointer(
            Config(output_dir=str(Path(args.dir) / mode), resume="never", keep_last=1, async_checkpoint=mode == "async"),
            accelerator,
            state,
            model,
            optimizer,
            scheduler,
        )
        for mode in MODES
    }
    batch = torch.randn(8, width)
    every = max(1, args.steps // args.saves)
    figures = {mode: {"stall_s": [], "step_s": [], "final_wait_s": [], "window_s": []} for mode in MODES}
    for window in range(2 * args.pairs):
        mode = MODES[(window + window // 2) % 2]  # sync async async sync sync async ...
        checkpointer, mine = checkpointers[mode], figures[mode]
        accelerator.wait_for_everyone()
        window_start = time.perf_counter()
        for i in range(1, args.steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(batch).square().mean().backward()
            optimizer.step()
            mine["step_s"].append(time.perf_counter() - start)
            state.optimizer_step += 1
            if i % every == 0:
                start = time.perf_counter()
                checkpointer.save()
                mine["stall_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.wait()
        mine["final_wait_s"].append(time.perf_counter() - start)
        mine["window_s"].append(time.perf_counter() - window_start)
    for checkpointer in checkpointers.values():
        checkpointer.close()
    # The floor of the asynchronous stall: the snapshot's memory copy alone (buffers already allocated).
    copier, copy_s = HostCopier(), []
    for _ in range(6):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        take_shards(model, optimizer.optimizer, state.optimizer_step, copier)
        copy_s.append(time.perf_counter() - start)
    figures["copy_s"] = copy_s[1:]
    ranks = gather_object([figures])
    if accelerator.is_main_process:
        shard_mib = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
        report = {"layers": layers, "world_size": accelerator.num_processes, "shard_mib": shard_mib, "ranks": ranks}
        Path(args.json).write_text(json.dumps(report))
    accelerator.wait_for_everyone()


def _summary(report: dict) -> dict:
    """Per mode: each save's stall as the slower rank's, medians of steps, final waits and windows (rank 0's)."""
    out = {}
    for mode in MODES:
        per_rank = [r[mode] for r in report["ranks"]]
        out[mode] = {
            "stall_s": [max(stalls) for stalls in zip(*(r["stall_s"] for r in per_rank))],
            "step_s": median(per_rank[0]["step_s"]),
            "final_wait_s": median(per_rank[0]["final_wait_s"]),
            "window_s": median(per_rank[0]["window_s"]),
        }
    out["copy_s"] = median(max(copies) for copies in zip(*(r["copy_s"] for r in report["ranks"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temp folder)")
    parser.add_argument("--mib", type=float, default=128)
    parser.add_argument("--saves", type=int, default=3, help="saves per window")
    parser.add_argument("--steps", type=int, default=30, help="steps per window; keep the saves further apart than one write takes")
    parser.add_argument("--pairs", type=int, default=3, help="windows of each mode, alternating")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    root = Path(tempfile.mkdtemp(prefix="fsdp_async_ckpt_", dir=args.dir))
    try:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch_configs" / "fsdp_cpu.yaml")]
        command += ["--num_processes", "2", "-m", "bench.fsdp_async_checkpoint", "--worker", "--json", str(root / "report.json")]
        command += [
            "--dir",
            str(root),
            "--mib",
            str(args.mib),
            "--saves",
            str(args.saves),
            "--steps",
            str(args.steps),
            "--pairs",
            str(args.pairs),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        subprocess.run(command, cwd=REPO, env=env, check=True)
        report = json.loads((root / "report.json").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures, fmt = _summary(report), lambda xs: ", ".join(f"{x:.3f}" for x in xs)
    sync, asyn = figures["sync"], figures["async"]
    print(
        f"FSDP2, {report['world_size']} gloo processes on CPU: model {args.mib:.0f} MiB fp32 ({report['layers']} Linear {1024}x{1024}) "
        f"+ SGD momentum, {report['shard_mib']:.0f} MiB of weights per rank ({2 * report['shard_mib']:.0f} MiB per rank per checkpoint); "
        f"{args.pairs} windows each of {args.steps} steps, {args.saves} saves, alternating"
    )
    print(f"{'':34}{'synchronous':>14}{'async_checkpoint':>18}")
    ratio = median(asyn["stall_s"]) / median(sync["stall_s"])
    print(
        f"{'stall per save, median (s)':34}{median(sync['stall_s']):>14.3f}{median(asyn['stall_s']):>18.3f}   async = {ratio:.1%} of sync"
    )
    print(f"{'  of which the snapshot copy (s)':34}{'':>14}{figures['copy_s']:>18.3f}   (take_shards alone, the floor)")
    print(f"{'median step (s)':34}{sync['step_s']:>14.4f}{asyn['step_s']:>18.4f}")
    print(f"{'wait for the last write (s)':34}{sync['final_wait_s']:>14.3f}{asyn['final_wait_s']:>18.3f}")
    print(f"{'window, median (s)':34}{sync['window_s']:>14.2f}{asyn['window_s']:>18.2f}")
    print(f"every stall (s, the slower rank's): synchronous {fmt(sync['stall_s'])}; async {fmt(asyn['stall_s'])}")


if __name__ == "__main__":
    main()
