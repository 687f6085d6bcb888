"""`async_checkpoint: true` under FSDP2: each rank's shards snapshotted at the step boundary, written in the background.

At the step boundary every rank copies its own shards of the model and optimizer state (DTensors: the
local shard copied into a host buffer kept from save to save, the sharding kept) and its RNG state; the
main process also the scheduler, the TrainState and the stream position (async_save.py's snapshot).
Training then goes on while one thread per rank writes, with a gloo process group of its own (so that its
collectives never interleave with training's): its shards through `torch.distributed.checkpoint`, in the
layout Accelerate's FSDP `save_state` writes (`pytorch_model_fsdp_0/`, `optimizer_0/`, so resuming is the
same code), and its RNG file; the main process the other files. Each rank then hashes and fsyncs what it
wrote, the digests are gathered to the main process, which writes the manifest and renames: every
promise of a synchronous save (manager.py) holds, and nothing is visible before its manifest.

Memory: one extra host copy of this rank's shards, at most (a second save waits for the write in flight).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from .async_save import HostCopier, rng_state

MODEL_DIR, OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"  # Accelerate's names (fsdp_utils.save_fsdp_*)


def copy_shards(value, copier: HostCopier, key: tuple):
    """`value` with every tensor copied off the live state (a DTensor keeps its sharding, its local shard copied)."""
    if isinstance(value, DTensor):
        local = copier(value.to_local(), key)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride())
    if isinstance(value, dict):
        return {k: copy_shards(v, copier, (*key, k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_shards(v, copier, (*key, i)) for i, v in enumerate(value))
    return copier(value, key)


def take_shards(model, optimizer, step: int, copier: HostCopier) -> dict:
    """This rank's shards of the model and optimizer state and its RNG states, as of now (every rank)."""
    options = StateDictOptions(full_state_dict=False, cpu_offload=True)  # what Accelerate's sharded save asks for
    shards = {
        "model": copy_shards(get_model_state_dict(model, options=options), copier, ("model",)),
        "optimizer": copy_shards(get_optimizer_state_dict(model, optimizer, options=options), copier, ("optimizer",)),
        "rng": rng_state(step),
    }
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies into pinned memory are complete
    return shards


def write_shards(shards: dict, folder, rank: int, group) -> None:
    """This rank's part of the checkpoint (every rank, in its writer thread; DCP's collectives on `group`)."""
    for name, directory in (("model", MODEL_DIR), ("optimizer", OPTIMIZER_DIR)):
        dcp.save(
            {name: shards[name]},
            storage_writer=dcp.FileSystemWriter(str(folder / directory)),
            planner=DefaultSavePlanner(),
            process_group=group,
        )
    for name, state in shards.get("extra", {}).items():  # Checkpointer.add_sharded's states, e.g. the EMA
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder / name)), planner=DefaultSavePlanner(), process_group=group)
    torch.save(shards["rng"], folder / f"random_states_{rank}.pkl")


def gather_to_main(value, group, is_main: bool, world_size: int) -> list | None:
    """`value` of every rank, on the main process (None elsewhere), over the writers' `group`."""
    gathered = [None] * world_size if is_main else None
    dist.gather_object(value, gathered, dst=0, group=group)
    return gathered
