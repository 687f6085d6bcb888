"""Streaming training data (an `IterableDataset`): read once, dealt to the ranks, resumable mid-epoch.

Accelerate dispatches a stream: rank 0 reads it through the user's DataLoader (whose workers split the
files) and sends each rank its slice of every global batch. So each sample is read once, by one process,
and trained on by exactly one rank per epoch, whatever the world size; N ranks see the batches one rank
would, N at a time; the epoch ends when the stream does. Its tail is exact, as for map-style data
(data/epoch.py): a global batch that does not split evenly (the epoch's last, or a short batch inside the
stream) is cut over the ranks as evenly as possible, and each rank's loss weighted by its share of the
step's samples; a rank with none trains a stand-in with weight 0 (`_dealt`, `weighed`). One global
micro-batch is `world_size` of the user's batches, so after `samples_consumed` the stream has given
`samples_consumed // batch_size` batches, the position a checkpoint records, which any world size can
continue at the same batch_size.

How a mid-epoch position is restored (`StreamBatches.mode`):
- `state`: the loader or its dataset has `state_dict()`/`load_state_dict()` (torchdata's
  `StatefulDataLoader`, with per-worker states; a user's stateful IterableDataset; a Hugging Face
  `datasets.IterableDataset`). The state after exactly the batches trained on, whatever Accelerate and
  the DataLoader fetched ahead, goes into the checkpoint (`data_state.pt`) and is loaded on resume. A
  stateful dataset read by DataLoader workers is read through a `StatefulDataLoader`, which tracks the
  workers' states per batch.
- `replay`: a stream without a state, or one whose state leaves part of its position out (a Hugging
  Face stream shuffled with a buffer: its `state_dict()` omits the buffer, and loading it refills the
  buffer from further on, losing the samples that were in it). The checkpoint records how many batches of
  the epoch were trained on and a fingerprint of the last one; the resumed run reads the epoch again
  from its start (its `set_epoch` and the workers' seeds are the run's, so a deterministic stream gives
  the same batches), skips those batches, and checks the fingerprint: a stream that does not repeat
  itself is refused, not trained on the wrong samples. Exact at the cost of reading the skipped part.

A stream that is already split per rank (`split_dataset_by_node`, files chosen by rank in `__iter__`) is
not split again: every rank reads the first sample once at start, and where the ranks' first samples
differ, each rank trains on its own part (`per_rank`), read by itself and never dispatched (dispatching
would train rank 0's part alone and lose the others'). Its parts rarely have the same length, and DDP
needs every rank at every step: the ranks agree once per step how many micro-batches it has and how many
samples (`_agreed`); a rank whose part ran out trains a stand-in (weight 0) while the others train the
rest of theirs, weighted as above, so the epoch ends with the longest part and no sample is left out. Its
position is per rank (each rank's state or replay count), so a mid-epoch checkpoint continues on the same
world size only (a clear error on another; an epoch-end one on any). A stream that yields nothing on some
rank is refused before training.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import find_batch_size, gather, slice_tensors
from torch.utils.data import DataLoader, IterableDataset

from ..config import Config
from ..errors import UserError
from .batches import worker_settings
from .stream_parts import Dealt, cut


def stateful(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def fingerprint(obj) -> str:
    """A digest of a batch (tensors, arrays, numbers and strings, nested): equal batches, equal digests."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        digest.update(f"A{obj.dtype}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).view(np.uint8))
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in obj:
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"{type(obj).__name__}:{obj!r}".encode())


def state_misses_buffer(dataset) -> bool:
    """Whether `dataset` is a Hugging Face `datasets.IterableDataset` shuffled with a buffer, whose
    `state_dict()` leaves the buffer's contents out (datasets only warns, and refills it on load)."""
    pending = [getattr(dataset, "_ex_iterable", None)]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            return True
        pending.append(getattr(node, "ex_iterable", None))
        pending.extend(getattr(node, "ex_iterables", None) or ())
    return False


class StreamBatches(IterableDataset):
    """The user's streaming DataLoader as a stream of its batches, with its position after each one.

    Accelerate's dispatcher reads this on rank 0 (a DataLoader with `batch_size=None`), `world_size`
    batches per global micro-batch, one micro-batch ahead. `state_at(samples_consumed)` is the position
    after exactly the `samples_consumed // batch_size` batches trained on, whatever was fetched ahead:
    the source's state (`mode == "state"`), or the batch count and the last batch's fingerprint
    (`"replay"`). The loop calls `set_position` before each epoch, as for an EpochSampler; `restore`
    loads a checkpoint's position for the next iteration.
    """

    def __init__(
        self, loader: DataLoader, seed: int, batch_size: int, processes: int, keep: int, per_rank: bool = False, accumulation: int = 1
    ):
        self.loader, self.seed, self.processes, self._keep, self.per_rank = loader, seed, processes, keep, per_rank
        self.accumulation = accumulation
        # The loop counts batch_size x processes samples per global micro-batch: one user batch per rank of a
        # per-rank stream, `processes` batches of the one stream otherwise.
        self.unit_samples = batch_size * processes if per_rank else batch_size
        source = loader if stateful(loader) else loader.dataset if stateful(loader.dataset) else None
        self.mode = "replay" if source is None or state_misses_buffer(loader.dataset) else "state"
        self.source = source if self.mode == "state" else None
        self.dataset_length = None
        self.epoch, self.start = 0, 0
        # Micro-batch key -> (the user's batches read so far this epoch, the position after the last of them).
        self._positions: dict[int, tuple[int, object] | None] = {}
        self._held: tuple[tuple[int, int], Iterator] | None = None  # a replayed epoch, read up to the saved position
        self._restored: tuple[int, object] | None = None  # the checkpoint's position, until this rank reads a batch
        self._stand_in = None  # a batch of this rank's part, for the micro-batches after its part ran out

    exact = True  # a mid-epoch position can always be saved and continued (or the resume refused, never restarted)

    @property
    def source_name(self) -> str:
        return type(self.source if self.source is not None else self.loader.dataset).__name__

    def __len__(self) -> int:
        # A TypeError for a stream without a length: the loop then counts no epoch length. A per-rank stream has
        # none either: its epoch is as long as the longest rank's part, which only that rank knows.
        if self.per_rank:
            raise TypeError("a stream split per rank ends with its longest part")
        return len(self.loader)

    def set_position(self, epoch: int, samples_consumed: int) -> None:
        self.epoch, self.start = epoch, samples_consumed // self.unit_samples
        self._positions = {self.start: None}

    def state_at(self, samples_consumed: int):
        """The position after the batches `samples_consumed` stands for (this rank's for a per-rank stream;
        otherwise the main process's, None on the others)."""
        key = samples_consumed // self.unit_samples
        entry = self._positions.get(key)
        if entry is None:
            return None
        batches, position = entry
        if self.mode == "replay":
            return {"replay": {"epoch": self.epoch, "batches": batches, "at": key, "fingerprint": position}}
        return position

    def restore(self, state) -> None:
        """Continue from a checkpoint's position at the next iteration. A source's `load_state_dict` errors
        propagate; a replayed epoch that does not repeat its batches is a UserError."""
        if self.mode == "state":
            if isinstance(state, dict) and "replay" in state:
                raise UserError(
                    f"its stream position was saved by replaying (the stream had no complete state_dict() then), and this "
                    f"run's {self.source_name} has one; resume with the data it was written with, or from an epoch-end checkpoint."
                )
            self.source.load_state_dict(state)
            self._restored = (0, copy.deepcopy(state))
            return
        if not (isinstance(state, dict) and "replay" in state):
            raise UserError(
                f"its stream position is a {self.source_name} state_dict(), and this run's stream is replayed "
                f"({self._why_replay()}); resume with the data it was written with, or from an epoch-end checkpoint."
            )
        saved = state["replay"]
        epoch, batches = int(saved["epoch"]), int(saved["batches"])
        print(
            f"dist_train: replaying the first {batches} batches of epoch {epoch} to reach the saved position ({self._why_replay()})",
            flush=True,
        )
        iterator = self._read(epoch, first=1)
        last = None
        for _ in range(batches):
            _, _, last = next(iterator, (None, None, None))
        if last != saved["fingerprint"]:
            raise UserError(
                f"its stream gave other batches when epoch {epoch} was read again (batch {batches} differs from the one "
                f"trained on), so the rest of the epoch cannot be found: the {self.source_name} is not the same stream each "
                "time it is read for an epoch (unseeded randomness, changed files). Make it deterministic (seed it from "
                "set_epoch()), give it state_dict()/load_state_dict(), or resume from an epoch-end checkpoint (resume: PATH)."
            )
        self._held = ((epoch, int(saved.get("at", batches))), iterator)
        self._restored = (batches, last)

    def _why_replay(self) -> str:
        if state_misses_buffer(self.loader.dataset):
            return "its state_dict() leaves the shuffle buffer out"
        return "it has no state_dict()"

    def __iter__(self):
        held, self._held = self._held, None
        if held is not None and held[0] == (self.epoch, self.start):
            batches = held[1]
        elif self.mode == "replay":
            batches = self._read(self.epoch, first=1)
            for _ in range(self.start):  # the checkpoint's position, reached without a restore (not expected)
                next(batches, None)
        else:
            batches = self._read(self.epoch, first=self.start + 1)
        restored, self._restored = self._restored, None
        for key, item, position in self._agreed(batches, restored) if self.per_rank else self._dealt(batches):
            if key is not None:
                self._positions[key] = position
                self._positions.pop(key - self._keep, None)
            yield item

    def _read(self, epoch: int, first: int) -> Iterator[tuple[int, object, object]]:
        """The user's batches of `epoch`, numbered from `first`, each with the position right after it."""
        dataset = self.loader.dataset
        if hasattr(dataset, "set_epoch"):  # e.g. a shuffled datasets.IterableDataset: its epoch is the run's
            dataset.set_epoch(epoch)
        # Worker seeds from the loader's own generator, per epoch: a DataLoader without one draws them from
        # the global torch RNG at every iter(), and a resumed run has one iter() more mid-epoch.
        self.loader.generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) ^ 0x5EED_5EED)
        for index, batch in enumerate(self.loader, start=first):
            position = copy.deepcopy(self.source.state_dict()) if self.mode == "state" else fingerprint(batch)
            yield index, batch, position

    def _dealt(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        """The dispatched stream's items: each global micro-batch (`processes` of the user's batches) as one part per
        rank, a step (`accumulation` global micro-batches) read before any of it is yielded, so that each part
        carries its step's sample count (`Dealt`). Accelerate's dispatcher concatenates the parts and gives rank r
        the r-th: full batches are each rank's own batch, as Accelerate would deal them; a group that does not
        split evenly (the epoch's end, or a short batch inside the stream) is cut over the ranks as evenly as
        possible (`share`) and each part padded to the longest with rows the rank then leaves out (`weighed`), a
        rank with none training a stand-in with weight 0. (Accelerate would fill such a group with the epoch's first
        samples, training them twice.) Yields (the group's last batch number or None, item, position)."""
        while True:
            step = [group for group in (list(itertools.islice(batches, self.processes)) for _ in range(self.accumulation)) if group]
            if not step:
                return
            samples = sum(find_batch_size(batch) for group in step for _, batch, _ in group)
            for group in step:
                parts, in_group, whole = cut([batch for _, batch, _ in group], self.processes)
                index, _, position = group[-1]
                for rank, part in enumerate(parts):
                    last = rank == len(parts) - 1  # the group's position is recorded with its last part
                    yield (index if last else None), Dealt.of(part, samples, in_group, int(whole)), (index, position)
            if len(step) < self.accumulation or len(step[-1]) < self.processes:
                return  # the stream ended inside this step

    def _agreed(self, batches: Iterator[tuple], restored: tuple[int, object] | None) -> Iterator[tuple]:
        """A per-rank stream's items: every rank reads its step (`accumulation` of its own batches), then the ranks
        agree, in one collective, on how many micro-batches the step has (the most any rank has) and how many
        samples; a rank whose part ran out trains a stand-in (weight 0) while the others train theirs, so the
        epoch ends when the last part does and no sample is left out. Yields (micro-batch key, item, position)."""
        device = PartialState().device  # NCCL gathers CUDA tensors, gloo CPU ones
        key, last, ran_out = self.start, restored or (0, None), False
        while True:
            mine = [] if ran_out else list(itertools.islice(batches, self.accumulation))
            ran_out = len(mine) < self.accumulation
            sizes = [find_batch_size(batch) for _, batch, _ in mine]
            if mine:
                self._stand_in = mine[0][1]
            told = torch.tensor([len(mine), sum(sizes), self._stand_in is not None], device=device)
            ranks = gather(told).view(-1, 3).tolist()  # per rank: its micro-batches, its samples, whether it has a batch
            micro_batches, samples = max(r[0] for r in ranks), sum(r[1] for r in ranks)
            if micro_batches == 0:
                return
            if any(r[0] < micro_batches and not r[2] for r in ranks):  # a rank that has read nothing in this process
                source = next(rank for rank, r in enumerate(ranks) if r[2])
                self._stand_in = _broadcast_object(self._stand_in, source)
            for i in range(micro_batches):
                key += 1
                if i < len(mine):
                    index, batch, position = mine[i]
                    last = (index, position)
                    yield key, Dealt.of(batch, samples, sizes[i]), last
                else:
                    yield key, Dealt.of(self._stand_in, samples, 0), last

    def weighed(self, item: Dealt, rank: int) -> tuple[object, float]:
        """The rows of `item` rank `rank` trains on, and the factor on its mean loss: `processes x accumulation x
        (its samples) / (the step's samples)`, exactly 1 in a step of full batches, 0 for a stand-in (as for
        map-style data, data/epoch.py). No device sync: the counts are in a shape (`Dealt`)."""
        mine, samples = item.real_rows(rank, self.processes)
        if not mine:
            return item.batch, 0.0
        batch = item.batch if mine == len(item.counts) else slice_tensors(item.batch, slice(0, mine))
        return batch, self.processes * self.accumulation * mine / samples


def _broadcast_object(obj, source: int):
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=source)
    return holder[0]


def stream_loader(loader: DataLoader, cfg: Config, world_size: int) -> DataLoader:
    """The training stream for Accelerate to dispatch: the user's batches through a StreamBatches."""
    if not stateful(loader) and stateful(loader.dataset) and loader.num_workers > 0 and not state_misses_buffer(loader.dataset):
        loader = _stateful_loader(loader, cfg)
    per_rank = split_by_rank(loader, cfg, "training")
    # Batches read ahead of the step boundary: the step `_dealt` / `_agreed` holds back, and Accelerate's one
    # micro-batch ahead.
    keep = 2 * world_size * (cfg.grad_accum_steps + 3)
    stream = StreamBatches(loader, cfg.seed, cfg.batch_size, world_size, keep, per_rank=per_rank, accumulation=cfg.grad_accum_steps)
    batches = DataLoader(stream, batch_size=None, collate_fn=_as_is)
    batches.per_rank = per_rank  # data.prepare_loaders: a per-rank stream is not dispatched by Accelerate
    return batches


def _as_is(batch):
    return batch  # the user's loader has collated it already


def _stateful_loader(loader: DataLoader, cfg: Config) -> DataLoader:
    """A dataset's own state, read by worker processes, is only known per batch through torchdata's loader."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        raise UserError(
            f"data: the training {type(loader.dataset).__name__} from {cfg.data!r} has state_dict(), but with "
            f"num_workers={loader.num_workers} its position lives in the worker processes; `pip install torchdata` "
            "(dist_train then reads it through a StatefulDataLoader), or set num_workers: 0."
        ) from None
    return StatefulDataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        **worker_settings(loader),
    )


def split_by_rank(loader: DataLoader, cfg: Config, split: str) -> bool:
    """Whether the stream is already split per rank. Every rank reads its first sample: the same everywhere
    is one stream (dispatched from rank 0); differing, each rank's own part. Nothing on some rank is refused
    for training (its epochs would be empty, and Accelerate fails on an empty stream with a traceback)."""
    from accelerate.utils import gather_object

    first = next(iter(loader.dataset), _NOTHING)
    prints = gather_object([None if first is _NOTHING else fingerprint(first)])
    empty = [rank for rank, digest in enumerate(prints) if digest is None]
    name = type(loader.dataset).__name__
    if len(empty) == len(prints):
        raise UserError(f"data: the {split} {name} from {cfg.data!r} yields nothing; check data_args (e.g. the data path).")
    if empty and split == "training":
        raise UserError(
            f"data: the training {name} from {cfg.data!r} yields nothing on rank(s) {empty} but data on others: it is "
            "split by rank into fewer parts than there are processes (e.g. fewer files than ranks), so every epoch "
            "would end before its first step. Split it into at least as many parts as processes, or yield the whole "
            "stream on every rank (dist_train then deals it)."
        )
    if all(digest == prints[0] for digest in prints):
        return False
    # Differing first samples are a split, or a whole stream in unseeded random order (each rank would then
    # train on all of it): read again, an unseeded stream starts elsewhere.
    again = next(iter(loader.dataset), _NOTHING)
    again = None if again is _NOTHING else fingerprint(again)
    unseeded = [rank for rank, same in enumerate(gather_object([again == prints[PartialState().process_index]])) if not same]
    if unseeded:
        raise UserError(
            f"data: the {split} {name} from {cfg.data!r} starts with another sample each time it is read on rank(s) "
            f"{unseeded} (unseeded randomness: a shuffle or augmentation without a seed), so dist_train cannot tell "
            "whether it is split per rank or the whole stream in a random order, which every rank would train on. "
            "Seed its randomness (from set_epoch() and the rank, if it splits itself by rank)."
        )
    return True


_NOTHING = object()
