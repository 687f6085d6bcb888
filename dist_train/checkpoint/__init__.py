"""Checkpoints: written whole or not at all, verified before they are trusted, loaded without unpickling code.

- `manager.py`: `Checkpointer`, when and how a checkpoint is written, published and pruned; the final weights.
- `resume.py`: `Checkpointer.resume`, which checkpoint to load, whether this run can continue it, loading it.
- `async_save.py`: `async_checkpoint: true`, a snapshot at the step boundary written in the background.
- `manifest.py`: `manifest.json`, every file's size and SHA-256; `verify` is what a resume trusts.
- `safe_load.py`, `dcp_check.py`: loading with `weights_only=True`; FSDP's sharded state vetted first.
- `resume_policy.py`: which config changes a resumed run may make.
- `run_lock.py`: one run per output_dir.
"""

from .manager import Checkpointer

__all__ = ["Checkpointer"]
