"""Every use dist_train makes of Accelerate beyond its documented surface, in one place.

Checked against Accelerate 1.15 (the bound in pyproject.toml; `check_version` and a test fail loudly
on any other version, so an upgrade is a deliberate act: rerun the suite, then widen the bound).

- `LeanOptimizer`: `AcceleratedOptimizer.step()` looks up the `lomo_optim` package on disk twice per
  call (an uncached `importlib.util.find_spec`, more than the whole forward pass of a small MLP on a
  CPU) and `zero_grad()` inspects the torch optimizer's signature every call. Where the wrapper adds
  nothing else (no fp16 loss scaler, no XLA, no DeepSpeed/Megatron engine) both forward to the torch
  optimizer, on gradient-sync steps only; everywhere else Accelerate's wrapper is called, so fp16
  overflow skips and the other back ends keep their behaviour. It reads the wrapper's `optimizer`,
  `scaler`, `gradient_state` and `accelerator_state` attributes.
- `safe_custom_state_loader`: `Accelerator.load_state` loads registered objects with
  `weights_only=False` (it would run pickled code planted in `custom_checkpoint_N.pkl`); the loader it
  calls, `accelerate.accelerator.load_custom_state`, is swapped for the duration of a load.
- `micro_step` / `set_micro_step`: `Accelerator.step`, the micro-batch counter `accumulate()` syncs on.
- `process_group_timeout`: the `InitProcessGroupKwargs` the Accelerator was made with (`init_handler`).
- `registered_objects`: `Accelerator._custom_objects`, what `register_for_checkpointing` registered
  (restarts.py reads the TrainState there for the step a failing rank was at).
- `seed_dispatched_workers`: the DataLoader `DataLoaderDispatcher` builds around a stream
  (`base_dataloader`) has no generator, so each `iter()` would draw its workers' seed from the global
  torch RNG, one draw more in a run resumed mid-epoch than in an uninterrupted one.
- `is_out_of_memory`: `accelerate.utils.memory.should_reduce_batch_size` (not exported by
  `accelerate.utils`), the test `find_executable_batch_size` retries on.
- `check_launch_backend` / `shard_on_cpu`: FSDP2 on a machine without a GPU. `AcceleratorState` only
  becomes `DistributedType.FSDP` for GPU-like device types; in CPU mode it builds the plugin from the
  launcher's `FSDP_*` variables and drops it without a word, and the model comes back as DDP. `shard_on_cpu`
  sets the state's `fsdp_plugin` and `distributed_type` (and `PartialState`'s type, which the collectives
  read) right after the Accelerator is built, before `prepare`: everything downstream (`fully_shard`,
  DTensor parameters, `save_state`/`load_state` through `torch.distributed.checkpoint`, `save_model`) is
  Accelerate's own FSDP2 path, which works on gloo. `check_launch_backend` turns the settings that cannot
  work into one line before the Accelerator exists (FSDP1's plugin raises from `__post_init__` without a
  GPU; DeepSpeed's import fails inside the constructor; a `parallelism_config` layout such as HSDP is
  validated against the device type inside the constructor, before `shard_on_cpu` can act).
- `broadcast_buffers`: what Accelerate's DDP wrapper does for buffers (`broadcast_buffers=True`) and its FSDP2
  path does not: under `fully_shard` each rank keeps its own BatchNorm statistics, and a sharded checkpoint
  stores one rank's copy (whichever DCP's planner picks), so a resumed run would differ.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import accelerate
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.memory import should_reduce_batch_size

from .errors import UserError

TESTED_ACCELERATE = ("1.15",)  # major.minor releases this module was checked against


def check_version(version: str = accelerate.__version__) -> None:
    """Raise if the installed Accelerate is not one this module was checked against."""
    if ".".join(version.split(".")[:2]) not in TESTED_ACCELERATE:
        raise RuntimeError(
            f"dist_train relies on Accelerate internals checked against Accelerate {', '.join(TESTED_ACCELERATE)}.x, "
            f"not {version}: see dist_train/accelerate_internals.py, rerun the tests, then widen TESTED_ACCELERATE "
            "and the bound in pyproject.toml."
        )


# Back ends whose AcceleratedOptimizer.step is `if sync_gradients: optimizer.step()` when there is no scaler.
PLAIN_BACKENDS = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}


class LeanOptimizer:
    def __init__(self, accelerated: AcceleratedOptimizer):
        self.accelerated = accelerated
        self._gradient_state = accelerated.gradient_state
        self._direct = accelerated.scaler is None and accelerated.accelerator_state.distributed_type in PLAIN_BACKENDS
        # The object whose `step` runs: an LR scheduler must wrap this one to see the steps.
        self.stepped: torch.optim.Optimizer = accelerated.optimizer if self._direct else accelerated

    def step(self) -> None:
        """The optimizer step on gradient-sync steps; a no-op between accumulation boundaries."""
        if not self._direct:
            self.accelerated.step()
        elif self._gradient_state.sync_gradients:
            self.stepped.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._direct:
            self.accelerated.zero_grad(set_to_none=set_to_none)
        elif self._gradient_state.sync_gradients:
            self.stepped.zero_grad(set_to_none=set_to_none)


@contextlib.contextmanager
def safe_custom_state_loader(load_file: Callable[[Path], object]):
    """Route Accelerate's loading of registered objects (TrainState) through `load_file`.

    `Accelerator.load_state` loads them with `weights_only=False`, i.e. it would run any pickled code
    planted in `custom_checkpoint_N.pkl`; there is no option to change that, so the loader it calls
    is swapped for the duration of the load. The caller passes the safe loader (`checkpoint/safe_load.py`),
    so this module, below the checkpoint wing, never imports it.
    """
    import accelerate.accelerator as accelerator_module

    def load_custom_state(obj, path, index=0):
        obj.load_state_dict(load_file(Path(path) / f"custom_checkpoint_{index}.pkl"))

    original = accelerator_module.load_custom_state
    accelerator_module.load_custom_state = load_custom_state
    try:
        yield
    finally:
        accelerator_module.load_custom_state = original


def fix_ddp_bucket_order(model) -> None:
    """Give DDP's gradient buckets their final layout before the first step, in parameter order.

    DDP rebuilds its buckets once, after the first backward, in the order the gradients became ready.
    A resumed run would then take its first step with the initial layout where the uninterrupted run
    used the rebuilt one; with 3 or more ranks an element's summation order in the all-reduce depends on
    its place in the bucket, so the weights would differ in the last bits. Pushing every parameter
    (index order) makes the first forward's rebuild use that order in every run. (torch's Reducer, as
    checked with torch 2.11 and 2.13; a DDP without a reducer, e.g. on one process, is left alone.)
    """
    reducer = getattr(model, "reducer", None)
    if reducer is not None and hasattr(reducer, "_push_all_rebuilt_params"):
        reducer._push_all_rebuilt_params()


def micro_step(accelerator) -> int:
    """Micro-batches since the last optimizer step's sync (what `accumulate()` counts)."""
    return accelerator.step


def set_micro_step(accelerator, step: int) -> None:
    accelerator.step = step


def process_group_timeout(accelerator) -> timedelta | None:
    """The timeout the run's process group was made with (`collective_timeout_s`, passed to the
    Accelerator as InitProcessGroupKwargs); None (torch's default) when the Accelerator got none."""
    handler = getattr(accelerator, "init_handler", None)
    return getattr(handler, "timeout", None)


def registered_objects(accelerator) -> list:
    """What `accelerator.register_for_checkpointing` registered, in order (empty for no Accelerator)."""
    return list(getattr(accelerator, "_custom_objects", ()))


def is_out_of_memory(exc: Exception) -> bool:
    """Whether `exc` is an out-of-memory error, as `find_executable_batch_size` decides to retry smaller."""
    return should_reduce_batch_size(exc)


def seed_dispatched_workers(loader) -> None:
    """Give the DataLoader that Accelerate's dispatcher rebuilt around a stream a generator of its own."""
    base = getattr(loader, "base_dataloader", None)
    if base is not None and base.generator is None:
        base.generator = torch.Generator()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`distributed_type: FSDP` in its config sets ACCELERATE_USE_FSDP)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_launch_backend(has_gpu: bool) -> None:
    """Before the Accelerator is built: a launch config that cannot run here is one UserError, not a traceback."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "the launch config asks for DeepSpeed (distributed_type: DEEPSPEED), and the deepspeed package is not "
            "installed: pip install deepspeed (it needs GPUs), or launch with launch_configs/fsdp.yaml to shard with FSDP2."
        )
    if has_gpu:
        return
    layout = {
        name: int(os.environ.get(f"PARALLELISM_CONFIG_{name.upper()}_SIZE", "1")) for name in ("dp_replicate", "dp_shard", "tp", "cp")
    }
    if _env_flag("ACCELERATE_USE_PARALLELISM_CONFIG") and any(size > 1 for size in layout.values()):
        sizes = ", ".join(f"{name}_size {size}" for name, size in layout.items() if size > 1)
        raise UserError(
            f"the launch config's parallelism_config ({sizes}) needs GPUs: Accelerate 1.15 validates it against the "
            "device type while the Accelerator is built, before dist_train can switch CPU processes to FSDP2. On CPU "
            "leave parallelism_config out (launch_configs/fsdp_cpu.yaml shards over all processes)."
        )
    if not fsdp_requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(
            f"the launch config asks for FSDP version {version} (fsdp_version) on a machine without a GPU: FSDP1 needs a "
            "GPU. Set fsdp_version: 2 in its fsdp_config (launch_configs/fsdp_cpu.yaml runs FSDP2 on CPU)."
        )


def shard_on_cpu(accelerator, mixed_precision: str) -> None:
    """Make a CPU-mode Accelerator launched for FSDP2 an FSDP2 one (see the module docstring); call it before
    `prepare`. Does nothing where Accelerate already chose FSDP (GPUs) or where FSDP was not asked for.

    CPU offload (`fsdp_offload_params: true`) keeps the sharded parameters on the host between uses without
    pinning them: Accelerate's policy pins by default, and pinned memory needs a GPU.
    """
    if not fsdp_requested() or accelerator.distributed_type == DistributedType.FSDP:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerate builds it
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)  # as AcceleratorState does for FSDP on GPUs
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def broadcast_buffers(accelerator, model) -> None:
    """Under FSDP on several ranks: rank 0's buffers (e.g. BatchNorm statistics) on every rank, as DDP keeps them.

    Called before a validation and before a checkpoint: what is evaluated and saved is then rank 0's state on
    every rank, as under DDP, and a checkpoint holds the buffers every rank had, so resuming is exact. Between
    those points each rank updates its own copy; in training mode BatchNorm normalises with the batch's
    statistics, so the weights never depend on that. No-op elsewhere (DDP broadcasts them itself).
    """
    if accelerator.distributed_type != DistributedType.FSDP or accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer.data, src=0)
