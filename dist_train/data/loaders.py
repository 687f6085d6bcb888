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

The exact tail (every sample once per epoch, the last step short and weighted): epoch.py.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, Subset

from ..accelerate_internals import seed_dispatched_workers
from ..config import Config
from ..errors import UserError
from ..plugins import check_call, resolve
from .batches import worker_settings
from .epoch import EpochSampler, ExactBatches, UserBatches
from .eval_order import fixed_order
from .fastdata import TensorBatches, already_batched, can_use_fast_path, dataset_tensors
from .streams import Dealt, StreamBatches, split_by_rank, stream_loader
from .user_order import UserOrder


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


def weighed(position, batch, micro_batch: int, rank: int) -> tuple[object, float]:
    """The batch this rank trains on in micro-batch `micro_batch` of the epoch's iteration, and the factor on its
    loss: 1, but where a step's batches are not all full (data/epoch.py; 0 for a stand-in batch). A stream's batch
    comes with its step's sample count and may carry padding rows, left out here (`StreamBatches.weighed`)."""
    if isinstance(batch, Dealt):
        return position.weighed(batch, rank)
    if isinstance(position, EpochSampler):
        return batch, position.loss_weight(micro_batch, rank)
    return batch, 1.0


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
