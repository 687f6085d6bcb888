"""A dispatched stream's global micro-batch, cut into one part per rank: each full batch its rank's, an uneven
group (the epoch's end, a worker's short batch) split as evenly as possible and padded, each part carrying its
step's sample count and how the group was cut (`Dealt`), so that each rank trains its real rows with the exact
step weight (streams.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import concatenate, find_batch_size, recursively_apply

from .epoch import share


class Dealt(NamedTuple):
    """A stream's batch as a rank receives it, with what it needs to weigh it: `counts` is an empty tensor (no
    element) whose shape says it. Dealt from rank 0: `(rows, 0, the step's samples, the group's samples, 1 if each
    rank got its own batch else 0)`, each rank's real rows then following from `cut`'s rule; read per rank:
    `(rows, 0, the step's samples, this rank's real rows)`. Shapes travel as metadata: Accelerate's dispatcher
    broadcasts them with the batch's structure, so every rank reads its counts without waiting for the device (a
    host sync per micro-batch would stall a GPU's queue). The real rows come first; the rest is padding. A
    NamedTuple: the dispatcher, `concatenate` and `send_to_device` keep its type."""

    batch: object
    counts: torch.Tensor

    @classmethod
    def of(cls, batch, samples: int, *counts: int) -> Dealt:
        return cls(batch, torch.empty((find_batch_size(batch), 0, samples, *counts)))

    def real_rows(self, rank: int, processes: int) -> tuple[int, int]:
        """(rank `rank`'s real rows, the step's samples)."""
        _, _, samples, *counts = self.counts.shape
        if len(counts) == 1:  # read per rank: its own count
            return counts[0], samples
        group, whole = counts
        return (group // processes if whole else share(group, processes, rank)), samples


def cut(batches: list, processes: int) -> tuple[list, int, bool]:
    """One global micro-batch (`processes` of the user's batches, fewer at the stream's end) as one part per rank,
    its samples, and whether each part is a whole batch: each batch its rank's where they are `processes` batches of
    one size; otherwise all rows cut as evenly as possible (`share`), each part padded to the longest with copies of
    its first row (of the group's first row for an empty part)."""
    sizes = [find_batch_size(batch) for batch in batches]
    if len(batches) == processes and len(set(sizes)) == 1:
        return batches, sum(sizes), True
    rows = concatenate(batches, dim=0) if len(batches) > 1 else batches[0]
    real = [share(sum(sizes), processes, rank) for rank in range(processes)]
    longest, start, parts = max(real), 0, []
    for count in real:
        index = torch.tensor(list(range(start, start + count)) + [start if count else 0] * (longest - count))
        parts.append(recursively_apply(lambda tensor, index=index: tensor[index.to(tensor.device)], rows))
        start += count
    return parts, sum(sizes), False
