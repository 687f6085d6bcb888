"""Checkpoints: written whole or not at all, verified before they are trusted, loaded without unpickling code.

- `manager.py`: `Checkpointer`, when and how a checkpoint is written, published and pruned; the final weights.
- `resume.py`: `Checkpointer.resume`, which checkpoint to load, whether this run can continue it, loading it.
- `async_save.py`: `async_checkpoint: true`, a snapshot at the step boundary written in the background.
- `sharded_save.py`: the same under FSDP2: each rank snapshots its shards and writes them in a thread of its own.
- `manifest.py`: `manifest.json`, every file's size and SHA-256; `verify` is what a resume trusts.
- `safe_load.py`, `dcp_check.py`: loading with `weights_only=True`; FSDP's sharded state vetted first.
- `resume_policy.py`: which config changes a resumed run may make.
- `run_lock.py`: one run per output_dir.
"""

from .dcp_check import check_dcp_folder
from .manager import Checkpointer
from .manifest import MANIFEST, InvalidCheckpoint, read_manifest, verify
from .run_lock import RunLock
from .safe_load import safe_torch_load

__all__ = ["MANIFEST", "Checkpointer", "InvalidCheckpoint", "RunLock", "check_dcp_folder", "read_manifest", "safe_torch_load", "verify"]
