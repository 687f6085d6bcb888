"""A dispatched stream's global micro-batch, cut into one part per rank: each full batch its rank's, an uneven
group (the epoch's end, a worker's short batch) split as evenly as possible and padded, each part carrying its
step's sample count and each rank's real rows (`Dealt`), so that the rank trains its real rows with the exact
step weight (streams.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import concatenate, find_batch_size, recursively_apply

from .epoch import share


class Dealt(NamedTuple):
    """A stream's batch as a rank receives it, with what it needs to weigh it: `counts` is an empty tensor (no
    element) of shape `(rows, 0, the step's samples, real rows of rank 0, of rank 1, ...)` as dealt from rank 0
    (one real-rows entry, this rank's, for a per-rank stream). Shapes travel as metadata: Accelerate's dispatcher
    broadcasts them with the batch's structure, so every rank reads its counts without waiting for the device
    (a host sync per micro-batch would stall a GPU's queue). The real rows come first; the rest is padding. A
    NamedTuple: the dispatcher, `concatenate` and `send_to_device` keep its type."""

    batch: object
    counts: torch.Tensor

    @classmethod
    def of(cls, batch, samples: int, real: list[int]) -> Dealt:
        return cls(batch, torch.empty((find_batch_size(batch), 0, samples, *real)))

    def real_rows(self, rank: int) -> tuple[int, int]:
        """(this rank's real rows, the step's samples)."""
        _, _, samples, *real = self.counts.shape
        return (real[rank] if len(real) > 1 else real[0]), samples


def cut(batches: list, processes: int) -> tuple[list, list[int]]:
    """One global micro-batch (`processes` of the user's batches, fewer at the stream's end) as one part per rank,
    and each part's real rows: each batch its rank's where they are `processes` batches of one size; otherwise all
    rows cut as evenly as possible (`share`), each part padded to the longest with copies of its first row (of the
    group's first row for an empty part)."""
    sizes = [find_batch_size(batch) for batch in batches]
    if len(batches) == processes and len(set(sizes)) == 1:
        return batches, sizes
    rows = concatenate(batches, dim=0) if len(batches) > 1 else batches[0]
    real = [share(sum(sizes), processes, rank) for rank in range(processes)]
    longest, start, parts = max(real), 0, []
    for count in real:
        index = torch.tensor(list(range(start, start + count)) + [start if count else 0] * (longest - count))
        parts.append(recursively_apply(lambda tensor, index=index: tensor[index.to(tensor.device)], rows))
        start += count
    return parts, real
