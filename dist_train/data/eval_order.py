"""An evaluation set as one fixed list of samples, so that every world size evaluates exactly it.

Accelerate shards an evaluation loader by its batches and, on the last round, pads the ranks' batches
with the set's first samples; how many rows of that round are real it derives from `len(dataset)`. That
count is wrong when the loader's sampler draws something other than the whole dataset once (a subset,
weights, replacement), and a `drop_last=True` loader would lose whole batches to make the rounds even.
So such a loader is rebuilt here over the sampler's draw, taken once (`Subset(dataset, draw)`, in the
draw's order, cut to whole batches when `drop_last`): its length is the set's, and the sharding's padding
and `remainder` count it exactly. The draw is taken when the run starts: every evaluation of the run sees
the same samples, and all ranks must draw the same (a sampler seeded from its own generator, or from the
global seed the run sets): checked.

A loader with a `batch_sampler` (batches of any size) is dealt in whole batches instead: its batches,
drawn once, go round-robin to the ranks (batch k to rank k mod N), and each rank evaluates its own
(`per_rank`, as a stream split per rank is: no padding at all, the sums added over the ranks at the end).
"""

from __future__ import annotations

import hashlib

from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset

from ..errors import UserError
from .batches import worker_settings


def fixed_order(loader: DataLoader, what: str) -> DataLoader:
    """`loader` itself when it reads its whole map-style dataset in order without dropping; else the same
    loader over its sampler's one draw (see the module docstring)."""
    if isinstance(loader.dataset, IterableDataset):
        return loader
    if loader.batch_size is None:
        return _dealt_batches(loader, what)
    if type(loader.sampler) is SequentialSampler and not loader.drop_last:
        return loader
    draw = [int(i) for i in loader.sampler]
    if loader.drop_last:
        draw = draw[: len(draw) // loader.batch_size * loader.batch_size]
    if not draw:
        raise UserError(f"data: the {what} loader yields no whole batch (drop_last=True with fewer samples than batch_size).")
    _same_on_every_rank(draw, what)
    return DataLoader(
        Subset(loader.dataset, draw),
        batch_size=loader.batch_size,
        **worker_settings(loader),
    )


def _dealt_batches(loader: DataLoader, what: str) -> DataLoader:
    from accelerate import PartialState

    state = PartialState()
    if loader.batch_sampler is None or state.num_processes == 1:
        return loader
    batches = [[int(i) for i in batch] for batch in loader.batch_sampler]
    _same_on_every_rank(batches, what)
    own = DataLoader(
        loader.dataset,
        batch_sampler=batches[state.process_index :: state.num_processes],
        **worker_settings(loader),
    )
    own.per_rank = True
    return own


def _same_on_every_rank(draw: list, what: str) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if PartialState().num_processes == 1:
        return
    digest = hashlib.blake2b(str(draw).encode(), digest_size=8).hexdigest()
    if len(set(gather_object([digest]))) > 1:
        raise UserError(
            f"data: the {what} loader's sampler draws different samples on different ranks; give it a generator "
            "seeded the same on every rank (torch.Generator().manual_seed(0)), or no sampler."
        )
