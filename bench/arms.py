"""The two arms of the A/B: the seed's hand-written loop and dist_train's `train`, timed the same way.

Both arms run `steps` optimizer steps inside one epoch and are timed by the same clock (`StepClock`):
torch's global optimizer-step hook stamps `perf_counter()` after every `window`-th optimizer step of
either arm, after a `torch.cuda.synchronize()` on a GPU, so each window covers exactly `window` whole
iterations of that arm's loop, with every kernel of them finished. The first window (iterator
start-up, allocator warm-up, first-call dispatch, compilation) is not timed; start-up, dist_train's
final validation and model save fall outside every window.

They train the same thing: the same weights (the model built after seeding torch with `seed`), the same
samples in the same order (the seed loop's shuffle uses the permutation dist_train's sampler draws for
epoch 0), the same batch, and AdamW with the same hyperparameters (`lr`, `WEIGHT_DECAY`, torch's
default betas and eps) at a constant learning rate; `tests/test_bench.py` checks that both end with
the same weights. What differs is how: the seed's per-sample `DataLoader` and torch's default AdamW
implementation against dist_train's batched data path, fused AdamW and its loop.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .workloads import WORKLOADS, build_model, get_dataloader, lm_loss

# torch.optim.AdamW's default, stated in both arms (dist_train's own default is 0.0) so they cannot drift apart.
WEIGHT_DECAY = 0.01


def num_train_samples(workload: str, steps: int, world_size: int = 1, batch_size: int | None = None) -> int:
    """Enough samples that `steps` steps stay inside the first epoch (no epoch-end validation in a window)."""
    return (steps + 2) * (batch_size or WORKLOADS[workload].batch_size) * world_size


def epoch0_shuffle_seed(seed: int) -> int:
    """The generator seed of dist_train's epoch-0 permutation (`dist_train.data.epoch.EpochSampler.order`).

    Given to the seed loop's `DataLoader`, its `RandomSampler` draws the same `randperm`, so both arms see
    the same batches; the equivalence test in tests/test_bench.py fails if dist_train's order changes."""
    return seed * 1_000_003


class StepClock:
    """Stamps the time after every `window`-th optimizer step of any torch optimizer in this process.

    Both arms are timed by this one hook, so neither is timed by its own code; on a GPU it waits for
    the device first (`torch.cuda.synchronize()`), so a window holds its own kernels, not a neighbour's.
    """

    def __init__(self, window: int, device: str):
        self.window, self.cuda = window, device == "cuda"
        self.steps = 0
        self.stamps: list[float] = []

    def _on_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps % self.window == 0:
            if self.cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    def __enter__(self) -> StepClock:
        self._handle = register_optimizer_step_post_hook(self._on_step)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def window_times(self) -> list[float]:
        """Mean step time (s) of each window after the first (stamps come at steps w, 2w, ...)."""
        return [(b - a) / self.window for a, b in zip(self.stamps, self.stamps[1:])]


def seed_loop(
    workload: str,
    steps: int,
    window: int,
    seed: int = 0,
    lr: float = 1e-3,
    device: str = "cpu",
    bf16: bool = False,
    compile: bool = False,
    batch_size: int | None = None,
    record: dict | None = None,
    extra: dict | None = None,
) -> list[float]:
    """The seed's loop, as a user writes it; returns the mean step time (s) of each window after the first.

    On a GPU (`device="cuda"`) it moves each batch with `.to(device)` and, with `bf16`, runs forward and
    loss under `torch.autocast`, as a user would. `record`, if given, receives the per-step losses and
    the final weights (for the equivalence test; read after the loop, so no per-step host sync).
    """
    w = WORKLOADS[workload]
    batch_size = batch_size or w.batch_size
    torch.manual_seed(seed)
    model = build_model(workload).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    if compile:
        model = torch.compile(model)
    cfg = types.SimpleNamespace(
        workload=workload, num_samples=num_train_samples(workload, steps, batch_size=batch_size), batch_size=batch_size, num_workers=0
    )
    loader = get_dataloader(cfg, train=True)
    loader.sampler.generator = torch.Generator().manual_seed(epoch0_shuffle_seed(seed))
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    losses = []
    model.train()
    with StepClock(window, device) as clock:
        for step, (inputs, targets) in enumerate(loader, start=1):
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            with autocast:
                outputs = model(inputs)
                loss = lm_loss(outputs, targets).mean() if w.kind == "gpt" else F.cross_entropy(outputs, targets)
            loss.backward()
            optimizer.step()
            if record is not None:
                losses.append(loss.detach())
            if step == steps:
                break
    if record is not None:
        record["losses"] = [float(x) for x in losses]
        record["state_dict"] = {k: v.detach().cpu().clone() for k, v in getattr(model, "_orig_mod", model).state_dict().items()}
    return clock.window_times()


def dist_train_config(
    workload: str,
    steps: int,
    window: int,
    output_dir: str,
    seed: int = 0,
    world_size: int = 1,
    lr: float = 1e-3,
    device: str = "cpu",
    bf16: bool = False,
    compile: bool = False,
    batch_size: int | None = None,
    extra: dict | None = None,
) -> dict:
    """The config (as key -> value) that makes dist_train run the same training as `seed_loop` (plus `extra`)."""
    w = WORKLOADS[workload]
    batch_size = batch_size or w.batch_size
    return {
        "model": "bench.workloads:build_model",
        "model_args": {"workload": workload},
        "data": "bench.workloads:get_dataloader",
        "data_args": {"workload": workload, "num_samples": num_train_samples(workload, steps, world_size, batch_size)},
        "loss": "bench.workloads:lm_loss" if w.kind == "gpt" else "cross_entropy",
        "optimizer": "adamw",
        "lr": lr,
        "weight_decay": WEIGHT_DECAY,
        "batch_size": batch_size,
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
        **(extra or {}),
    }


def _reset_accelerate() -> None:
    """Forget the Accelerator singletons so the next in-process `train` builds fresh ones."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def dist_train_loop(
    workload: str,
    steps: int,
    window: int,
    seed: int = 0,
    lr: float = 1e-3,
    device: str = "cpu",
    bf16: bool = False,
    compile: bool = False,
    batch_size: int | None = None,
    record: dict | None = None,
    extra: dict | None = None,
) -> list[float]:
    """dist_train's real loop (`dist_train.loop.train`) in this process; window step times as `seed_loop`.

    `record`, if given, receives the train loss of each metrics record (one per `window` steps) and the
    saved final weights."""
    from safetensors.torch import load_file

    from dist_train.config import load_config
    from dist_train.loop import train

    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        cfg = load_config(
            None,
            **dist_train_config(
                workload,
                steps,
                window,
                out,
                seed=seed,
                lr=lr,
                device=device,
                bf16=bf16,
                compile=compile,
                batch_size=batch_size,
                extra=extra,
            ),
        )
        with contextlib.redirect_stdout(io.StringIO()), StepClock(window, device) as clock:
            try:
                train(cfg)
            finally:
                _reset_accelerate()
        if record is not None:
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            record["losses"] = [r["train_loss"] for r in records if "step_time_s" in r]
            record["state_dict"] = load_file(Path(out) / "model.safetensors")
    return clock.window_times()


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
    return {
        "workload": workload,
        "batch_size": w.batch_size,
        "batches": batches,
        "default_samples_per_s": default_rate,
        "dist_train_samples_per_s": fast_rate,
        "speedup": fast_rate / default_rate,
    }
