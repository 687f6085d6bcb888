"""The two arms of the A/B: the seed's hand-written loop and dist_train's `train`, timed the same way.

Both arms run `steps` optimizer steps inside one epoch and are timed over windows of `window` steps;
the first window (iterator start-up, allocator warm-up, first-call dispatch) is dropped. dist_train's
windows are the `step_time_s` of its own metrics records (`log_every = window`), which cover exactly
the time between two log boundaries, so start-up, the final validation and the model save are outside
every window; the seed loop stamps `perf_counter()` at the same step boundaries.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from .workloads import WORKLOADS, build_model, get_dataloader, lm_loss


def num_train_samples(workload: str, steps: int, world_size: int = 1) -> int:
    """Enough samples that `steps` steps stay inside the first epoch (no epoch-end validation in a window)."""
    return (steps + 2) * WORKLOADS[workload].batch_size * world_size


def seed_loop(workload: str, steps: int, window: int, seed: int = 0, lr: float = 1e-3, device: str = "cpu", bf16: bool = False,
              compile: bool = False) -> list[float]:
    """The seed's loop, as a user writes it; returns the mean step time (s) of each window after the first.

    On a GPU (`device="cuda"`) it moves each batch with `.to(device)` and, with `bf16`, runs forward and
    loss under `torch.autocast`, as a user would; the clock waits for the GPU at window boundaries only.
    """
    w = WORKLOADS[workload]
    torch.manual_seed(seed)
    model = build_model(workload).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if compile:
        model = torch.compile(model)
    cfg = types.SimpleNamespace(workload=workload, num_samples=num_train_samples(workload, steps), batch_size=w.batch_size, num_workers=0)
    loader = get_dataloader(cfg, train=True)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model.train()
    stamps = [time.perf_counter()]
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        with autocast:
            outputs = model(inputs)
            loss = lm_loss(outputs, targets).mean() if w.kind == "gpt" else F.cross_entropy(outputs, targets)
        loss.backward()
        optimizer.step()
        if device == "cuda" and len(stamps) % window == 0:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) > steps:
            break
    boundaries = stamps[::window]
    return [(b - a) / window for a, b in zip(boundaries[1:-1], boundaries[2:])]


def dist_train_config(workload: str, steps: int, window: int, output_dir: str, seed: int = 0, world_size: int = 1, lr: float = 1e-3,
                      device: str = "cpu", bf16: bool = False, compile: bool = False) -> dict:
    """The config (as key -> value) that makes dist_train run the same training as `seed_loop`."""
    w = WORKLOADS[workload]
    return {
        "model": "bench.workloads:build_model",
        "model_args": {"workload": workload},
        "data": "bench.workloads:get_dataloader",
        "data_args": {"workload": workload, "num_samples": num_train_samples(workload, steps, world_size)},
        "loss": "bench.workloads:lm_loss" if w.kind == "gpt" else "cross_entropy",
        "optimizer": "adamw",
        "lr": lr,
        "batch_size": w.batch_size,
        "epochs": 1,
        "max_steps": steps,
        "log_every": window,
        "progress": False,
        "seed": seed,
        "output_dir": output_dir,
        "resume": "never",
        "checkpoint_epochs": False,
        "cpu": device == "cpu",
        "mixed_precision": "bf16" if bf16 else "no",
        "compile": compile,
    }


def window_times(metrics_path: Path) -> list[float]:
    """`step_time_s` of every training record after the first (the first includes start-up)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train_records = [r for r in records if "step_time_s" in r]
    return [r["step_time_s"] for r in train_records[1:]]


def _reset_accelerate() -> None:
    """Forget the Accelerator singletons so the next in-process `train` builds fresh ones."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def dist_train_loop(workload: str, steps: int, window: int, seed: int = 0, lr: float = 1e-3, device: str = "cpu", bf16: bool = False,
                    compile: bool = False) -> list[float]:
    """dist_train's real loop (`dist_train.loop.train`) in this process; window step times as `seed_loop`."""
    from dist_train.config import load_config
    from dist_train.loop import train

    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        cfg = load_config(None, **dist_train_config(workload, steps, window, out, seed=seed, lr=lr, device=device, bf16=bf16, compile=compile))
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                train(cfg)
            finally:
                _reset_accelerate()
        return window_times(Path(out) / "metrics.jsonl")


def median(values: list[float]) -> float:
    return statistics.median(values)


def _batches_per_s(loader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # start-up (and Accelerate's one-batch look-ahead) outside the timing
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def data_path_rates(workload: str = "tiny_mlp", batches: int = 200, seed: int = 0) -> dict:
    """Samples/s of the seed's DataLoader(TensorDataset) against the loader dist_train trains from
    (built by `build_loaders` and passed through `accelerator.prepare`), batches only, no model."""
    from accelerate import Accelerator

    from dist_train.config import load_config
    from dist_train.data import build_loaders

    w = WORKLOADS[workload]
    num_samples = (batches + 2) * w.batch_size
    user = types.SimpleNamespace(workload=workload, num_samples=num_samples, batch_size=w.batch_size, num_workers=0)
    default_rate = _batches_per_s(get_dataloader(user, train=True), batches) * w.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        cfg = load_config(None, **dist_train_config(workload, batches, batches, out, seed=seed))
        try:
            accelerator = Accelerator(cpu=True)
            train_loader, _ = build_loaders(cfg, accelerator.num_processes)
            prepared = accelerator.prepare(train_loader)
            fast_rate = _batches_per_s(prepared, batches) * w.batch_size
        finally:
            _reset_accelerate()
    return {"workload": workload, "batch_size": w.batch_size, "batches": batches, "default_samples_per_s": default_rate,
            "dist_train_samples_per_s": fast_rate, "speedup": fast_rate / default_rate}
