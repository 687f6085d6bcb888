"""The user's own sampler or batch_sampler, turned into an order dist_train can deal, resume and check.

Epoch `e`'s order is the user's object iterated once, `list(iter(sampler))`, under seeds derived from
`(seed, e)` alone (`epoch_seed`, the seed of dist_train's own permutation too):

- a `generator` attribute that is a `torch.Generator` or None (RandomSampler, SubsetRandomSampler,
  WeightedRandomSampler, and any custom sampler drawing from `self.generator`) is set to a generator
  seeded with it for the duration, then put back: a generator the user passed is overridden, so the
  run follows `seed`;
- `set_epoch(epoch)` is called where the sampler has one;
- the global torch (CPU), Python `random` and NumPy RNGs are seeded with it inside a fork of their
  state, so a sampler drawing from them reproduces too, and the training's own RNG streams are untouched
  (a resumed run draws its dropout exactly as the uninterrupted one).

The same is done for the samplers it wraps (`.sampler`, e.g. `BatchSampler(WeightedRandomSampler(...))`).

Every torch sampler reproduces that way. A custom one may not (it draws from a generator kept under
another name, the clock, its process id): `check` materialises epoch 0 twice and compares the processes'
orders, and refuses the run (`UserError`, naming the class and the fix) if either differs, as it refuses
a `DistributedSampler`: dist_train deals to the processes itself.

With `epochs` as the run's budget (no `max_steps`), every epoch's draw must be as long as epoch 0's: the
loop counts `epochs x` the steps of one epoch, for the lr schedule and for when to stop, so a longer
epoch would be cut short and a shorter one end the schedule early. A draw of another length is refused:
epoch 1's at start, any later one when it is drawn (a batch_sampler that packs a varying number of
batches, say). With `max_steps` the epochs may differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import random
import sys

import torch
from accelerate.utils import gather_object
from torch.utils.data import DistributedSampler

from ..errors import UserError


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s order, for dist_train's own permutation and for a user's sampler alike."""
    return seed * 1_000_003 + epoch


def _chain(sampler) -> list:
    """The sampler and the samplers it wraps (`.sampler`, as a BatchSampler has), outermost first."""
    chain, current = [], sampler
    while current is not None and not any(current is seen for seen in chain) and len(chain) < 8:
        chain.append(current)
        current = getattr(current, "sampler", None)
    return chain


@contextlib.contextmanager
def _seeded(sampler, seed: int, epoch: int):
    """Every RNG `sampler` may draw from, seeded with `seed`; all of them as they were afterwards."""
    numpy = sys.modules.get("numpy")  # seeded only if already imported: importing it is not ours to do
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy else None
    swapped = []
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also reseed CUDA's, which this fork does not restore.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        if numpy:
            numpy.random.seed(seed % 2**32)
        try:
            for part in _chain(sampler):
                generator = getattr(part, "generator", False)
                if generator is None or isinstance(generator, torch.Generator):
                    swapped.append((part, generator))
                    part.generator = torch.Generator(device=generator.device if generator else "cpu").manual_seed(seed)
                if callable(getattr(part, "set_epoch", None)):
                    part.set_epoch(epoch)
            yield
        finally:
            for part, generator in swapped:
                part.generator = generator
            random.setstate(python_state)
            if numpy:
                numpy.random.set_state(numpy_state)


class UserOrder:
    """Epoch e's draw of a user's sampler (a 1-D index tensor) or batch sampler (a list of index lists).

    `order(e)` is what `EpochSampler` deals: the indices, or for batches the batches' positions.
    """

    def __init__(self, sampler, seed: int, batches: bool = False, fixed_length: bool = False):
        self.sampler, self.seed, self.batches = sampler, seed, batches
        self.kind = f"{'batch_sampler' if batches else 'sampler'} {type(sampler).__name__}"
        self.fixed_length = fixed_length  # every epoch's draw as long as epoch 0's (see the module docstring)
        self._length: int | None = None  # epoch 0's, once checked
        self._cached: tuple[int, object] | None = None  # (epoch, its draw): one epoch is read many times

    def draw(self, epoch: int):
        """Epoch `epoch`'s indices (a tensor) or batches (lists), drawn from the user's object (cached)."""
        if self._cached is None or self._cached[0] != epoch:
            drawn = self._materialise(epoch)
            self._check_length(drawn, epoch)
            self._cached = (epoch, drawn)
        return self._cached[1]

    def order(self, epoch: int) -> torch.Tensor:
        drawn = self.draw(epoch)
        return torch.arange(len(drawn)) if self.batches else drawn

    def check(self, world_size: int) -> UserOrder:
        """Refuse, on every process at once, an order that is not a function of (seed, epoch) alone."""
        problem, digest = None, None
        try:
            if any(isinstance(part, DistributedSampler) for part in _chain(self.sampler)):
                raise UserError(
                    f"data: the training DataLoader uses a DistributedSampler ({self.kind}); dist_train deals the data "
                    "to the processes itself, so each would see a shard of a shard. Pass the sampler it wraps (or "
                    "shuffle=True)."
                )
            first, again = self.draw(0), self._materialise(0)
            if len(first) == 0:
                raise UserError(f"data: the training {self.kind} yields nothing for epoch 0; check what it samples from.")
            if not _equal(first, again):
                raise UserError(
                    f"data: the training {self.kind} draws a different order each time under the same seed, so neither "
                    "a resumed run nor N processes could follow it. Give it a `generator` attribute (a torch.Generator, "
                    "or None) that its __iter__ draws from, or a `set_epoch(epoch)` method that fixes its order per "
                    "epoch: dist_train seeds both from `seed`."
                )
            self._length = len(first)
            if self.fixed_length:
                self._check_length(self._materialise(1), 1)
            digest = _digest(first)
        except UserError as exc:
            problem = str(exc)
        # Every process learns every verdict, so all stop together instead of some waiting in a collective.
        verdicts = gather_object([(problem, digest)]) if world_size > 1 else [(problem, digest)]
        problems = [p for p, _ in verdicts if p]
        if problems:
            raise UserError(problems[0])
        if len({d for _, d in verdicts}) > 1:
            raise UserError(
                f"data: the training {self.kind} draws a different order on each process (from the rank, the process "
                "id or a generator of its own?), so the processes would not share one epoch. Draw from a `generator` "
                "attribute (a torch.Generator, or None), or the torch RNG, which dist_train seeds alike on every process."
            )
        return self

    def _check_length(self, drawn, epoch: int) -> None:
        if self.fixed_length and self._length is not None and len(drawn) != self._length:
            units = "batches" if self.batches else "indices"
            raise UserError(
                f"data: the training {self.kind} draws {self._length} {units} for epoch 0 but {len(drawn)} for epoch "
                f"{epoch}; with `epochs` as the budget every epoch must be as long (the step count and the lr schedule "
                "are epochs x the steps of one epoch). Make its length the same every epoch, or set max_steps."
            )

    def _materialise(self, epoch: int):
        with _seeded(self.sampler, epoch_seed(self.seed, epoch), epoch):
            items = list(iter(self.sampler))
        return self._as_batches(items) if self.batches else self._as_indices(items)

    def _as_indices(self, items: list) -> torch.Tensor:
        if not items:
            return torch.empty(0, dtype=torch.long)
        try:
            order = torch.as_tensor(items)
        except (TypeError, ValueError, RuntimeError):
            order = None
        integers = order is not None and order.ndim == 1 and not (order.dtype.is_floating_point or order.dtype.is_complex)
        if not integers or order.dtype == torch.bool:
            batch_like = isinstance(items[0], (list, tuple)) or (isinstance(items[0], torch.Tensor) and items[0].ndim > 0)
            hint = " (it yields batches: pass it as batch_sampler=, without batch_size)" if batch_like else ""
            raise UserError(f"data: the training {self.kind} yields {type(items[0]).__name__} items, not integer dataset indices{hint}.")
        return order.long()

    def _as_batches(self, items: list) -> list[list[int]]:
        batches = []
        for batch in items:
            try:
                indices = batch.tolist() if isinstance(batch, torch.Tensor) else [operator.index(i) for i in batch]
            except TypeError:
                indices = None
            if not isinstance(indices, list) or not indices or not all(isinstance(i, int) for i in indices):
                raise UserError(
                    f"data: the training {self.kind} yields {batch!r:.60}; each batch must be a non-empty list of integer indices."
                )
            batches.append(indices)
        return batches


def _equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _digest(drawn) -> str:
    data = drawn.numpy().tobytes() if isinstance(drawn, torch.Tensor) else repr(drawn).encode()
    return hashlib.sha256(data).hexdigest()
