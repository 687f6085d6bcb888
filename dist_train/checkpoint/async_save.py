"""`async_checkpoint: true`: a consistent in-memory snapshot at the step boundary, written in the background.

At the step boundary every rank hands its RNG states to the main process (one small gather) and the
main process copies the model weights, optimizer state, scheduler state and TrainState off the live
tensors (into pinned host memory on a GPU, reused from save to save). Training then goes on while a
background thread writes exactly the files `accelerator.save_state` would (so resuming is the same
code), then the manifest, the rename and the pruning of `manager.py`, with every crash-safety
promise of a synchronous save: until the rename the checkpoint is a `.tmp-step_N` folder that resume
never reads.

Memory: one extra copy of the model and optimizer state on the host, at most: a second save waits for
the write in flight before it snapshots again. Under FSDP2 every rank snapshots and writes its own shards
instead (sharded_save.py); DeepSpeed, FSDP1 and a full FSDP state dict are refused at start (manager.py).
"""

from __future__ import annotations

import copy
import random
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from accelerate.utils import save as accelerate_save
from safetensors import SafetensorError

from ..accelerate_internals import micro_step, registered_objects

DATA_STATE = "data_state.pt"  # a stream's position (its source's state_dict), only in a mid-epoch checkpoint
PER_RANK = "dist_train.per_rank"  # data_state.pt of a stream split per rank: {PER_RANK: [rank 0's position, ...]}


class HostCopier:
    """Copies tensors into host buffers kept from one snapshot to the next (pinned on a GPU), so a
    snapshot is one memory copy, without allocating (and page-faulting in) a fresh copy each time."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, value, key: tuple = ()):
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                pinned = value.device.type == "cuda"
                buffer = self._buffers[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
            return buffer.copy_(value.detach(), non_blocking=buffer.is_pinned())
        if isinstance(value, dict):
            return {k: self(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self(v, (*key, i)) for i, v in enumerate(value))
        return copy.deepcopy(value)


def rng_state(step: int) -> dict:
    """This process's RNG states, in the layout of Accelerate's `random_states_{rank}.pkl`."""
    states = {
        "step": step,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


def take_snapshot(accelerator, model, optimizer, scheduler, copier: HostCopier) -> dict:
    """Everything a checkpoint holds, as of now (all ranks call it; only the main process keeps a copy)."""
    rngs = gather_object([rng_state(micro_step(accelerator))])
    if not accelerator.is_main_process:
        return {}
    weights = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    snapshot = {
        "model": copier(weights, ("model",)),
        "optimizer": copier(optimizer.state_dict(), ("optimizer",)),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        # Every registered object (TrainState first, then e.g. the EMA weights), as save_state writes them.
        "custom": [copier(obj.state_dict(), ("custom", i)) for i, obj in enumerate(registered_objects(accelerator))],
        "rng": rngs,
    }
    if accelerator.scaler is not None:
        snapshot["scaler"] = copy.deepcopy(accelerator.scaler.state_dict())
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies into pinned memory are complete
    return snapshot


def write_snapshot(snapshot: dict, folder: Path) -> None:
    """The files `accelerator.save_state` writes, from a snapshot (main process, any thread)."""
    accelerate_save(snapshot["model"], folder / "model.safetensors", safe_serialization=True)
    accelerate_save(snapshot["optimizer"], folder / "optimizer.bin")
    accelerate_save(snapshot["scheduler"], folder / "scheduler.bin")
    if "scaler" in snapshot:
        torch.save(snapshot["scaler"], folder / "scaler.pt")
    for rank, states in enumerate(snapshot["rng"]):
        torch.save(states, folder / f"random_states_{rank}.pkl")
    for index, custom in enumerate(snapshot["custom"]):
        accelerate_save(custom, folder / f"custom_checkpoint_{index}.pkl")
    if snapshot.get("data_state") is not None:
        torch.save(snapshot["data_state"], folder / DATA_STATE)


def is_write_failure(exc: Exception) -> bool:
    """An I/O failure of a save (full disk, no permission): OSError, safetensors' error, or torch's writer,
    which reports a failed write as a RuntimeError ("PytorchStreamWriter failed", "iostream error") from
    inside `torch.save`; never another RuntimeError (e.g. a collective timeout, `DistBackendError`), which
    must keep its traceback."""
    if isinstance(exc, (OSError, SafetensorError)):
        return True
    if any(sign in str(exc) for sign in ("PytorchStreamWriter", "file write failed", "iostream error")):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.replace("\\", "/").endswith("torch/serialization.py")


class BackgroundWriter:
    """At most one write in flight; its error is kept for the next `wait`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self, write: Callable[[], str | None]) -> None:
        """Run `write` (which returns an error message or None) in a thread; the previous one must be done."""
        assert self._thread is None, "wait() for the write in flight first"

        def run() -> None:
            self._error = write()

        self._thread = threading.Thread(target=run, name="dist_train-checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> str | None:
        """Block until the write in flight (if any) is done; its error message, or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error
