"""Data loaders from the user's `get_dataloader`, with a sample order dist_train owns.

The training order of epoch `e` is a function of `(seed, e)` alone, and the sampler can start at any
offset into it. Accelerate's `prepare` then deals the sampler's batches round-robin to the ranks, so
after `n` global micro-batches exactly the first `n x world_size x batch_size` samples of the order
have been consumed, whatever the world size. That is what makes N ranks match one rank at the same
global batch, and a mid-epoch resume, on any world size, continue with exactly the samples not yet seen.

Which order:
- `shuffle=True` (a plain `RandomSampler` over the whole dataset): a permutation drawn from
  `epoch_seed(seed, e)`; no sampler (`shuffle=False`, a `SequentialSampler`): the dataset in order.
- Any other sampler the user put in the DataLoader (`WeightedRandomSampler`, `SubsetRandomSampler`,
  `RandomSampler(replacement=True)` or with `num_samples=`, a custom `Sampler`): that sampler's own
  draw for the epoch, materialised under the same seed (user_order.py), so its distribution and its
  subset are kept; the epoch is as long as the draw (a subset of 10% trains on 10% of the data per
  epoch). The plain shuffle is that rule too: materialising the RandomSampler gives the same permutation.
  A sampler whose draw is not a function of (seed, epoch) is refused at start, and so, unless the run
  counts `max_steps`, is one whose epochs differ in length (user_order.py).
- A custom `batch_sampler` (the DataLoader's `batch_size` is None): its batches are honoured as they
  are, variable sizes included. Epoch `e`'s batches are its draw under the same seed; whole batches are
  dealt round-robin (global micro-batch k is batches k x world_size ... of the draw), so N processes
  train on the batches one process would, N at a time. The loop counts `batch_size` samples per batch
  and process (`TrainState.samples_consumed`), so the position is `samples_consumed // batch_size`
  batches: a mid-epoch resume needs the `batch_size` the run was started with. `DataLoader(batch_size=None)`
  without a batch_sampler (automatic batching off) is refused: it has no batches to deal.
- An `IterableDataset` (a stream): read on rank 0 and dealt to the ranks, its position saved or replayed
  (streams.py); one already split per rank is read by each rank, its own part, and not split again
  (training and validation alike: `prepare_loaders`).

The exact tail (map-style data without a batch_sampler): every sample once per epoch. The epoch is cut
into optimizer steps of `batch_size x world_size x grad_accum_steps` samples, and its last step holds
what is left: its last global micro-batch split over the ranks as evenly as possible, at least 2 samples on
a rank that gets any (`share`, `ExactBatches`),
each rank's mean loss weighted by its share of the step's samples (`EpochSampler.loss_weight`), so that
DDP's average over the ranks and Accelerate's over the accumulation are the exact mean over the step's
real samples. A rank with no sample left gets a stand-in batch the loop runs in eval mode with weight 0:
DDP needs every rank in the reduction; its gradient is zero and its buffers untouched. (Padding, what
`DistributedSampler` and Accelerate's `even_batches` do, would train the epoch's first samples twice, and
one process would not be the user's own loop over their DataLoader.) `drop_last=True` drops the partial step.
On the batch_sampler path the epoch is still cut into whole steps of `world_size x grad_accum_steps`
batches, the last completed with the draw's first batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, SequentialSampler, Subset

from ..accelerate_internals import seed_dispatched_workers
from ..config import Config
from ..errors import UserError
from ..plugins import check_call, resolve
from .batches import worker_settings
from .eval_order import fixed_order
from .fastdata import TensorBatches, already_batched, can_use_fast_path, dataset_tensors
from .streams import StreamBatches, split_by_rank, stream_loader
from .user_order import UserOrder, epoch_seed


class EpochSampler(Sampler[int]):
    """Yields `order(seed, epoch)[start:]`: to its end (the exact tail, given `batch_size`), or cut to whole
    optimizer steps.

    The order is dist_train's permutation of `num_samples` (or `range(num_samples)` without `shuffle`),
    or, given a `source`, the user's sampler drawn for the epoch (`UserOrder`; then `num_samples` is the
    draw's length). `step_samples` (batch x ranks x accumulation) is the unit of the cut: with `drop_last`
    the partial last step is dropped; without the exact tail it is padded by wrapping (the order's first
    samples again).

    On the batch_sampler path the order is of the user's batches (`UserBatches`), the sizes count
    batches, and `unit_samples` (the loop's `batch_size`) converts the loop's `samples_consumed`.
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
        # The per-process batch when the epoch's tail is exact (the map-style path without a batch_sampler): the
        # epoch is not padded, its last global micro-batch is split evenly over the ranks (ExactBatches) and
        # `loss_weight` makes the short last step the exact mean. None: padded to whole steps (the batch_sampler path).
        self.batch_size = batch_size
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
        """The length of this epoch's order (before padding or dropping)."""
        return self._num_samples if self.source is None else len(self.source.order(self.epoch))

    @property
    def epoch_samples(self) -> int:
        """Where this iteration ends: the rest of the data from `start` cut (drop_last) or padded to whole
        optimizer steps. Counted from `start`, so that after a resume with another step size too, every
        step but none is short."""
        rest = max(self.num_samples - self.start, 0)
        if self.exact_tail and not self.drop_last:
            return self.start + rest  # every sample once; the last step may be short
        steps = rest // self.step_samples if self.drop_last else math.ceil(rest / self.step_samples)
        return self.start + steps * self.step_samples

    @property
    def exact_tail(self) -> bool:
        return self.batch_size is not None

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
        `start`): 1, except in a short last step, where it is `world x accumulation x (rank's samples) / (step's
        samples)`, so that DDP's average over the ranks of Accelerate's 1/accumulation-scaled losses is the exact
        mean over the step's real samples; 0 for a rank with none (ExactBatches gives it a stand-in batch)."""
        if not self.exact_tail:
            return 1.0
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
        order = self.order()
        end = self.epoch_samples
        while end > len(order):  # padding: wrap around (more than once for a dataset smaller than one step)
            order = torch.cat([order, order[: end - len(order)]])
        return order[self.start : max(end, self.start)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


def share(samples: int, world_size: int, rank: int) -> int:
    """Rank `rank`'s part of `samples` split over the ranks as evenly as possible, the first ranks taking one more,
    but at least 2 on a rank that gets any (BatchNorm in training has no statistics of one sample; the user's own
    loop would not make a batch of 1 either, unless one sample is all there is): contiguous parts in rank order,
    so that N ranks train one rank's global micro-batch."""
    ranks = min(world_size, max(samples // 2, 1))
    return samples // ranks + (rank < samples % ranks) if rank < ranks else 0


class ExactBatches(Sampler):
    """The exact tail's batches: `sampler`'s order in batches of `batch_size`, dealt round-robin by Accelerate
    (`BatchSamplerShard`), except the epoch's last global micro-batch, which is split over the ranks as evenly as
    possible (`share`). A rank whose part is empty gets a stand-in batch (real samples of the epoch) that the
    loop runs in eval mode with loss weight 0 (`EpochSampler.loss_weight`): a zero gradient for DDP's reduction,
    its buffers (BatchNorm statistics) untouched, nothing trained twice.

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
    """The batch_sampler path: the user's batches of the epoch, in the order `sampler` deals their positions.

    `batch_size = None` tells Accelerate's `BatchSamplerShard` the batches may differ in size: it deals
    them whole, round-robin. `sampler` has already made their number a multiple of the processes.
    """

    batch_size = None
    drop_last = False

    def __init__(self, sampler: EpochSampler, source: UserOrder):
        self.sampler = sampler  # `epoch_sampler()` finds it here after prepare
        self.source = source

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.source.draw(self.sampler.epoch)
        return iter([batches[position] for position in self.sampler.indices().tolist()])


def _user_loaders(cfg: Config):
    get_data = resolve(cfg.data, "data")
    view = cfg.data_view()
    check_call(get_data, {}, f"data: {cfg.data!r} cannot be called as get_dataloader(cfg, train)", "It must take (cfg, train).", view, True)
    return get_data(view, True), get_data(view, False)


def _as_loader(obj, cfg: Config, train: bool) -> DataLoader:
    if isinstance(obj, DataLoader):
        return obj
    if isinstance(obj, IterableDataset):  # a stream (a datasets.IterableDataset too) has its own order: no shuffle=
        return DataLoader(obj, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    if isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        return DataLoader(obj, batch_size=cfg.batch_size, shuffle=train, num_workers=cfg.num_workers)
    raise UserError(
        f"data: {cfg.data!r} returned a {type(obj).__name__} for train={train}; it must return a torch DataLoader or a Dataset."
    )


def _check_not_empty(loader: DataLoader, cfg: Config, train: bool) -> None:
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        split = "training" if train else "validation"
        raise UserError(f"data: the {split} dataset from {cfg.data!r} is empty; check data_args (e.g. the data path).")


def _own_order(sampler, dataset) -> bool | None:
    """Whether `sampler` is a plain shuffle (True) or sequential (False) over the whole dataset, the two
    orders dist_train draws itself (the very orders materialising them would give); None otherwise."""
    if type(sampler) is SequentialSampler and len(sampler) == len(dataset):
        return False
    # Without replacement and num_samples == n, RandomSampler yields one randperm(n) of its generator.
    plain = type(sampler) is RandomSampler and not sampler.replacement
    if plain and sampler.num_samples == len(sampler.data_source) == len(dataset):
        return True
    return None


def _with_epoch_sampler(loader: DataLoader, cfg: Config, world_size: int) -> DataLoader:
    """Rebuild the user's training loader around an EpochSampler, keeping everything else it set."""
    if isinstance(loader.dataset, IterableDataset):
        return stream_loader(loader, cfg, world_size)  # a stream: Accelerate dispatches it (streams.py)
    if loader.batch_size is None:
        return _with_user_batches(loader, cfg, world_size)
    shuffle = _own_order(loader.sampler, loader.dataset)
    source = None
    if shuffle is None:  # the user's own sampler: its draw, checked
        source = UserOrder(loader.sampler, cfg.seed, fixed_length=_epochs_budget(cfg)).check(world_size)
    micro_batch_samples = loader.batch_size * world_size
    sampler = EpochSampler(
        len(loader.dataset),
        cfg.seed,
        bool(shuffle),
        micro_batch_samples,
        micro_batch_samples * cfg.grad_accum_steps,
        loader.drop_last,
        source=source,
        batch_size=loader.batch_size,
    )
    sampler.dataset_length = len(loader.dataset)
    if sampler.epoch_samples == 0:
        raise UserError(
            f"data: drop_last=True drops the whole training set: {sampler.num_samples} samples are fewer than one "
            f"optimizer step ({loader.batch_size} x {world_size} processes x {cfg.grad_accum_steps} accumulation "
            f"steps = {sampler.step_samples}); lower batch_size or grad_accum_steps, or set drop_last=False."
        )
    return _rebuilt(loader, cfg, sampler)


def _with_user_batches(loader: DataLoader, cfg: Config, world_size: int) -> DataLoader:
    """The batch_sampler path: the user's batches, drawn per epoch and dealt whole (see the module docstring)."""
    if loader.batch_sampler is None:
        raise UserError(
            f"data: the training DataLoader from {cfg.data!r} has batch_size=None (automatic batching off), so it has "
            "no batches to deal to the processes; give it batch_size= (with shuffle= or sampler=), or a batch_sampler=."
        )
    source = UserOrder(loader.batch_sampler, cfg.seed, batches=True, fixed_length=_epochs_budget(cfg)).check(world_size)
    # Units are batches: one global micro-batch is one batch per process. The loop counts each process's
    # batch as batch_size samples, whatever its size, hence unit_samples.
    sampler = EpochSampler(0, cfg.seed, False, world_size, world_size * cfg.grad_accum_steps, source=source, unit_samples=cfg.batch_size)
    sampler.dataset_length = len(loader.dataset)
    return _rebuilt(loader, cfg, sampler, UserBatches(sampler, source))


def _epochs_budget(cfg: Config) -> bool:
    """Whether the loop counts the run in epochs x steps per epoch (so every epoch must be as long)."""
    return cfg.max_steps is None


def _rebuilt(loader: DataLoader, cfg: Config, sampler: EpochSampler, batch_sampler: UserBatches | None = None) -> DataLoader:
    """The user's loader, its order now `sampler`'s (batched by `batch_sampler` on the batch_sampler path)."""
    # On a GPU, pinned batches let Accelerate copy them to the device without blocking (non_blocking=True).
    pin_memory = loader.pin_memory or (torch.cuda.is_available() and not cfg.cpu)
    fast = can_use_fast_path(loader)
    batch_sampler = batch_sampler or ExactBatches(sampler, tensors=fast)
    if fast:
        # Tensors in memory: one index_select per tensor per batch, same order (see fastdata.py).
        dataset = TensorBatches(dataset_tensors(loader.dataset), pin_memory=pin_memory)  # gathers into pinned memory itself
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=already_batched, generator=sampler.loader_generator)
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        **{**worker_settings(loader), "pin_memory": pin_memory},
        generator=sampler.loader_generator,
    )


def _overfit_loaders(loader: DataLoader, cfg: Config, world_size: int) -> tuple[DataLoader, DataLoader]:
    """`overfit_batches: N`: train and validate on the first N global batches of the training set, in order.

    N global batches (N x batch_size x processes samples) keep the set the same for every world size.
    """
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise UserError("overfit_batches needs a map-style training Dataset with a batch_size; this loader has neither.")
    count = min(cfg.overfit_batches * loader.batch_size * world_size, len(loader.dataset))
    subset = Subset(loader.dataset, range(count))
    train, val = (
        DataLoader(subset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn, num_workers=loader.num_workers)
        for _ in range(2)
    )
    return train, val


def build_loaders(cfg: Config, world_size: int) -> tuple[DataLoader, DataLoader]:
    """The training and validation DataLoaders, before `accelerator.prepare`."""
    train_obj, val_obj = _user_loaders(cfg)
    train_loader, val_loader = _as_loader(train_obj, cfg, True), _as_loader(val_obj, cfg, False)
    _check_not_empty(train_loader, cfg, True)
    _check_not_empty(val_loader, cfg, False)
    if cfg.overfit_batches:
        train_loader, val_loader = _overfit_loaders(train_loader, cfg, world_size)
    train_loader = _with_epoch_sampler(train_loader, cfg, world_size)
    return train_loader, split_if_stream(fixed_order(val_loader, "validation"), cfg, world_size, "validation")


def eval_loader(obj, cfg: Config, what: str) -> DataLoader:
    """An evaluation DataLoader of what the user's data code returned (a DataLoader or a Dataset), over a fixed list of samples."""
    loader = _as_loader(obj, cfg, False)
    if not isinstance(loader.dataset, IterableDataset) and len(loader.dataset) == 0:
        raise UserError(f"data: the {what} dataset is empty; check data_args (e.g. the data path).")
    return fixed_order(loader, what)


def split_if_stream(loader: DataLoader, cfg: Config, world_size: int, what: str) -> DataLoader:
    """An evaluation loader, marked `per_rank` when it is a stream already split per rank (streams.py)."""
    if world_size > 1 and isinstance(loader.dataset, IterableDataset):
        loader.per_rank = split_by_rank(loader, cfg, what)
    return loader


def prepare_loaders(accelerator, *objects) -> list:
    """`accelerator.prepare(*objects)`, except a stream already split per rank (`per_rank`): each rank reads its
    own part, moved to its device, never dispatched from rank 0 nor split again (that would lose data)."""
    from accelerate.data_loader import prepare_data_loader

    shared = [obj for obj in objects if not getattr(obj, "per_rank", False)]
    if len(shared) > 1:
        prepared = iter(accelerator.prepare(*shared))
    else:  # `prepare` returns one object bare, and refuses none
        prepared = iter([accelerator.prepare(*shared)] if shared else [])
    result = []
    for obj in objects:
        if not getattr(obj, "per_rank", False):
            result.append(next(prepared))
            continue
        own = prepare_data_loader(
            obj,
            accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
            non_blocking=accelerator.non_blocking,
        )
        own.per_rank = True
        result.append(own)
    return result


def epoch_sampler(loader) -> EpochSampler | None:
    """The EpochSampler inside a (prepared) loader, if dist_train owns its order."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", None)
        if isinstance(sampler, EpochSampler):
            return sampler
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return None


def loss_weight(position, micro_batch: int, rank: int) -> float:
    """The factor on this rank's loss in micro-batch `micro_batch` of the epoch's iteration: 1, but in the short
    last step of an epoch with an exact tail (`EpochSampler.loss_weight`; 0 for a stand-in batch)."""
    return position.loss_weight(micro_batch, rank) if isinstance(position, EpochSampler) else 1.0


def train_position(loader) -> EpochSampler | StreamBatches | None:
    """Where the (prepared) training loader starts its next epoch: its EpochSampler, or its StreamBatches."""
    sampler = epoch_sampler(loader)
    if sampler is not None:
        return sampler
    stream = getattr(loader, "dataset", None)
    if not isinstance(stream, StreamBatches):
        return None
    seed_dispatched_workers(loader)  # so that a resumed run draws no more from the global torch RNG (dropout)
    return stream
