"""A dispatched stream's global micro-batch, cut into one part per rank: each full batch its rank's, an uneven
group (the epoch's end, a worker's short batch) split as evenly as possible and padded, each part carrying its
step's sample count (`Dealt`) so that the rank trains its real rows with the exact step weight (streams.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import concatenate, find_batch_size, recursively_apply

from .epoch import share


class Dealt(NamedTuple):
    """A stream's batch as a rank receives it: `steps` has one entry per row, the step's sample count for a real
    row and 0 for padding (the rows after the real ones). A NamedTuple: Accelerate's dispatcher, `concatenate` and
    `send_to_device` keep its type."""

    batch: object
    steps: torch.Tensor


def counts(batch, real: int, samples: int) -> torch.Tensor:
    counts = torch.zeros(find_batch_size(batch), dtype=torch.long)
    counts[:real] = samples
    return counts


def cut(batches: list, processes: int) -> list[tuple[object, int]]:
    """One global micro-batch (`processes` of the user's batches, fewer at the stream's end) as one part per rank
    and its real rows: each batch its rank's where they are `processes` batches of one size; otherwise all rows
    cut as evenly as possible (`share`), each part padded to the longest with copies of its first row (of the
    group's first row for an empty part)."""
    sizes = [find_batch_size(batch) for batch in batches]
    if len(batches) == processes and len(set(sizes)) == 1:
        return [(batch, size) for batch, size in zip(batches, sizes)]
    rows = concatenate(batches, dim=0) if len(batches) > 1 else batches[0]
    real = [share(sum(sizes), processes, rank) for rank in range(processes)]
    longest, start, parts = max(real), 0, []
    for count in real:
        index = torch.tensor(list(range(start, start + count)) + [start if count else 0] * (longest - count))
        parts.append((recursively_apply(lambda tensor, index=index: tensor[index.to(tensor.device)], rows), count))
        start += count
    return parts
