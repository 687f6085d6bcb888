"""The training stall per checkpoint, `async_checkpoint` on vs off, and the hang watchdog's cost per step.

    python -m bench.async_checkpoint [--mib 256] [--saves 3] [--steps 60] [--dir /path/on/the/disk]

A model of `--mib` MiB of fp32 weights (square Linear layers) trains with SGD + momentum (one state
tensor per weight, so a checkpoint holds twice the model). Every `--steps // --saves` steps the loop
calls `Checkpointer.save()` exactly as `loop.train` does at a step boundary; the stall is the time that
call keeps the training thread. Synchronous: write, hash, fsync, rename. Asynchronous: the snapshot
(one host copy), then training goes on; the end waits for the last write. The steps between saves
show what the background write costs the training meanwhile (the 2-core box shares its cores).

The watchdog part times steps of the same loop with the `HangWatchdog` progress marks on (a thread
checking once a second) and off, in alternating windows.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from dist_train.checkpoint import Checkpointer
from dist_train.config import Config
from dist_train.faults.watchdog import HangWatchdog
from dist_train.state import TrainState


def build(mib: float, output_dir: Path, async_checkpoint: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    width = 1024
    layers = max(1, round(mib * 2**20 / (width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    cfg = Config(output_dir=str(output_dir), resume="never", keep_last=1, async_checkpoint=async_checkpoint)
    return Checkpointer(cfg, accelerator, state, model, optimizer, scheduler), state, model, optimizer


def step(model, optimizer, batch: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(batch).square().mean().backward()
    optimizer.step()


def run(mib: float, root: Path, async_checkpoint: bool, steps: int, saves: int) -> dict:
    checkpointer, state, model, optimizer = build(mib, root / ("async" if async_checkpoint else "sync"), async_checkpoint)
    batch = torch.randn(8, 1024)
    every = max(1, steps // saves)
    stalls, step_s = [], []
    start_all = time.perf_counter()
    for i in range(1, steps + 1):
        start = time.perf_counter()
        step(model, optimizer, batch)
        step_s.append(time.perf_counter() - start)
        state.optimizer_step = i
        if i % every == 0:
            start = time.perf_counter()
            checkpointer.save()
            stalls.append(time.perf_counter() - start)
    start = time.perf_counter()
    checkpointer.wait()
    final_wait = time.perf_counter() - start
    total = time.perf_counter() - start_all
    checkpointer.close()
    return {"stall_s": stalls, "step_s": median(step_s), "final_wait_s": final_wait, "total_s": total}


def watchdog_overhead(windows: int = 6, steps: int = 200) -> tuple[float, float]:
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = torch.randn(32, 256)
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        for window in range(windows):
            on = window % 2 == 0
            with HangWatchdog(600 if on else None, folder, 0, 1) as watchdog:
                start = time.perf_counter()
                for _ in range(steps):
                    watchdog.at("forward")
                    optimizer.zero_grad(set_to_none=True)
                    loss = model(batch).square().mean()
                    watchdog.at("backward")
                    loss.backward()
                    watchdog.at("optimizer")
                    optimizer.step()
                    watchdog.at("step boundary", step=1)
                    watchdog.at("data")
                times[on].append((time.perf_counter() - start) / steps)
    return median(times[True]), median(times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temp folder)")
    parser.add_argument("--mib", type=float, default=256)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps in all; keep the saves further apart than one write takes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="async_ckpt_", dir=args.dir))
    try:
        sync = run(args.mib, root, False, args.steps, args.saves)
        asyn = run(args.mib, root, True, args.steps, args.saves)
        fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)
        print(
            f"model {args.mib:.0f} MiB fp32 + SGD momentum ({2 * args.mib:.0f} MiB per checkpoint), {args.saves} saves in {args.steps} steps"
        )
        print(f"synchronous save, stall per checkpoint (s):  {fmt(sync['stall_s'])}  median {median(sync['stall_s']):.3f}")
        print(
            f"async_checkpoint, stall per checkpoint (s):  {fmt(asyn['stall_s'])}  median {median(asyn['stall_s']):.3f}"
            f"  -> {median(asyn['stall_s']) / median(sync['stall_s']):.1%} of the synchronous save"
        )
        print(f"median step (s): synchronous {sync['step_s']:.4f}, asynchronous {asyn['step_s']:.4f} (background writes share the cores)")
        print(
            f"whole run (s): synchronous {sync['total_s']:.2f}, asynchronous {asyn['total_s']:.2f} (incl. the final wait {asyn['final_wait_s']:.2f})"
        )
        on, off = watchdog_overhead()
        print(f"hang watchdog: median step {on * 1e3:.3f} ms on vs {off * 1e3:.3f} ms off ({on / off - 1:+.1%})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
