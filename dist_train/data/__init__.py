"""The data path: from the user's `get_dataloader` to the batches each rank trains on, in an order dist_train owns.

- `loaders.py`: `build_loaders` / `prepare_loaders`, the user's loaders rebuilt around an order dist_train owns.
- `epoch.py`: an epoch's order of `(seed, epoch)`, its position, batches per rank and loss weights (the exact tail).
- `user_order.py`: the user's own sampler or `batch_sampler`, drawn per epoch from the same seed.
- `streams.py`: streams (`IterableDataset`), read on rank 0 and dealt, or read per rank when already split.
- `stream_parts.py`: a dealt stream's global micro-batch cut into one part per rank, with its step's sample count.
- `eval_order.py`: an evaluation set as one fixed list of samples (the user's sampler drawn once).
- `fastdata.py`: the in-memory fast path for tensor datasets.
- `batches.py`: what a batch is (`(inputs, targets)` or a dict), how the model is called on it.
- `run_length.py`: the run's length in optimizer steps, from where it stands (a resume may change the step size).
- `batch_size.py`: `auto_batch_size`, the largest batch that fits on every rank.
"""

from .batch_size import fit_batch_size
from .batches import batch_size_of, call_model, real_tokens, split_batch, token_ids
from .loaders import build_loaders, eval_loader, prepare_loaders, split_if_stream, train_position, weighed
from .run_length import planned_steps, replanned

__all__ = [
    "batch_size_of",
    "build_loaders",
    "call_model",
    "eval_loader",
    "fit_batch_size",
    "planned_steps",
    "prepare_loaders",
    "real_tokens",
    "replanned",
    "split_batch",
    "split_if_stream",
    "token_ids",
    "train_position",
    "weighed",
]
