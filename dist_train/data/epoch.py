"""An epoch of map-style data: its order, where it starts, its batches per rank, and each batch's loss weight.

The exact tail: every sample once per epoch. The epoch is cut into optimizer steps of `world_size x
grad_accum_steps` global micro-batches, and its last step holds what is left, however little. Where a
step's batches are not all full (the epoch's short last step, or a user's `batch_sampler` whose batches
differ in size), each rank's mean loss is weighted by its share of the step's samples,

    weight = world_size x grad_accum_steps x (the rank's samples) / (the step's samples),

so that DDP's average over the ranks of Accelerate's 1/grad_accum_steps-scaled losses is the exact mean over
the step's real samples: the one big batch. A full step's weights are exactly 1. A rank with no sample left
gets a stand-in batch (real samples of the epoch) that the loop runs in eval mode with weight 0: DDP needs
every rank in the reduction; its gradient is zero and its buffers (BatchNorm statistics) untouched.
(Padding, what `DistributedSampler` and Accelerate's `even_batches` do, would train the epoch's first samples
twice, and one process would not be the user's own loop over their DataLoader.) `drop_last=True` drops the
partial step.

- `batch_size` batches (`ExactBatches`): the order in batches of `batch_size` per rank, dealt round-robin by
  Accelerate; the epoch's last global micro-batch split over the ranks as evenly as possible, at least 2
  samples on a rank that gets any (`share`). The weights have a closed form (`EpochSampler.loss_weight`).
- The user's `batch_sampler` (`UserBatches`): its batches whole, dealt round-robin, the last global
  micro-batch's missing ones stand-ins; the weights are read off the dealt sizes (`weights_of`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import UserError
from .user_order import UserOrder, epoch_seed


class EpochSampler(Sampler[int]):
    """Yields `order(seed, epoch)[start:]`: to its end, or, with `drop_last`, cut to whole optimizer steps.

    The order is dist_train's permutation of `num_samples` (or `range(num_samples)` without `shuffle`),
    or, given a `source`, the user's sampler drawn for the epoch (`UserOrder`; then `num_samples` is the
    draw's length). `step_samples` (batch x ranks x accumulation) is the unit of the cut.

    On the batch_sampler path (`batch_size` None) the order is of the user's batches (`UserBatches`), the sizes
    count batches, and `unit_samples` (the loop's `batch_size`) converts the loop's `samples_consumed`.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool,
        micro_batch_samples: int,
        step_samples: int | None = None,
        drop_last: bool = False,
        source: UserOrder | None = None,
        unit_samples: int = 1,
        batch_size: int | None = None,
    ):
        self._num_samples = num_samples
        # The per-process batch (ExactBatches), or None on the batch_sampler path, where batches are the user's
        # and `weights` (set by UserBatches for each iteration) holds each dealt batch's loss weight.
        self.batch_size = batch_size
        self.weights: list[float] = []
        self.seed = seed
        self.shuffle = shuffle
        self.source = source
        self.unit_samples = unit_samples
        self.micro_batch_samples = micro_batch_samples  # one global micro-batch: batch_size x ranks
        self.step_samples = step_samples or micro_batch_samples
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self.dataset_length: int | None = None  # the map-style dataset's length: a checkpoint records it (manifest)
        # The loader's own generator: a DataLoader without one draws its workers' base seed from the
        # global torch RNG at every `iter()`, so a resumed run (one more `iter()` mid-epoch) would drift
        # from an uninterrupted one in everything else that draws from it (dropout, augmentation).
        self.loader_generator = torch.Generator()

    def set_position(self, epoch: int, samples_consumed: int) -> None:
        """Start the next iteration at `samples_consumed` into epoch `epoch`'s order."""
        if samples_consumed % self.unit_samples:
            raise UserError(
                f"resume: the checkpoint stopped {samples_consumed} samples into epoch {epoch}, which is not a whole "
                f"number of batch_sampler batches at batch_size {self.unit_samples}; resume with the batch_size it was "
                "written with, or from an epoch-end checkpoint."
            )
        self.epoch, self.start = epoch, samples_consumed // self.unit_samples
        self.loader_generator.manual_seed((self.seed * 1_000_003 + epoch) ^ 0x5EED_5EED)  # worker seeds: per epoch

    @property
    def num_samples(self) -> int:
        """The length of this epoch's order."""
        return self._num_samples if self.source is None else len(self.source.order(self.epoch))

    @property
    def epoch_samples(self) -> int:
        """Where this iteration ends: the order's end, or with `drop_last` the last whole optimizer step. Counted
        from `start`, so that after a resume with another step size too, every step but the last is whole."""
        rest = max(self.num_samples - self.start, 0)
        if not self.drop_last:
            return self.start + rest  # every sample once; the last step may be short
        return self.start + rest // self.step_samples * self.step_samples

    def order(self) -> torch.Tensor:
        if self.source is not None:
            return self.source.order(self.epoch)
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return max(self.epoch_samples - self.start, 0)

    def steps_from(self, epoch: int, samples_consumed: int) -> int:
        """The optimizer steps `set_position(epoch, samples_consumed)` would deal (the run's length, run_length.py)."""
        saved = self.epoch, self.start
        self.epoch, self.start = epoch, samples_consumed // self.unit_samples
        try:
            return math.ceil(len(self) / self.step_samples)
        finally:
            self.epoch, self.start = saved

    def loss_weight(self, micro_batch: int, rank: int) -> float:
        """The factor on rank `rank`'s mean loss in micro-batch `micro_batch` of this iteration (counted from
        `start`): see the module docstring; 1 in a full step, 0 for a stand-in batch."""
        if self.batch_size is None:  # the user's batches: read off the sizes UserBatches dealt
            world = self.micro_batch_samples
            return self.weights[micro_batch * world + rank]
        left = len(self) - (micro_batch // self.accumulation) * self.step_samples
        if left >= self.step_samples:
            return 1.0
        world = self.micro_batch_samples // self.batch_size
        in_micro = len(self) - micro_batch * self.micro_batch_samples
        mine = self.batch_size if in_micro >= self.micro_batch_samples else share(in_micro, world, rank)  # as ExactBatches cuts
        return world * self.accumulation * mine / left

    @property
    def accumulation(self) -> int:
        return self.step_samples // self.micro_batch_samples

    def indices(self) -> torch.Tensor:
        """This iteration's sample indices, as one tensor (the fast data path cuts batches from it)."""
        return self.order()[self.start : max(self.epoch_samples, self.start)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


def share(samples: int, world_size: int, rank: int) -> int:
    """Rank `rank`'s part of `samples` split over the ranks as evenly as possible, the first ranks taking one more,
    but at least 2 on a rank that gets any (BatchNorm in training has no statistics of one sample; the user's own
    loop would not make a batch of 1 either, unless one sample is all there is): contiguous parts in rank order,
    so that N ranks train one rank's global micro-batch."""
    ranks = min(world_size, max(samples // 2, 1))
    return samples // ranks + (rank < samples % ranks) if rank < ranks else 0


def weights_of(sizes: list[int], world_size: int, accumulation: int) -> list[float]:
    """The loss weight of each dealt batch (global micro-batch k is `sizes[k * world_size : (k + 1) * world_size]`,
    a stand-in's size 0): `world_size x accumulation x size / (its step's samples)`, exactly 1 where a step's
    batches are all alike."""
    step = world_size * accumulation
    weights = []
    for first in range(0, len(sizes), step):
        in_step = sizes[first : first + step]
        total = sum(in_step)
        weights += [step * size / total for size in in_step]
    return weights


class ExactBatches(Sampler):
    """The map-style batches: `sampler`'s order in batches of `batch_size`, dealt round-robin by Accelerate
    (`BatchSamplerShard`), except the epoch's last global micro-batch, which is split over the ranks as evenly as
    possible (`share`); a rank whose part is empty gets a stand-in batch (see the module docstring).

    `batch_size = None` tells `BatchSamplerShard` the batches differ in size: it deals them whole, and as their
    number is a multiple of the processes it never completes a round. Index tensors on the fast path (`tensors`),
    lists of ints for a DataLoader that calls the dataset per sample.
    """

    batch_size = None
    drop_last = False

    def __init__(self, sampler: EpochSampler, tensors: bool):
        self.sampler = sampler  # `epoch_sampler()` finds it here after prepare
        self.tensors = tensors
        self.per_process = sampler.batch_size
        self.world_size = sampler.micro_batch_samples // sampler.batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.micro_batch_samples) * self.world_size

    def __iter__(self) -> Iterator:
        indices = self.sampler.indices()
        whole = len(indices) - len(indices) % self.sampler.micro_batch_samples
        batches = list(indices[:whole].split(self.per_process)) if whole else []  # (an empty tensor splits into one empty part)
        tail = indices[whole:]
        if len(tail):
            parts = tail.split([share(len(tail), self.world_size, rank) for rank in range(self.world_size)])
            batches += [part if len(part) else indices[: self.per_process] for part in parts]
        return iter(batches if self.tensors else [batch.tolist() for batch in batches])


class UserBatches(Sampler[list[int]]):
    """The batch_sampler path: the user's batches of the epoch, whole, in the order `sampler` deals their positions;
    the last global micro-batch completed with stand-ins (the epoch's first batch, weight 0).

    `batch_size = None` tells Accelerate's `BatchSamplerShard` the batches may differ in size: it deals them whole,
    round-robin; their number is a multiple of the processes. Each iteration sets `sampler.weights`.
    """

    batch_size = None
    drop_last = False

    def __init__(self, sampler: EpochSampler, source: UserOrder):
        self.sampler = sampler  # `epoch_sampler()` finds it here after prepare
        self.source = source

    def __len__(self) -> int:
        world = self.sampler.micro_batch_samples
        return math.ceil(len(self.sampler) / world) * world

    def __iter__(self) -> Iterator[list[int]]:
        draw = self.source.draw(self.sampler.epoch)
        batches = [draw[position] for position in self.sampler.indices().tolist()]
        stand_ins = -len(batches) % self.sampler.micro_batch_samples
        sizes = [len(batch) for batch in batches] + [0] * stand_ins
        self.sampler.weights = weights_of(sizes, self.sampler.micro_batch_samples, self.sampler.accumulation)
        return iter(batches + [draw[0]] * stand_ins)
