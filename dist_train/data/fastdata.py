"""The in-memory fast path: whole batches cut from a dataset's tensors with one index per tensor.

`DataLoader(TensorDataset)` builds every batch from `batch_size` calls to `__getitem__` and a collate
that stacks them again: on a small model that is most of the step. When the training dataset is a
`TensorDataset` and the user kept the default collate and no workers, `build_loaders` uses this path
instead. Another dataset opts in by exposing the same `tensors` tuple and declaring
`batched_indexing_is_exact = True` (its `dataset[i]` is `tuple(t[i] for t in dataset.tensors)`); one
that overrides `__getitem__` without saying so keeps the per-sample path, which may transform samples.
It keeps the sampling semantics exactly:

- `loaders.ExactBatches` cuts the very order `EpochSampler` yields (dist_train's permutation or the user's
  sampler drawn for the epoch, from its offset) into index tensors, the batches it gives the regular
  path as lists; a user's batch_sampler keeps its own batches (`loaders.UserBatches`), which
  `__getitems__` takes as they are;
- Accelerate's `prepare` wraps it like any batch sampler (`BatchSamplerShard` deals whole batches
  round-robin to the ranks), and `set_position` on the inner `EpochSampler` still resumes mid-epoch;
- `TensorBatches.__getitems__` (the hook `DataLoader` calls with a whole batch of indices) returns
  `[t[indices] for t in tensors]`, the same list `default_collate` makes from the samples.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate


def dataset_tensors(dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors a dataset is made of (`TensorDataset.tensors` or the same attribute elsewhere), if any."""
    tensors = getattr(dataset, "tensors", None)
    if not isinstance(tensors, (tuple, list)) or not tensors:
        return None
    if not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors):
        return None
    if any(t.shape[0] != len(dataset) for t in tensors):
        return None
    # A subclass that overrides __getitem__ may transform samples; indexing the tensors would skip that.
    getitem = type(dataset).__getitem__
    if getitem is not torch.utils.data.TensorDataset.__getitem__ and not getattr(dataset, "batched_indexing_is_exact", False):
        return None
    return tuple(tensors)


def can_use_fast_path(loader) -> bool:
    return loader.collate_fn is default_collate and loader.num_workers == 0 and dataset_tensors(loader.dataset) is not None


class TensorBatches(Dataset):
    """A batch-indexable view of tensors: `__getitems__(indices)` is one `index_select` per tensor.

    With `pin_memory` (training on a GPU) each batch is gathered straight into pinned host memory, so
    Accelerate's non-blocking copy to the device needs no second, pinning copy. Torch's pinned-memory
    cache does not hand a block out again before the copy that reads it has finished.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], pin_memory: bool = False):
        self.tensors = tensors
        self.pin_memory = pin_memory and torch.cuda.is_available() and all(t.device.type == "cpu" for t in tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int):
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices) -> list[torch.Tensor]:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices, dtype=torch.long)
        if not self.pin_memory:  # (tensors a user already put on a GPU are indexed there)
            return [t.index_select(0, indices if t.device == indices.device else indices.to(t.device)) for t in self.tensors]
        batch = [torch.empty((len(indices), *t.shape[1:]), dtype=t.dtype, pin_memory=True) for t in self.tensors]
        for t, out in zip(self.tensors, batch):
            torch.index_select(t, 0, indices, out=out)
        return batch


def already_batched(batch):
    """The collate of the fast path: `__getitems__` has built the batch already."""
    return batch
