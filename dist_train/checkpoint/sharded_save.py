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

`ShardWriting` is the part of `Checkpointer` (manager.py) that does this; it uses the checkpointer's `cfg`,
`accelerator`, `state`, `root`, `_live`, `_copier`, `_writer`, `_group` and its helpers (`_agree`,
`_describe`, `_data_state`, `_publish`, `_prune`, `_write_error`, `_pause_for_tests`).
"""

from __future__ import annotations

import copy
import shutil
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate.utils import save as accelerate_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from ..accelerate_internals import micro_step
from .async_save import DATA_STATE, HostCopier, is_write_failure, rng_state
from .manifest import hash_files, owned_files, write_manifest

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


class ShardWriting:
    """`async_checkpoint` under FSDP2, the part of `Checkpointer` that writes each rank's shards in the background."""

    def _save_shards_in_background(self, record: dict | None, final: Path, tmp: Path) -> None:
        """FSDP2 (sharded_save.py): every rank snapshots its shards now and writes them in its own thread."""
        acc = self.accelerator
        self._fresh_tmp(tmp)
        model, optimizer, scheduler = self._live
        shards = take_shards(model, getattr(optimizer, "optimizer", optimizer), micro_step(acc), self._copier)
        shards["extra"] = {name: copy_shards(state_dict(), self._copier, (name,)) for name, (state_dict, _) in self._sharded.items()}
        description, data_state, main_part = self._describe(record), self._data_state(), None
        if acc.is_main_process:
            main_part = {"scheduler": copy.deepcopy(scheduler.state_dict()), "custom": copy.deepcopy(self.state.state_dict())}
            main_part["data_state"] = data_state
            if acc.scaler is not None:
                main_part["scaler"] = copy.deepcopy(acc.scaler.state_dict())
        self._last_saved = (self.state.optimizer_step, self.state.state_dict())
        self._writer.start(lambda: self._write_shards_in_background(shards, main_part, description, final, tmp))

    def _write_shards_in_background(self, shards: dict, main_part: dict | None, description: dict, final: Path, tmp: Path) -> str | None:
        """Every rank's writer thread: its files, hashed and fsynced; then the main process's manifest, rename, prune.

        Every rank reaches the gather whatever happened before it (a rank that stayed away would leave the
        others waiting), so any failure becomes an error message, returned by every rank's `wait`."""
        acc, rank = self.accelerator, self.accelerator.process_index
        digests, error = {}, None
        try:
            self._pause_for_tests(description["step"], "files")
            write_shards(shards, tmp, rank, self._group)
            if main_part is not None:
                accelerate_save(main_part["scheduler"], tmp / "scheduler.bin")
                accelerate_save(main_part["custom"], tmp / "custom_checkpoint_0.pkl")
                if "scaler" in main_part:
                    torch.save(main_part["scaler"], tmp / "scaler.pt")
                if main_part["data_state"] is not None:
                    torch.save(main_part["data_state"], tmp / DATA_STATE)
                (tmp / "config.yaml").write_text(self.cfg.to_yaml())
            digests = {name: {**entry, "rank": rank} for name, entry in hash_files(tmp, owned_files(tmp, rank)).items()}
        except Exception as exc:
            if not is_write_failure(exc):
                traceback.print_exc()  # not a full disk: a bug, whose traceback must not be lost
            error = self._write_error(exc)
        gathered = gather_to_main((digests, error), self._group, acc.is_main_process, acc.num_processes)
        if not acc.is_main_process:
            return error
        errors = [e for _, e in gathered if e]
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
            return errors[0]
        try:
            self._pause_for_tests(description["step"])
            write_manifest(tmp, description, {name: entry for part, _ in gathered for name, entry in part.items()})
            self._pause_for_tests(description["step"], "rename")
            self._publish(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            return self._write_error(exc)
        self._prune(keep=final)
        return None
