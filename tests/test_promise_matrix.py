"""The promise matrix, in-process half: how dist_train deals an epoch's samples, over generated setups.

Hypothesis draws the setup (epoch length, per-process batch, processes, accumulation, shuffle,
drop_last, seed, epoch, and whose order: dist_train's own, or a user's `SubsetRandomSampler` or
`WeightedRandomSampler` materialised for the epoch) and the test deals the epoch as a real run would:
`EpochSampler`, then `ExactBatches` (lists on the regular path, index tensors on the in-memory fast path), then
Accelerate's `BatchSamplerShard`, one per rank. Global micro-batch k is rank 0's k-th batch, then
rank 1's, ...; an optimizer step is `grad_accum_steps` consecutive global micro-batches.

The oracle is the epoch's order itself (the exact tail: no padding, `wrapped` checks nothing is dealt
past it): every promise below is a statement about which stretch of it a run sees; counts are compared
as multisets of the order (a weighted draw repeats indices; a permutation holds each once). `deal` also
checks the loss weights: in every optimizer step each real sample's share of the gradient is 1 / (the
step's samples). The batch_sampler path (a user's batches, dealt whole, the last global micro-batch
completed with stand-ins) has its own property, with the same weights check, and so has a stream dealt from
rank 0 (its batches of drawn sizes, short ones inside it too, cut by `StreamBatches._dealt`).

Runs are derandomized (the examples follow from each test's source), so CI is deterministic and a
failure replays by running the file again; Hypothesis also prints the falsifying example and a
`@reproduce_failure` blob to paste above the test.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from dist_train.config import load_config
from dist_train.data import planned_steps
from dist_train.data.epoch import EpochSampler, ExactBatches, UserBatches
from dist_train.data.loaders import _with_epoch_sampler, epoch_sampler
from dist_train.data.streams import StreamBatches
from dist_train.data.user_order import UserOrder
from dist_train.errors import UserError
from dist_train.state import TrainState

MAX_EXAMPLES = 400  # per property; the whole file stays well under 30 s on 2 shared cores

MATRIX = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same examples on every run and machine: CI is deterministic, failures replay
    database=None,  # nothing to remember between runs when the examples are fixed
    print_blob=True,  # a failure also prints @reproduce_failure(...) for the exact example
    deadline=None,  # timings on a shared 2-core machine are noise, not a property
    # conftest's autouse `_isolated` fixture is function-scoped; these examples touch no files, env or
    # Accelerate state, so sharing one isolation per test between examples is fine.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def _announce(request):
    """Say how many examples each property checks, and how long the matrix took."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    properties = sum(1 for item in request.session.items if item.module is request.module and hasattr(item.obj, "hypothesis"))
    with capture.global_and_fixture_disabled():
        print(f"\npromise matrix: {properties} properties x {MAX_EXAMPLES} examples each (derandomize=True)")
    started = time.perf_counter()
    yield
    with capture.global_and_fixture_disabled():
        print(f"\npromise matrix: {time.perf_counter() - started:.1f} s for the file")


@dataclasses.dataclass(frozen=True)
class Setup:
    num_samples: int
    seed: int
    shuffle: bool
    drop_last: bool
    epoch: int
    batch_size: int  # per process
    world_size: int
    grad_accum_steps: int
    source: str | None = None  # None: dist_train's order; "subset" / "weighted": a user sampler's draw

    @property
    def micro_batch_samples(self) -> int:  # one global micro-batch
        return self.batch_size * self.world_size

    @property
    def step_samples(self) -> int:  # one optimizer step
        return self.micro_batch_samples * self.grad_accum_steps

    @property
    def epoch_samples(self) -> int:
        """What the epoch should consume, computed here, independently of EpochSampler.epoch_samples: every
        draw once (the exact tail), or, with drop_last, whole optimizer steps."""
        return self.num_samples // self.step_samples * self.step_samples if self.drop_last else self.num_samples

    def on(self, batch_size: int, world_size: int, grad_accum_steps: int) -> Setup:
        return dataclasses.replace(self, batch_size=batch_size, world_size=world_size, grad_accum_steps=grad_accum_steps)

    def user_sampler(self):
        """The user's sampler whose draw is `num_samples` long, over a dataset of another size."""
        g = torch.Generator().manual_seed(self.seed)
        if self.source == "subset":  # num_samples distinct indices of a dataset twice as large
            return SubsetRandomSampler(torch.randperm(2 * self.num_samples + 1, generator=g)[: self.num_samples].tolist())
        weights = torch.rand(max(self.num_samples // 2, 1), generator=g) + 0.05  # fewer indices than draws: repeats
        return WeightedRandomSampler(weights, num_samples=self.num_samples, replacement=True)

    def sampler(self, offset: int) -> EpochSampler:
        source = UserOrder(self.user_sampler(), self.seed) if self.source else None
        sampler = EpochSampler(
            self.num_samples,
            self.seed,
            self.shuffle,
            self.micro_batch_samples,
            self.step_samples,
            self.drop_last,
            source=source,
            batch_size=self.batch_size,
        )
        sampler.set_position(self.epoch, offset)
        return sampler


def setups_on(world_sizes: st.SearchStrategy[int]) -> st.SearchStrategy[Setup]:
    return st.builds(
        Setup,
        num_samples=st.integers(1, 200),
        seed=st.integers(0, 2**32 - 1),
        shuffle=st.booleans(),
        drop_last=st.booleans(),
        epoch=st.integers(0, 3),
        batch_size=st.integers(1, 16),
        world_size=world_sizes,
        grad_accum_steps=st.integers(1, 4),
        source=st.sampled_from([None, "subset", "weighted"]),
    )


setups = setups_on(st.integers(1, 3))
# Edge cases Hypothesis might take a while to reach: a dataset smaller than one step (wrapped more than
# once), one sample more and one fewer than whole steps, and the largest step of the matrix.
EDGES = [
    Setup(1, 0, True, False, 0, 16, 3, 4),
    Setup(7, 5, True, False, 1, 2, 3, 4),
    Setup(25, 1, True, False, 2, 4, 3, 2),
    Setup(23, 1, False, True, 3, 4, 3, 2),
    Setup(200, 9, True, True, 0, 16, 3, 4),
    Setup(199, 2, True, False, 1, 3, 2, 3),
    Setup(7, 5, True, False, 1, 2, 3, 4, "weighted"),
    Setup(23, 1, False, True, 3, 4, 3, 2, "subset"),
]


def with_edges(*more):
    """@example for each edge setup, with `more` for the test's other arguments."""

    def decorate(test):
        for edge in EDGES:
            test = example(edge, *more)(test)
        return test

    return decorate


def ints(batch) -> list[int]:
    return batch.tolist() if isinstance(batch, torch.Tensor) else [int(i) for i in batch]


def wrapped(setup: Setup, length: int, order: list[int] | None = None) -> list[int]:
    """The oracle: the epoch's order, as far as `length` (it never wraps around: no padding)."""
    order = order or setup.sampler(0).order().tolist()
    assert length <= len(order), "more than the epoch's order: a draw trained twice"
    return order[:length]


def deal(setup: Setup, offset: int, fast: bool = False) -> list[list[list[int]]]:
    """Each rank's batches from `offset` on, a stand-in batch (loss weight 0) shown as []; checks promise 5
    (no empty batch, len() is what is yielded, every rank as many batches) and the weights: in every
    optimizer step each real sample's share of the gradient (its rank's weight / (its rank's samples x
    accumulation x ranks): the rank's mean, Accelerate's 1/accumulation, DDP's average) is 1 / (the step's samples)."""
    sampler = setup.sampler(offset)
    assert len(sampler) == len(list(sampler))
    batch_sampler = ExactBatches(sampler, tensors=fast)
    batches = list(batch_sampler)
    assert len(batch_sampler) == len(batches)
    assert all(len(b) > 0 for b in batches), "an empty batch"
    if fast:
        assert all(b.dtype == torch.long for b in batches if isinstance(b, torch.Tensor))
    ranks = []
    for rank in range(setup.world_size):
        shard = BatchSamplerShard(batch_sampler, setup.world_size, rank, split_batches=False, even_batches=True)
        got = [ints(b) for b in shard]
        assert len(shard) == len(got)
        assert all(len(b) > 0 for b in got), f"an empty batch on rank {rank}"
        ranks.append([b if sampler.loss_weight(k, rank) else [] for k, b in enumerate(got)])
    assert len({len(got) for got in ranks}) == 1, "ranks take different numbers of batches"
    accum, world = setup.grad_accum_steps, setup.world_size
    for first in range(0, len(ranks[0]), accum):
        step = [(k, rank) for k in range(first, min(first + accum, len(ranks[0]))) for rank in range(world)]
        in_step = sum(len(ranks[rank][k]) for k, rank in step)
        for k, rank in step:
            weight, mine = sampler.loss_weight(k, rank), len(ranks[rank][k])
            assert math.isclose(weight * in_step, accum * world * mine), (k, rank, weight, mine, in_step)
        sizes = [len(ranks[rank][step[-1][0]]) for rank in range(world)]
        some = [size for size in sizes if size]
        assert sizes == sorted(sizes, reverse=True) and max(some) - min(some) <= 1, "the last micro-batch not split evenly"
        if sum(sizes) < setup.micro_batch_samples:  # the epoch's short last micro-batch
            assert min(some) >= min(2, sum(sizes)) and (len(some) == world or sum(sizes) < 2 * world), "a rank with 1, or idle"
    return ranks


def global_micro_batches(ranks: list[list[list[int]]]) -> list[list[int]]:
    """Global micro-batch k: rank 0's k-th batch, then rank 1's, ..., as one list."""
    return [sum((batches[k] for batches in ranks), []) for k in range(len(ranks[0]))]


def optimizer_steps(micro_batches: list[list[int]], grad_accum_steps: int) -> list[list[int]]:
    """Consecutive groups of grad_accum_steps global micro-batches (Accelerate syncs at the loader's end too)."""
    return [sum(micro_batches[i : i + grad_accum_steps], []) for i in range(0, len(micro_batches), grad_accum_steps)]


def seen(micro_batches: list[list[int]]) -> list[int]:
    return sum(micro_batches, [])


def within(part: list[int], whole: list[int]) -> bool:
    """`part` holds no index more often than `whole` does (multiset inclusion)."""
    return not (Counter(part) - Counter(whole))


# ---- 1. whole optimizer steps; every index once (plus < one step of padding) or, with drop_last, never twice ----


@MATRIX
@with_edges()
@given(setups)
def test_an_epoch_is_whole_optimizer_steps(setup):
    assume(setup.epoch_samples > 0)  # drop_last with fewer samples than one step: refused at build time
    ranks = deal(setup, 0)
    assert all(len(b) == setup.batch_size for batches in ranks for b in batches[:-1])  # only the last may be short
    micro = global_micro_batches(ranks)
    steps = optimizer_steps(micro, setup.grad_accum_steps)
    whole, tail = divmod(setup.epoch_samples, setup.step_samples)
    assert [len(step) for step in steps] == [setup.step_samples] * whole + ([tail] if tail else [])
    samples = seen(micro)
    assert samples == wrapped(setup, setup.epoch_samples)  # the order itself, from offset 0
    order = setup.sampler(0).order().tolist()
    if setup.source == "subset":  # the user's subset, each index once: nothing else, nothing lost
        assert sorted(order) == sorted(setup.user_sampler().indices)
    elif setup.source is None:
        assert sorted(order) == list(range(setup.num_samples))
    if setup.drop_last:
        assert within(samples, order)  # no draw twice
        assert len(samples) == (setup.num_samples // setup.step_samples) * setup.step_samples
    else:
        assert samples == order  # every draw, once


def test_drop_last_that_drops_everything_is_refused_at_build_time(tmp_path):
    cfg = load_config(None, seed=0, batch_size=4, grad_accum_steps=3, output_dir=str(tmp_path))
    loader = DataLoader(TensorDataset(torch.zeros(23, 2)), batch_size=4, shuffle=True, drop_last=True)
    with pytest.raises(UserError, match="drop_last=True drops the whole training set"):
        _with_epoch_sampler(loader, cfg, 2)  # 23 < 4 x 2 x 3


# ---- 2. N ranks of batch b deal what 1 rank of batch N x b deals ----


@MATRIX
@with_edges(1)
@given(setups_on(st.integers(2, 3)), st.integers(0, 2**16))
def test_n_ranks_deal_what_one_rank_deals_at_the_same_global_batch(setup, pick):
    assume(setup.epoch_samples > 0)
    one_rank = setup.on(setup.micro_batch_samples, 1, setup.grad_accum_steps)
    boundaries = setup.epoch_samples // setup.step_samples
    offset = pick % (boundaries + 1) * setup.step_samples  # and from a step boundary
    for start in sorted({0, offset}):
        micro = global_micro_batches(deal(setup, start))
        single = global_micro_batches(deal(one_rank, start))
        assert micro == single  # global micro-batch k of N ranks, in rank order, is the one rank's batch k
        ours, theirs = optimizer_steps(micro, setup.grad_accum_steps), optimizer_steps(single, setup.grad_accum_steps)
        assert [Counter(s) for s in ours] == [Counter(s) for s in theirs]
        assert ours == theirs


# ---- 3. the fast path deals exactly the regular path's batches to every rank ----


@MATRIX
@with_edges(5)
@given(setups, st.integers(0, 2**16))
def test_fast_path_deals_the_regular_paths_batches(setup, pick):
    # Any offset, not only those dist_train resumes from: a misaligned one takes the list branch.
    offset = pick % (setup.epoch_samples + setup.step_samples + 1)
    assert deal(setup, offset, fast=True) == deal(setup, offset, fast=False)


# ---- 4. a resume at any optimizer-step boundary, on the same or another setup, continues the epoch ----


def resize_choices(offset: int) -> list[tuple[int, int]]:
    """(batch_size, world_size) whose global micro-batch divides `offset`: the ones dist_train resumes on."""
    return [(b, w) for w in range(1, 4) for b in range(1, 17) if offset % (b * w) == 0]


@MATRIX
@with_edges(3, True)
@given(setups, st.integers(0, 2**16), st.booleans())
def test_a_resume_at_every_step_boundary_continues_the_epoch(setup, salt, fast):
    assume(setup.epoch_samples > 0)
    uninterrupted = global_micro_batches(deal(setup, 0))
    whole = seen(uninterrupted)
    boundaries = setup.epoch_samples // setup.step_samples
    order = setup.sampler(0).order().tolist()
    # k == boundaries: resumed at the end of the epoch's data, as an older checkpoint could be.
    for k in range(boundaries + 1):
        offset = k * setup.step_samples
        before = seen(uninterrupted[: k * setup.grad_accum_steps])
        assert before == whole[:offset]
        choices = resize_choices(offset)  # always holds this run's own (batch_size, world_size)
        batch_size, world_size = choices[(salt + 7 * k) % len(choices)]
        other = setup.on(batch_size, world_size, 1 + (salt + k) % 4)
        for resumed in (setup, other):
            if resumed.epoch_samples == 0:
                continue  # drop_last and a step larger than the dataset: refused at build time
            micro = global_micro_batches(deal(resumed, offset, fast))
            after = seen(micro)
            combined = before + after
            # The resumed run continues the same order: what is seen is a stretch of W from its start.
            assert combined == wrapped(setup, len(combined), order)
            assert setup.drop_last or combined == order
            steps = optimizer_steps(micro, resumed.grad_accum_steps)
            assert all(len(step) == resumed.step_samples for step in steps[:-1])
            if resumed.step_samples == setup.step_samples:  # the same size of step: bitwise the same epoch
                assert combined == whole
                assert steps == optimizer_steps(uninterrupted, setup.grad_accum_steps)[k:]
            if setup.drop_last:
                assert within(combined, order)  # none seen twice
                assert setup.num_samples - len(combined) < max(setup.step_samples, resumed.step_samples)
            else:
                # No draw lost and none twice: what the resumed run still had to deal, it dealt, once.
                assert Counter(order) - Counter(before) == Counter(after)


BASE_CONFIG = load_config(None)


@MATRIX
@with_edges(11, 2)
@given(setups, st.integers(0, 2**16), st.integers(0, 2))
def test_a_resume_with_another_step_plans_every_remaining_epoch(setup, salt, later_epochs):
    """The run's length from where it stands (data/run_length.py), after a resume at a step boundary on
    another (batch, world size, accumulation): the steps taken, then exactly the steps dealt for the rest of
    the epoch and for each later epoch at the new step, each of which deals every draw (issue 19: the
    length was epochs x steps per epoch at the new step, and a larger step ended the run epochs early)."""
    assume(setup.epoch_samples > 0)
    boundaries = setup.epoch_samples // setup.step_samples
    k = salt % (boundaries + 1)
    offset = k * setup.step_samples
    choices = resize_choices(offset)
    batch_size, world_size = choices[salt % len(choices)]
    resumed = setup.on(batch_size, world_size, 1 + (salt // 7) % 4)
    assume(resumed.epoch_samples > 0)  # drop_last and a step larger than the dataset: refused at build time
    cfg = dataclasses.replace(
        BASE_CONFIG,
        seed=setup.seed,
        batch_size=batch_size,
        grad_accum_steps=resumed.grad_accum_steps,
        epochs=setup.epoch + 1 + later_epochs,
    )
    taken = 3 * setup.epoch + k  # whatever the earlier epochs took, at whatever step size
    state = TrainState(epoch=setup.epoch, optimizer_step=taken, samples_consumed=offset)
    dealt = len(optimizer_steps(global_micro_batches(deal(resumed, offset)), resumed.grad_accum_steps))
    order = setup.sampler(0).order().tolist()
    for epoch in range(setup.epoch + 1, cfg.epochs):
        later = dataclasses.replace(resumed, epoch=epoch)
        micro = global_micro_batches(deal(later, 0))
        dealt += len(optimizer_steps(micro, resumed.grad_accum_steps))
        if not setup.drop_last and setup.source != "weighted":  # a weighted draw differs per epoch; its length does not
            assert within(later.sampler(0).order().tolist(), seen(micro))
        assert len(seen(micro)) == later.epoch_samples
    assert planned_steps(cfg, resumed.sampler(offset), None, state) == taken + dealt
    assert order == setup.sampler(0).order().tolist()  # planning moved no sampler


def test_after_a_resize_the_last_step_holds_the_rest_once():
    setup = Setup(num_samples=2, seed=0, shuffle=False, drop_last=False, epoch=0, batch_size=1, world_size=1, grad_accum_steps=1)
    resumed = setup.on(1, 1, 2)
    steps = optimizer_steps(global_micro_batches(deal(resumed, 1)), resumed.grad_accum_steps)
    assert steps == [[1]]  # the one sample left, alone, at its full weight


# ---- regression: a checkpoint at the very end of an epoch's data deals nothing, not an empty batch ----


@pytest.mark.parametrize(
    "setup",
    [
        Setup(101, 7, True, False, 1, 8, 1, 1),
        Setup(101, 7, True, True, 2, 8, 1, 1),
        Setup(37, 3, True, False, 0, 4, 2, 3),
        Setup(5, 1, False, False, 3, 4, 3, 2),
        Setup(200, 9, True, True, 0, 16, 3, 4),
    ],
    ids=str,
)
@pytest.mark.parametrize("past", [0, 1], ids=["at_end", "past_end"])  # past: the end of a smaller resumed epoch
def test_resume_at_the_end_of_the_epoch_yields_no_batch(setup, past):
    offset = setup.epoch_samples + past * setup.micro_batch_samples
    sampler = setup.sampler(offset)
    assert len(sampler) == 0 and list(sampler) == []
    for batch_sampler in (ExactBatches(sampler, True), ExactBatches(sampler, False)):
        assert list(batch_sampler) == [] and len(batch_sampler) == 0
        for rank in range(setup.world_size):
            shard = BatchSamplerShard(batch_sampler, setup.world_size, rank, split_batches=False, even_batches=True)
            assert list(shard) == [] and len(shard) == 0


@pytest.mark.parametrize("path", ["fast", "regular"])
def test_resume_at_the_end_of_the_epoch_through_the_built_loader(tmp_path, path):
    """The loaders `build_loaders` makes (one process), set where an older checkpoint stopped."""

    class PerSample(TensorDataset):  # its own __getitem__: the regular path
        def __getitem__(self, index):
            return super().__getitem__(index)

    dataset = (TensorDataset if path == "fast" else PerSample)(torch.arange(101.0).unsqueeze(1), torch.arange(101))
    cfg = load_config(None, seed=7, batch_size=8, grad_accum_steps=2, output_dir=str(tmp_path))
    loader = _with_epoch_sampler(DataLoader(dataset, batch_size=8, shuffle=True), cfg, 1)
    sampler = epoch_sampler(loader)
    assert sampler.epoch_samples == 101  # every sample once: 6 steps of 16 and one of 5
    sampler.set_position(1, sampler.epoch_samples)
    assert list(loader) == [] and len(loader) == 0


# ---- 5. the batch_sampler path: the user's batches, variable sizes included, dealt whole ----


class Bucketed(torch.utils.data.Sampler):
    """A user's batch sampler: a permutation cut into batches of random sizes, drawn from `self.generator`."""

    def __init__(self, num_samples: int, max_batch: int):
        self.num_samples, self.max_batch, self.generator = num_samples, max_batch, None

    def __iter__(self):
        order, start = torch.randperm(self.num_samples, generator=self.generator).tolist(), 0
        while start < self.num_samples:
            size = int(torch.randint(1, self.max_batch + 1, (1,), generator=self.generator))
            yield order[start : start + size]
            start += size


def deal_batches(num_samples, max_batch, seed, epoch, world_size, grad_accum_steps, offset, unit=4) -> list[list[int]]:
    """The batches the ranks train on from `offset` (in batches), in global order (rank 0's k-th, rank 1's k-th, ...),
    a stand-in (loss weight 0) shown as []; checks the weights: in every optimizer step each real sample's share
    of the gradient is 1 / (the step's samples), as in `deal`."""
    source = UserOrder(Bucketed(num_samples, max_batch), seed, batches=True)
    sampler = EpochSampler(0, seed, False, world_size, world_size * grad_accum_steps, source=source, unit_samples=unit)
    sampler.set_position(epoch, offset * unit)  # the loop counts `unit` (its batch_size) samples per batch
    ranks = []
    for rank in range(world_size):
        shard = BatchSamplerShard(UserBatches(sampler, source), world_size, rank, split_batches=False, even_batches=True)
        got = [ints(b) for b in shard]
        assert len(got) == len(shard) and all(got), "an empty batch, or len() is not what is yielded"
        ranks.append([b if sampler.loss_weight(k, rank) else [] for k, b in enumerate(got)])
    assert len({len(got) for got in ranks}) == 1, "ranks take different numbers of batches"
    dealt = [ranks[rank][k] for k in range(len(ranks[0])) for rank in range(world_size)]
    step = world_size * grad_accum_steps
    for first in range(0, len(dealt), step):
        in_step = sum(len(b) for b in dealt[first : first + step])
        for k in range(first, min(first + step, len(dealt))):
            weight = sampler.loss_weight(k // world_size, k % world_size)
            assert math.isclose(weight * in_step, step * len(dealt[k])), (k, weight, in_step)
    stand_ins = [k for k, b in enumerate(dealt) if not b]
    assert stand_ins == list(range(len(dealt) - len(stand_ins), len(dealt))) and len(stand_ins) < world_size, "a stand-in before the end"
    return dealt[: len(dealt) - len(stand_ins)]


@MATRIX
@example(1, 9, 0, 0, 3, 4, 0, 1)  # a single batch: one real, two stand-ins
@given(
    st.integers(1, 120),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
    st.integers(0, 3),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(0, 2**16),
    st.integers(1, 3),
)
def test_the_batch_sampler_path_deals_the_users_batches_whole(
    num_samples, max_batch, seed, epoch, world_size, grad_accum_steps, pick, other_world_size
):
    draw = UserOrder(Bucketed(num_samples, max_batch), seed, batches=True).draw(epoch)
    assert sorted(sum(draw, [])) == list(range(num_samples))  # the user's own batches, as it drew them
    step = world_size * grad_accum_steps
    steps = math.ceil(len(draw) / step)
    whole = deal_batches(num_samples, max_batch, seed, epoch, world_size, grad_accum_steps, 0)
    # Global micro-batch k is draw batches kW .. kW+W-1, whole; every batch once, none twice (the exact tail).
    assert whole == draw
    # A resume at a step boundary, on this world size and on another whose global micro-batch divides it.
    offset = pick % (steps + 1) * step
    for resumed_world, resumed_accum in {(world_size, grad_accum_steps), (other_world_size, 1 + pick % 4)}:
        if offset % resumed_world or offset > len(draw):
            continue  # refused by the checkpoint's position check; past the end: the epoch is over
        combined = whole[:offset] + deal_batches(num_samples, max_batch, seed, epoch, resumed_world, resumed_accum, offset)
        assert combined == draw


# ---- 6. a stream dealt from rank 0: every sample once, each step its samples' exact mean ----


class _Listed(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@MATRIX
@example([5, 5, 5, 2], 3, 1)  # the epoch's last batch of 2 over 3 ranks: 2, then two stand-ins
@example([4, 3, 4, 2, 4], 2, 2)  # short batches inside the stream (each DataLoader worker's last one)
@example([8] * 70, 64, 2)  # many ranks: the counts' shape does not grow with them
@given(st.lists(st.integers(1, 6), min_size=1, max_size=24), st.integers(1, 3), st.integers(1, 3))
def test_a_stream_is_dealt_each_sample_once_and_weighted_to_each_steps_mean(sizes, world_size, grad_accum_steps):
    """The user's batches (sizes drawn, ids in order) through `StreamBatches._dealt`, then Accelerate's dispatcher
    (each global micro-batch: `world_size` parts concatenated and sliced evenly), then each rank's `weighed`: the
    real rows are every id once, in order; in every optimizer step each real sample's share of the gradient is
    1 / (the step's samples); full batches are dealt whole with weight exactly 1."""
    ids = iter(range(sum(sizes)))
    batches = [torch.tensor([next(ids) for _ in range(size)]) for size in sizes]
    stream = StreamBatches(DataLoader(_Listed(batches), batch_size=None), 0, 6, world_size, 10**6, accumulation=grad_accum_steps)
    items = [item for _, item, _ in stream._dealt((i + 1, batch, None) for i, batch in enumerate(batches))]
    assert len(items) % world_size == 0, "a global micro-batch without a part for every rank"
    micro_batches = []
    for first in range(0, len(items), world_size):
        parts = items[first : first + world_size]
        assert len({part.counts.shape for part in parts}) == 1, "parts the dispatcher cannot concatenate and slice evenly"
        micro_batches.append([stream.weighed(part, rank) for rank, part in enumerate(parts)])
    trained = [batch.tolist() for ranks in micro_batches for batch, weight in ranks if weight]
    assert sum(trained, []) == list(range(sum(sizes)))
    for first in range(0, len(micro_batches), grad_accum_steps):
        step = [pair for ranks in micro_batches[first : first + grad_accum_steps] for pair in ranks]
        samples = sum(len(batch) for batch, weight in step if weight)
        for batch, weight in step:
            if weight:  # the rank's mean loss x weight, / accumulation (Accelerate), / ranks (DDP)
                assert math.isclose(weight / (len(batch) * grad_accum_steps * world_size), 1 / samples)
        if all(weight for _, weight in step) and len({len(b) for b, _ in step}) == 1 and len(step) == world_size * grad_accum_steps:
            assert all(weight == 1.0 for _, weight in step)  # a full step: exactly 1, no arithmetic on the loss
