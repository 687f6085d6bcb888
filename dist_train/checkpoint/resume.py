"""What `Checkpointer.resume` loads: the checkpoint chosen, checked against this run, then loaded safely.

`Resuming` is the resume half of `Checkpointer` (manager.py), which inherits it: it uses the
checkpointer's `cfg`, `accelerator`, `state`, `root`, `enabled` and `_position`, and its `_complete`
(the checkpoints on disk) and `_agree` (every rank learns of a failure on any rank).

The main process lists the candidates from their manifests; every rank verifies its share of a candidate's
hashes (the files its ranks wrote, see manifest.py) and all agree, the first intact one wins; the main process
vets FSDP's sharded state before PyTorch unpickles it; every rank then checks the position and the config changes, and loads with
`weights_only=True` throughout (see safe_load.py and accelerate_internals.py's `safe_custom_state_loader`).
"""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path

import torch.distributed.checkpoint as dcp
import yaml
from accelerate.utils import broadcast_object_list, gather_object

from ..accelerate_internals import safe_custom_state_loader, set_micro_step
from ..errors import UserError
from .async_save import DATA_STATE, PER_RANK
from .dcp_check import check_dcp_folder
from .manifest import InvalidCheckpoint, read_manifest, verify
from .resume_policy import check_changes
from .safe_load import restore_rng, safe_torch_load

# How torch says that a saved state does not fit the object it is loaded into (load_state_dict).
_MISFIT_SIGNS = (
    "Error(s) in loading state_dict",
    "size mismatch",
    "parameter group",
    "doesn't match the size",
    "Missing key",
    "Unexpected key",
)


def _warn(message: str) -> None:
    print(f"dist_train: warning: {message}", file=sys.stderr, flush=True)


class Resuming:
    """`Checkpointer.resume` and its checks (see the module docstring for what it uses of the checkpointer)."""

    def resume(self, position=None) -> None:
        """Load the checkpoint `cfg.resume` names (auto: newest complete one; none: start fresh).

        `position` is where the training data starts each epoch (data.py's EpochSampler or StreamBatches;
        None: it cannot start mid-epoch); later saves record it too."""
        self._position = position
        if not self.enabled:
            return
        choice = self._candidates() if self.accelerator.is_main_process else None
        candidates, explicit, error = broadcast_object_list([choice])[0]
        if error:
            raise UserError(error)
        path, manifest = self._first_intact(candidates, explicit)
        if path is None:
            return
        exact_mid_epoch = position is not None and getattr(position, "exact", True)
        if hasattr(position, "state_at"):  # a stream: exact only with the state its checkpoint holds
            exact_mid_epoch = exact_mid_epoch and (Path(path) / DATA_STATE).is_file()
        self._check_position(path, manifest, exact_mid_epoch, position is not None and position.unit_samples != 1)
        changes = self._check_config(Path(path))
        self._load(Path(path), manifest)
        if self.accelerator.is_main_process:
            moved = f", written by {manifest['world_size']} processes" if manifest["world_size"] != self.accelerator.num_processes else ""
            print(
                f"dist_train: resumed from {path} at optimizer step {self.state.optimizer_step} (epoch "
                f"{self.state.epoch}, {self.state.samples_consumed} samples into it{moved})",
                flush=True,
            )
            for change in changes:
                print(f"dist_train: resume: {change} (applied from optimizer step {self.state.optimizer_step + 1} on)", flush=True)

    def _check_config(self, path: Path) -> list[str]:
        """Refuse a config change the checkpoint cannot continue; the applied changes, one line each."""
        try:
            saved = yaml.safe_load((path / "config.yaml").read_text())
        except (OSError, yaml.YAMLError) as exc:  # manifest-verified, so only a checkpoint of an old format
            raise UserError(
                f"checkpoint {path} has no readable config.yaml ({exc}); resume it with the dist_train that wrote it."
            ) from None
        return check_changes(saved, self.cfg, str(path))

    def _candidates(self) -> tuple[list[str], bool, str | None]:
        """(checkpoints to try, newest first; whether the config named one; error), decided on the main process
        from the manifests alone: their hashes are verified by every rank together (`_first_intact`)."""
        mode = self.cfg.resume
        if mode == "never":
            complete = self._complete()
            if complete:
                return (
                    [],
                    False,
                    (
                        f"resume: never, but {self.root} already holds checkpoints (newest {complete[-1][1].name}) "
                        "that would mix with this run's. Use resume: auto to continue that run, another output_dir, "
                        "or delete the folder."
                    ),
                )
            return [], False, None
        if mode != "auto":
            return [mode], True, None
        candidates = []
        for path in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            # Only `step_*` is a checkpoint: `.tmp-` is a save before its rename (even with a manifest),
            # `.old-`/`.del-` one being replaced or pruned.
            if path.is_dir() and path.name.startswith(".tmp-"):
                _warn(f"resume: auto skips incomplete checkpoint {path}: an interrupted save (never renamed to step_*)")
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                candidates.append((int(read_manifest(path)["step"]), path))
            except InvalidCheckpoint as exc:
                _warn(f"resume: auto skips incomplete checkpoint {path}: {exc}")
        return [str(path) for _, path in sorted(candidates, reverse=True)], False, None

    def _first_intact(self, candidates: list[str], explicit: bool) -> tuple[str | None, dict | None]:
        """The first candidate whose every file matches its manifest, each rank hashing its share (the files
        written by the ranks that map onto it), all agreeing; then vetted for pickled code (main process)."""
        acc = self.accelerator
        for path in candidates:
            error = None
            try:
                verify(Path(path), share=(acc.process_index, acc.num_processes))
            except InvalidCheckpoint as exc:
                error = str(exc)
            errors = [e for e in gather_object([error]) if e]
            if errors:
                if explicit:
                    raise UserError(f"resume: {path!r} is not a usable checkpoint: {errors[0]}.")
                if acc.is_main_process:
                    _warn(f"resume: auto skips corrupt checkpoint {path}: {errors[0]}")
                continue
            vetted = None
            if acc.is_main_process:
                try:
                    check_dcp_folder(Path(path))  # FSDP's sharded state: vetted before PyTorch unpickles it
                except UserError as exc:  # hashes match, yet it holds code: tampered with, never skipped quietly
                    vetted = str(exc)
            vetted = broadcast_object_list([vetted])[0]
            if vetted:
                raise UserError(vetted)
            return path, read_manifest(Path(path))
        return None, None

    def _check_position(self, path: str, manifest: dict, exact_mid_epoch: bool = True, counts_batches: bool = False) -> None:
        """Same kind of sharding, and a mid-epoch position on a global micro-batch boundary of this run."""
        was_fsdp, is_fsdp = "FSDP" in manifest["distributed_type"], "FSDP" in str(self.accelerator.distributed_type)
        if was_fsdp != is_fsdp:
            raise UserError(
                f"checkpoint {path} was written {'with' if was_fsdp else 'without'} FSDP and this run is "
                f"{'' if is_fsdp else 'not '}FSDP; resume it the same way, or `dist-train export` it and start from the weights."
            )
        consumed = int(manifest["samples_consumed"])
        if consumed and not exact_mid_epoch:
            raise UserError(
                f"checkpoint {path} stopped {consumed} samples into epoch {manifest['epoch']}, and this run's training data "
                "(an IterableDataset, or a loader with its own batch_sampler) cannot be restarted at that position: its "
                "epoch would silently start again. Resume from an epoch-end checkpoint (resume: PATH), save only at "
                "epoch ends (checkpoint_every: null) with such data, or give the stream (its DataLoader or dataset) "
                "state_dict() and load_state_dict()."
            )
        saved_world = int(manifest["world_size"])
        if consumed and getattr(self._position, "per_rank", False) and saved_world != self.accelerator.num_processes:
            raise UserError(
                f"checkpoint {path} stopped {consumed} samples into epoch {manifest['epoch']} of a stream split per rank "
                f"over {saved_world} processes: each rank's position is in its own part, and {self.accelerator.num_processes} "
                f"processes read other parts. Resume on {saved_world} processes, or from an epoch-end checkpoint (resume: PATH)."
            )
        saved_length, length = manifest.get("dataset_length"), getattr(self._position, "dataset_length", None)
        if consumed and saved_length is not None and length is not None and int(saved_length) != length:
            raise UserError(
                f"checkpoint {path} stopped {consumed} samples into epoch {manifest['epoch']} of a training set of "
                f"{saved_length} samples, and it now has {length}: the rest of that epoch's order no longer exists. "
                "Restore the data it was written with, or resume from an epoch-end checkpoint (resume: PATH)."
            )
        if consumed and counts_batches and int(manifest["batch_size"]) != self.cfg.batch_size:
            raise UserError(
                f"checkpoint {path} stopped mid-epoch with batch_size {manifest['batch_size']}; with your batch_sampler or "
                f"stream the position is counted in batches of batch_size, so resume with batch_size: {manifest['batch_size']} "
                "(or from an epoch-end checkpoint)."
            )
        global_batch = self.cfg.batch_size * self.accelerator.num_processes
        if consumed % global_batch:
            raise UserError(
                f"checkpoint {path} stopped {consumed} samples into epoch {manifest['epoch']}; this run's global "
                f"micro-batch ({self.cfg.batch_size} x {self.accelerator.num_processes} processes = {global_batch}) "
                "does not divide that, so the rest of the epoch cannot be dealt exactly once. Resume with a "
                "world size or batch_size whose global batch divides it, or from an epoch-end checkpoint (resume: PATH)."
            )
        # Another global step is fine: the run's length and lr schedule are recomputed from here (data/run_length.py).

    def _load(self, path: Path, manifest: dict) -> None:
        acc = self.accelerator
        own_rng = path / f"random_states_{acc.process_index}.pkl"
        # A rank the saving run did not have takes the RNG of the rank it replaces (index mod old size).
        rng_file = own_rng if own_rng.is_file() else path / f"random_states_{acc.process_index % manifest['world_size']}.pkl"
        rng = safe_torch_load(rng_file)  # Accelerate would swallow an unreadable RNG file silently
        if manifest["samples_consumed"] and hasattr(self._position, "restore"):
            self._restore_stream(path)
        try:
            with safe_custom_state_loader(safe_torch_load):
                acc.load_state(str(path))
            for name, (state_dict, after_load) in self._sharded.items():
                if not (path / name).is_dir():
                    raise UserError(
                        f"checkpoint {path} holds no {name}/ (the shards this run keeps there); resume from a checkpoint of this run."
                    )
                state = state_dict()
                dcp.load(state, checkpoint_id=str(path / name))  # into the live tensors, resharded to this world size
                after_load(state)
        except (UserError, pickle.UnpicklingError) as exc:
            raise (
                exc
                if isinstance(exc, UserError)
                else UserError(f"checkpoint {path}: refusing to unpickle a file with non-tensor objects ({str(exc).splitlines()[0]}).")
            ) from None
        except RuntimeError as exc:
            if not any(sign in str(exc) for sign in _MISFIT_SIGNS):
                raise  # not a state that fails to fit (e.g. a collective timeout): keep its traceback
            raise UserError(f"checkpoint {path} does not fit this run: {str(exc).splitlines()[0]}") from None
        if not own_rng.is_file():
            restore_rng(rng, acc)
        # Checkpoints sit on optimizer-step boundaries: the next micro-batch starts a step, also when
        # grad_accum_steps changed since (Accelerate's restored micro-step count would be off by it).
        set_micro_step(acc, 0)

    def _restore_stream(self, path: Path) -> None:
        """The stream's saved state into its source (the main process, which alone reads a dispatched stream; every
        rank for a per-rank stream, each its own position); all ranks agree."""
        error, per_rank = None, self._position.per_rank
        if self.accelerator.is_main_process or per_rank:
            try:
                state = safe_torch_load(path / DATA_STATE)
                try:
                    # load_state_dict(), or replaying the epoch up to the position
                    self._position.restore(_this_ranks(state, per_rank, self.accelerator.process_index))
                except UserError as exc:
                    error = f"checkpoint {path}: {exc}"
                except Exception as exc:  # the user's code: its traceback, then one line naming it, its message kept
                    traceback.print_exc()
                    first_line = (str(exc).strip().splitlines() or [""])[0]
                    replay = self._position.mode == "replay"
                    error = (
                        f"checkpoint {path}: {self._position.source_name}.{'__iter__' if replay else 'load_state_dict'}() failed "
                        f"{'replaying the epoch up to' if replay else 'on'} the saved stream position ({type(exc).__name__}: "
                        f"{first_line}); fix it, or resume from an epoch-end checkpoint (resume: PATH)."
                    )
            except UserError as exc:
                error = str(exc)
        self._agree(error, None)


def _this_ranks(state, per_rank: bool, rank: int):
    """This rank's part of a saved stream position: its entry of a per-rank stream's list, or the one position."""
    saved_per_rank = isinstance(state, dict) and PER_RANK in state
    if saved_per_rank != per_rank:
        how = {True: "split per rank (each rank read its own part)", False: "one stream dealt from rank 0"}
        raise UserError(
            f"its stream position is of {how[saved_per_rank]}, and this run's stream is {how[per_rank]}: the position "
            "means nothing there. Resume with the data it was written with, or from an epoch-end checkpoint (resume: PATH)."
        )
    return state[PER_RANK][rank] if per_rank else state
