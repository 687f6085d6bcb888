"""The in-memory fast path (dist_train/data/fastdata.py) yields exactly the batches of the regular path."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from dist_train.config import load_config
from dist_train.data.epoch import EpochSampler, ExactBatches
from dist_train.data.fastdata import TensorBatches, can_use_fast_path
from dist_train.data.loaders import _with_epoch_sampler, epoch_sampler
from helpers import load_weights, run_clis, seed_project_args, write_seed_project


class PerSampleDataset(TensorDataset):
    """Same tensors, but a __getitem__ of its own: dist_train must take the regular path."""

    def __getitem__(self, index):
        return super().__getitem__(index)


def _tensors(num_samples: int = 101):
    g = torch.Generator().manual_seed(1)
    return torch.randn(num_samples, 3, generator=g), torch.randint(0, 5, (num_samples,), generator=g)


def test_fast_path_is_chosen_only_where_it_is_exact():
    x, y = _tensors()
    assert can_use_fast_path(DataLoader(TensorDataset(x, y), batch_size=8))
    assert not can_use_fast_path(DataLoader(PerSampleDataset(x, y), batch_size=8))
    assert not can_use_fast_path(DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=lambda b: b))
    assert not can_use_fast_path(DataLoader(TensorDataset(x, y), batch_size=8, num_workers=1))

    class OptedIn(PerSampleDataset):
        batched_indexing_is_exact = True

    assert can_use_fast_path(DataLoader(OptedIn(x, y), batch_size=8))


def test_same_batches_as_the_regular_path_across_epochs_and_a_mid_epoch_start(tmp_path):
    x, y = _tensors()
    cfg = load_config(None, seed=7, batch_size=8, output_dir=str(tmp_path))
    fast = _with_epoch_sampler(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), cfg, 1)
    regular = _with_epoch_sampler(DataLoader(PerSampleDataset(x, y), batch_size=8, shuffle=True), cfg, 1)
    assert isinstance(fast.batch_sampler, ExactBatches) and isinstance(fast.dataset, TensorBatches)
    assert not isinstance(regular.dataset, TensorBatches)
    accelerator = Accelerator(cpu=True)
    fast, regular = accelerator.prepare(fast, regular)
    for epoch, samples_consumed in [(0, 0), (1, 0), (1, 48), (2, 96)]:
        for loader in (fast, regular):
            epoch_sampler(loader).set_position(epoch, samples_consumed)
        fast_batches, regular_batches = list(fast), list(regular)
        assert len(fast_batches) == len(regular_batches) == len(fast) == math.ceil((101 - samples_consumed) / 8)  # no padding
        assert sum(len(fy) for _, fy in fast_batches) == 101 - samples_consumed
        for (fx, fy), (rx, ry) in zip(fast_batches, regular_batches):
            assert torch.equal(fx, rx) and torch.equal(fy, ry) and fx.dtype == rx.dtype


@pytest.mark.parametrize(
    "loader_args",
    [
        lambda d: {"batch_size": 8, "sampler": WeightedRandomSampler(torch.linspace(0.1, 1, len(d)), num_samples=150)},
        lambda d: {"batch_size": 8, "sampler": SubsetRandomSampler(range(0, len(d), 4))},
        lambda d: {"batch_sampler": BatchSampler(RandomSampler(d, replacement=True), 7, drop_last=False)},
    ],
    ids=["weighted", "subset", "batch_sampler"],
)
def test_a_users_sampler_gives_the_same_batches_on_both_paths(tmp_path, loader_args):
    """The user's own sampler (or batch_sampler) drawn per epoch: the fast path cuts the very same batches."""
    x, y = _tensors()
    cfg = load_config(None, seed=7, batch_size=8, output_dir=str(tmp_path))
    fast = _with_epoch_sampler(DataLoader(TensorDataset(x, y), **loader_args(x)), cfg, 1)
    regular = _with_epoch_sampler(DataLoader(PerSampleDataset(x, y), **loader_args(x)), cfg, 1)
    assert isinstance(fast.dataset, TensorBatches) and not isinstance(regular.dataset, TensorBatches)
    fast, regular = Accelerator(cpu=True).prepare(fast, regular)
    for epoch, samples_consumed in [(0, 0), (1, 0), (1, 16)]:
        for loader in (fast, regular):
            epoch_sampler(loader).set_position(epoch, samples_consumed)
        fast_batches, regular_batches = list(fast), list(regular)
        assert len(fast_batches) == len(regular_batches) == len(fast) > 0
        for (fx, fy), (rx, ry) in zip(fast_batches, regular_batches):
            assert torch.equal(fx, rx) and torch.equal(fy, ry)


@pytest.mark.parametrize("samples_consumed", [0, 16, 12])  # 12: a resume from a run with another global batch
def test_accelerate_shards_the_same_indices_to_each_rank(samples_consumed):
    """Accelerate's BatchSamplerShard (2 ranks) over both paths' ExactBatches: the same batches per rank, the
    last global micro-batch split evenly, every id of the epoch once."""
    world_size, batch_size = 2, 4
    sampler = EpochSampler(37, seed=3, shuffle=True, micro_batch_samples=world_size * batch_size, batch_size=batch_size)
    sampler.set_position(1, samples_consumed)
    ranks = []
    for rank in range(world_size):
        fast = BatchSamplerShard(ExactBatches(sampler, tensors=True), world_size, rank, even_batches=True)
        regular = BatchSamplerShard(ExactBatches(sampler, tensors=False), world_size, rank, even_batches=True)
        fast_batches = [b.tolist() for b in fast]
        assert fast_batches == list(regular) and len(fast_batches) == len(fast) > 0
        ranks.append([b for k, b in enumerate(fast_batches) if sampler.loss_weight(k, rank)])  # stand-ins out
    assert sorted(sum(ranks[0] + ranks[1], [])) == sorted(sampler.indices().tolist())
    tail = (37 - samples_consumed) % 8  # 5 split 3 + 2; at 12 consumed, 1: rank 1 runs a stand-in
    assert [len(ranks[0][-1]), len(ranks[1][-1]) if tail > 1 else 0] == [tail - tail // 2, tail // 2]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = write_seed_project(tmp_path_factory.mktemp("seed"), num_train=200, num_val=37)
    # The same data as the seed project's per-sample Dataset, handed over as a TensorDataset.
    (folder / "tensor_loader.py").write_text(
        textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def get_dataloader(cfg, train):
            data = torch.load(cfg.data_path, weights_only=True)
            split = "train" if train else "val"
            dataset = TensorDataset(data[split + "_x"], data[split + "_y"])
            return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train)
    """)
    )
    return folder


def test_two_ranks_train_bitwise_alike_on_both_paths(project, tmp_path):
    """Real gloo ranks: Accelerate deals the fast path's batches exactly as the regular path's."""
    common = ("epochs=2", "batch_size=8", "optimizer=sgd", "lr=0.1", "momentum=0.9", "seed=4")
    fast_args = [a for a in seed_project_args(project, tmp_path / "fast", *common) if not a.startswith("data=")]
    run_clis(
        {"args": seed_project_args(project, tmp_path / "regular", *common), "nproc": 2},
        {"args": [*fast_args, f"data={project / 'tensor_loader.py'}:get_dataloader"], "nproc": 2},
    )
    regular, fast = load_weights(tmp_path / "regular"), load_weights(tmp_path / "fast")
    assert regular.keys() == fast.keys()
    for key in regular:
        assert torch.equal(fast[key], regular[key]), key
