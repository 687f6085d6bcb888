"""Checkpoints that never lose a step: written whole or not at all, verified before they are trusted.

Layout: `output_dir/checkpoints/step_{N:08d}/` holds what `accelerator.save_state` writes (model weights
as safetensors, optimizer, scheduler, one RNG file per rank, the registered TrainState; under FSDP the model
and optimizer as one shard file per rank), the run's `config.yaml`, and `manifest.json` (see manifest.py).
A save goes to `.tmp-step_N`; each rank hashes and fsyncs the files it wrote, the main process gathers the
digests into the manifest after every file is on disk, and only then is the folder renamed to `step_N`; older checkpoints are pruned after
that. A crash at any moment leaves the previous checkpoints as they were.

A mid-epoch checkpoint of a stream with a state (data.py's `StreamBatches`) also holds `data_state.pt`,
the stream's state after exactly the batches trained on, written before the manifest like every file.

Loading never unpickles code: hashes are checked first (main process), weights come from safetensors,
everything else through `torch.load(weights_only=True)` — including the registered TrainState, which
Accelerate itself would load with `weights_only=False`.

This module is the saving half of `Checkpointer` (when, writing, publishing, pruning); `resume` and
its checks are resume.py's `Resuming`, and FSDP2's per-rank background writes sharded_save.py's
`ShardWriting`, both of which `Checkpointer` inherits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import gather_object
from safetensors import SafetensorError

from .._version import __version__
from ..accelerate_internals import PLAIN_BACKENDS
from ..config import Config
from ..errors import UserError
from ..state import TrainState
from .async_save import DATA_STATE, PER_RANK, BackgroundWriter, HostCopier, is_write_failure, take_snapshot, write_snapshot
from .manifest import InvalidCheckpoint, fsync_path, hash_files, owned_files, read_manifest, write_manifest
from .resume import Resuming, _warn
from .safe_load import load_unwrapped_weights
from .sharded_save import ShardWriting

PAUSE_ENV = "DIST_TRAIN_TEST_PAUSE_IN_SAVE"  # "STEP:MARKER": tests kill the process inside this save


class Checkpointer(Resuming, ShardWriting):
    """Owns when and how checkpoints are written, and what `resume` loads. All ranks call every method."""

    def __init__(self, cfg: Config, accelerator, state: TrainState, model=None, optimizer=None, scheduler=None):
        self.cfg, self.accelerator, self.state = cfg, accelerator, state
        self._live = (model, optimizer, scheduler)  # what an asynchronous save snapshots
        self._writer = BackgroundWriter() if cfg.async_checkpoint else None
        self._copier = HostCopier()
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        sharded = getattr(accelerator, "is_fsdp2", False) and getattr(plugin.state_dict_type, "name", "") == "SHARDED_STATE_DICT"
        if cfg.async_checkpoint and not (accelerator.distributed_type in PLAIN_BACKENDS or sharded):
            raise UserError(
                f"async_checkpoint: true is for one process, DDP and FSDP2 with fsdp_state_dict_type: SHARDED_STATE_DICT; "
                f"under {accelerator.distributed_type} (FSDP1, a full state dict, or an engine's own state) set async_checkpoint: false."
            )
        # FSDP2: every rank writes its shards in a thread of its own, whose collectives need a group of their own.
        self._group = torch.distributed.new_group(backend="gloo") if cfg.async_checkpoint and sharded else None
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.enabled = cfg.checkpoints  # false (e.g. fast_dev_run): no trace left, nothing resumed
        self._last_saved: tuple | None = None
        self.before_save: list = []  # callables run on every rank before a save puts `state` into it
        self._sharded: dict[str, tuple] = {}  # folder -> (state_dict, after_load): states kept in shards (add_sharded)
        self._position = None  # the training data's position (data.py's EpochSampler or StreamBatches), from resume
        accelerator.register_save_state_pre_hook(self._save_unwrapped_weights)
        accelerator.register_load_state_pre_hook(lambda models, input_dir: load_unwrapped_weights(accelerator, models, input_dir))

    def add_sharded(self, folder: str, state_dict, after_load) -> None:
        """A state every rank holds a shard of (DTensors, e.g. the EMA weights under FSDP2), saved beside the model's
        shards in `folder` through torch.distributed.checkpoint (no gather; resharded on another world size).
        `state_dict()` gives the live tensors, which a resume loads in place; then `after_load(state)`."""
        self._sharded[folder] = (state_dict, after_load)

    # ---- when ----------------------------------------------------------------------------------
    def save_if_due(self, *, epoch_ended: bool, last_step: bool, record: dict | None = None) -> None:
        """Called once per optimizer step, after the position moved on (an epoch's last step is saved as
        the start of the next epoch). Due every `checkpoint_every` steps, at epoch ends with
        `checkpoint_epochs`, and always at the run's last step, so a finished run can be continued."""
        if not self.enabled:
            return
        every = self.cfg.checkpoint_every
        if last_step or (every and self.state.optimizer_step % every == 0) or (epoch_ended and self.cfg.checkpoint_epochs):
            self.save(record)

    # ---- saving --------------------------------------------------------------------------------
    def save(self, record: dict | None = None, wait: bool = False) -> Path:
        """Checkpoint the current step; returns its final directory. With `async_checkpoint` the files are
        written in the background (`wait=True`: and waited for, e.g. before leaving for a requeue)."""
        acc, step = self.accelerator, self.state.optimizer_step
        final, tmp = self.root / f"step_{step:08d}", self.root / f".tmp-step_{step:08d}"
        if self._last_saved == (step, self.state.state_dict()):
            if wait:
                self.wait()
            return final  # already saved, and nothing changed since (e.g. a stop right after a step save)
        for hook in self.before_save:
            hook()
        if self._writer is not None:
            self._save_in_background(record, final, tmp)
            if wait:
                self.wait()
            return final
        self._fresh_tmp(tmp)
        data_state, error = self._data_state(), None  # on every rank: a per-rank stream's positions are gathered
        try:
            acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG file
            for name, (state_dict, _) in self._sharded.items():  # every rank its own shards (e.g. the EMA under FSDP2)
                dcp.save(state_dict(), checkpoint_id=str(tmp / name))
            if acc.is_main_process:
                (tmp / "config.yaml").write_text(self.cfg.to_yaml())
                if data_state is not None:
                    torch.save(data_state, tmp / DATA_STATE)
        except (OSError, RuntimeError, SafetensorError) as exc:
            if not is_write_failure(exc):
                raise  # e.g. a collective timeout during the save: a bug or a hang, with its traceback
            error = self._write_error(exc)
        self._agree(error, tmp)
        self._pause_for_tests(step)
        digests = self._hash_own_files(tmp)  # every rank its own files: O(checkpoint / ranks) each
        if acc.is_main_process:
            try:
                write_manifest(tmp, self._describe(record), digests)
                self._publish(tmp, final)
            except OSError as exc:
                error = self._write_error(exc)
            else:
                self._prune(keep=final)
        self._agree(error, tmp)
        self._last_saved = (step, self.state.state_dict())
        return final

    # ---- asynchronous saves ------------------------------------------------------------------------
    def _save_in_background(self, record: dict | None, final: Path, tmp: Path) -> None:
        self.wait()  # at most one save in flight: the previous one is complete (or failed, for all ranks) first
        if self._group is not None:
            return self._save_shards_in_background(record, final, tmp)
        snapshot = take_snapshot(self.accelerator, *self._live, self._copier)
        description = self._describe(record)
        snapshot["data_state"] = self._data_state()
        self._last_saved = (self.state.optimizer_step, self.state.state_dict())
        if self.accelerator.is_main_process:
            self._writer.start(lambda: self._write_in_background(snapshot, description, final, tmp))

    def _fresh_tmp(self, tmp: Path) -> None:
        """All ranks: the main process makes an empty `tmp` (a previous attempt's removed); a failure stops every rank."""
        error = None
        if self.accelerator.is_main_process:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as exc:
                error = self._write_error(exc)
        self._agree(error, tmp)

    def _write_in_background(self, snapshot: dict, description: dict, final: Path, tmp: Path) -> str | None:
        """The main process's writer thread: files, manifest, rename, prune. Returns an error message or None."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self._pause_for_tests(description["step"], "files")
            write_snapshot(snapshot, tmp)
            (tmp / "config.yaml").write_text(self.cfg.to_yaml())
            self._pause_for_tests(description["step"])
            write_manifest(tmp, description)
            self._pause_for_tests(description["step"], "rename")
            self._publish(tmp, final)
        except (OSError, RuntimeError, SafetensorError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_write_failure(exc):
                raise
            return self._write_error(exc)
        self._prune(keep=final)
        return None

    def wait(self) -> None:
        """All ranks: block until the background write (if any) is complete; a failed one stops every rank."""
        if self._writer is not None:
            writes = self.accelerator.is_main_process or self._group is not None  # FSDP2: every rank writes
            self._agree(self._writer.wait() if writes else None, None)

    def close(self) -> None:
        """On any exit: let a background write finish (a complete checkpoint is worth the wait); no collective."""
        if self._writer is not None:
            error = self._writer.wait()
            if error:
                _warn(error)

    def save_final(self, model, subfolder: str = "") -> Path:
        """`output_dir/model.safetensors` (or `output_dir/SUBFOLDER/`): the final weights, keyed as in the user's model, replaced atomically.

        Written to a temporary folder and moved into place, so a full disk or a kill mid-write never
        leaves a truncated file where a previous run's final weights were.
        """
        acc, out = self.accelerator, Path(self.cfg.output_dir) / subfolder
        tmp, error = Path(self.cfg.output_dir) / ".tmp-final", None
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            # compile: true wraps the prepared model once more; its keys would gain an `_orig_mod.` prefix.
            acc.save_model(getattr(model, "_orig_mod", model), tmp, safe_serialization=True)
            if acc.is_main_process:
                out.mkdir(exist_ok=True)
                for written in sorted(tmp.iterdir()):
                    os.replace(written, out / written.name)
                fsync_path(out)
        except (OSError, SafetensorError) as exc:
            error = self._write_error(exc, what="the final weights", where=out)
        self._agree(error, tmp)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        return out / "model.safetensors"

    def _data_state(self):
        """The stream's position after exactly the batches trained on, for the main process to write (mid-epoch;
        None otherwise and on the other ranks). Called on every rank: a per-rank stream's positions, one per
        rank, are gathered (`{"dist_train.per_rank": [...]}`)."""
        position, consumed = self._position, self.state.samples_consumed
        if not consumed or not getattr(position, "exact", False) or not hasattr(position, "state_at"):
            return None
        per_rank = position.per_rank
        if not (per_rank or self.accelerator.is_main_process):
            return None
        state = position.state_at(consumed)
        states = gather_object([state]) if per_rank else [state]  # every rank gathers before any raises
        if any(state is None for state in states):  # the loader reads ahead; `keep` in data/streams.py bounds by how much
            raise RuntimeError(f"the stream's state after {consumed} samples was not kept; report this as a dist_train bug")
        if not self.accelerator.is_main_process:
            return None
        return {PER_RANK: states} if per_rank else state

    def _describe(self, record: dict | None) -> dict:
        import accelerate

        validated_here = bool(record) and record.get("step") == self.state.optimizer_step
        value = record.get(self.cfg.monitor) if validated_here else None
        return {
            "format": 1,
            "step": self.state.optimizer_step,
            "epoch": self.state.epoch,
            "samples_consumed": self.state.samples_consumed,
            "dataset_length": getattr(self._position, "dataset_length", None),  # map-style only; checked on a mid-epoch resume
            "world_size": self.accelerator.num_processes,
            "batch_size": self.cfg.batch_size,
            "grad_accum_steps": self.cfg.grad_accum_steps,
            "mixed_precision": self.cfg.mixed_precision,
            "distributed_type": str(self.accelerator.distributed_type),
            "monitor": {"name": self.cfg.monitor, "mode": self.cfg.monitor_mode, "value": value},
            "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__, "dist_train": __version__},
            "saved_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _publish(self, tmp: Path, final: Path) -> None:
        """Atomically give the complete checkpoint its name (replacing one of the same step)."""
        old = final.with_name(".old-" + final.name)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """`_remove_older`; a failure only warns: `keep` is complete, a failed clean-up costs only disk space."""
        try:
            self._remove_older(keep)
        except OSError as exc:
            _warn(f"checkpoint {keep.name} is saved, but pruning older ones failed ({exc}); remove them by hand.")

    def _remove_older(self, keep: Path) -> None:
        """Remove leftovers of interrupted saves, then all but the newest `keep_last` (and the best).

        Runs only once `keep`, the newest checkpoint, is complete, so every leftover is older than it.
        A checkpoint is renamed out of `step_*` before it is deleted: a kill mid-delete never leaves a
        half-deleted folder that still looks like a checkpoint."""
        for pattern in (".tmp-step_*", ".old-step_*", ".del-step_*"):
            for leftover in self.root.glob(pattern):
                if leftover != keep:
                    shutil.rmtree(leftover, ignore_errors=True)
        if self.cfg.keep_last is None:
            return
        complete = self._complete()
        kept = {path for _, path, _ in complete[-self.cfg.keep_last :]} | {keep}
        if self.cfg.keep_best and (best := self._best(complete)) is not None:
            kept.add(best)
        for _, path, _ in complete:
            if path not in kept:
                doomed = path.with_name(".del-" + path.name)
                os.rename(path, doomed)
                shutil.rmtree(doomed)

    def _best(self, complete: list) -> Path | None:
        sign = 1.0 if self.cfg.monitor_mode == "min" else -1.0
        scored = [
            (sign * m["monitor"]["value"], step, path)
            for step, path, m in complete
            if (m.get("monitor") or {}).get("name") == self.cfg.monitor and m["monitor"].get("value") is not None
        ]
        return min(scored)[2] if scored else None  # ties: the earliest, as early stopping counts them

    def _complete(self) -> list[tuple[int, Path, dict]]:
        """(step, path, manifest) of every checkpoint with a manifest, oldest first (hashes not checked)."""
        found = []
        for path in self.root.glob("step_*") if self.root.is_dir() else []:
            try:
                manifest = read_manifest(path)
            except InvalidCheckpoint:
                continue
            found.append((int(manifest["step"]), path, manifest))
        return sorted(found, key=lambda item: (item[0], item[1].name))

    def _write_error(self, exc: Exception, what: str = "a checkpoint", where: Path | None = None) -> str:
        where = where or self.root
        reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(where).free / 2**20:.0f} MiB free there"
        return (
            f"cannot write {what} to {where} ({reason}); existing checkpoints are "
            "untouched. Free disk space or make output_dir writable, then rerun with resume: auto."
        )

    def _hash_own_files(self, tmp: Path) -> dict:
        """Every rank hashes and fsyncs the files it wrote (manifest.py's `owner_of`); all digests, gathered."""
        digests, error, rank = {}, None, self.accelerator.process_index
        try:  # `rank` in each entry: which rank hashed it (a record for people and tests; verify ignores it)
            digests = {name: {**entry, "rank": rank} for name, entry in hash_files(tmp, owned_files(tmp, rank)).items()}
        except OSError as exc:
            error = self._write_error(exc)
        gathered = gather_object([(digests, error)])
        self._agree(error, tmp)
        return {name: entry for part, _ in gathered for name, entry in part.items()}

    def _agree(self, error: str | None, tmp: Path) -> None:
        """All ranks learn whether any rank failed (a collective), so no rank waits forever on another."""
        errors = [e for e in gather_object([error]) if e]
        if errors:
            if self.accelerator.is_main_process and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(errors[0])

    def _pause_for_tests(self, step: int, phase: str = "manifest") -> None:
        """`STEP:MARKER` pauses before the manifest; `STEP:files:MARKER` / `STEP:rename:MARKER` before the
        files / the rename (the asynchronous writer): the test then kills the process there."""
        spec = os.environ.get(PAUSE_ENV)
        if not spec or not self.accelerator.is_main_process:
            return
        at, _, rest = spec.partition(":")
        wanted, marker = rest.split(":", 1) if rest.split(":", 1)[0] in ("files", "rename") else ("manifest", rest)
        if int(at) == step and wanted == phase:
            Path(marker).write_text(str(step))
            time.sleep(600)

    # ---- Accelerate hooks: weights keyed as in the user's model, whatever wraps it -------------
    def _save_unwrapped_weights(self, models, weights, output_dir) -> None:
        # Accelerate saves the DDP-wrapped state dict ("module." keys), which a 1-process run cannot load.
        for i in range(len(weights)):
            # keep_torch_compile=False: under `compile: true` the keys would gain an `_orig_mod.` prefix.
            weights[i] = self.accelerator.unwrap_model(models[i], keep_torch_compile=False).state_dict()
