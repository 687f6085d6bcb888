"""The user's own sampler or batch_sampler is honoured: its distribution, its subset, its batches, on 1
and N ranks, across a SIGKILL and resume (dist_train/data/loaders.py, dist_train/data/user_order.py).

The real-process runs train a user project whose model logs the ids it trains on (the dataset's last
column; one file per rank, one line per forward) and can SIGKILL itself at a given forward. The model
also scales its input by one draw of the global torch RNG per training forward (alike on every rank:
same seed): a sampler materialised from that RNG without restoring it would move every later draw,
and a resumed run would no longer be bitwise the uninterrupted one.
"""

from __future__ import annotations

import math
import random
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from dist_train.config import load_config
from dist_train.data.epoch import UserBatches
from dist_train.data.loaders import _with_epoch_sampler, epoch_sampler
from dist_train.data.user_order import UserOrder, epoch_seed
from dist_train.errors import UserError
from helpers import (
    assert_weights_equal,
    ids_model,
    import_file,
    load_weights,
    read_ids,
    run_cli,
    run_clis,
    sample_cases,
    sampled_params,
    write_seed_project,
)

NUM_TRAIN = 200

SAMPLERS = '''
import os, time
import torch
from torch.utils.data import Sampler

class EvenIds(Sampler):
    """A custom sampler: the even ids, shuffled by `self.generator` (dist_train seeds it per epoch)."""

    def __init__(self, n):
        self.n, self.generator = n, None

    def __iter__(self):
        evens = torch.arange(0, self.n, 2)
        return iter(evens[torch.randperm(len(evens), generator=self.generator)].tolist())

    def __len__(self):
        return (self.n + 1) // 2

class Unseeded(EvenIds):
    """Draws from a generator of its own, seeded from the clock: never the same order twice."""

    def __init__(self, n):
        super().__init__(n)
        self.own = torch.Generator().manual_seed(time.time_ns() % 2**62)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.own).tolist())

class PerRank(EvenIds):
    """The same order every time in one process, but each rank its own (seeded from RANK)."""

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))).tolist())

class Buckets(Sampler):
    """A custom batch_sampler that groups like samples, as one grouping by length does: the ids bucketed by
    id % 3, shuffled within each bucket by `self.generator` and cut into batches of max_batch (the last of
    a bucket shorter), the batches shuffled. Sizes vary; their number does not."""

    def __init__(self, n, max_batch):
        self.n, self.max_batch, self.generator = n, max_batch, None

    def __iter__(self):
        batches = []
        for bucket in range(3):
            ids = torch.arange(bucket, self.n, 3)
            ids = ids[torch.randperm(len(ids), generator=self.generator)].tolist()
            batches += [ids[i : i + self.max_batch] for i in range(0, len(ids), self.max_batch)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()])

class RandomSizes(Buckets):
    """A batch_sampler of random sizes: how many batches an epoch has varies."""

    def __iter__(self):
        order, start = torch.randperm(self.n, generator=self.generator).tolist(), 0
        while start < self.n:
            size = int(torch.randint(1, self.max_batch + 1, (1,), generator=self.generator))
            yield order[start : start + size]
            start += size
'''

DATALOADER = """
import torch
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler
from dataset import MyDataset
from samplers import Buckets, EvenIds, PerRank, Unseeded

def get_dataloader(cfg, train):
    dataset = MyDataset(cfg.data_path, train=train)
    if getattr(cfg, "fast", False):  # the same samples as a TensorDataset: the in-memory fast path
        ids = torch.arange(len(dataset), dtype=torch.float32).unsqueeze(1)
        dataset = TensorDataset(torch.cat([dataset.x, ids], dim=1), dataset.y)
    if not train:
        return DataLoader(dataset, batch_size=cfg.batch_size)
    n = len(dataset)
    if cfg.sampler == "buckets":
        return DataLoader(dataset, batch_sampler=Buckets(n, cfg.batch_size))
    if cfg.sampler == "subset":
        sampler = SubsetRandomSampler(list(range(3, n, 10)))  # 10% of the ids
    elif cfg.sampler == "weighted":  # class 0 four times as likely as any other sample
        sampler = WeightedRandomSampler(torch.where(dataset.y == 0, 4.0, 1.0), num_samples=cfg.draws)
    else:
        sampler = {"even": EvenIds, "unseeded": Unseeded, "per_rank": PerRank}[cfg.sampler](n)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The seed project with ids; its model records them, can SIGKILL itself and draws from the global torch
    RNG once per training forward (a sampler materialised from that RNG must restore it for a bitwise resume)."""
    files = {"model.py": ids_model(rng_scale=True), "samplers.py": textwrap.dedent(SAMPLERS), "dataloader.py": DATALOADER}
    return write_seed_project(tmp_path_factory.mktemp("sampler_seed"), num_train=NUM_TRAIN, num_val=40, ids=True, files=files)


def _args(project: Path, out: Path, sampler: str, *extra: str, **data_args) -> list[str]:
    data = ", ".join(f"{k}: {v}" for k, v in {"data_path": project / "data.pt", "sampler": sampler, **data_args}.items())
    return [
        f"model={project / 'model.py'}:MyModel",
        f"data={project / 'dataloader.py'}:get_dataloader",
        f"data_args={{{data}}}",
        f"output_dir={out}",
        "progress=false",
        "plot=false",
        "resume=auto",
        *extra,
    ]


def _global(ids_dir: Path) -> list[list[int]]:
    """Global micro-batches: rank 0's k-th batch, then rank 1's, ... (how Accelerate deals them)."""
    ranks = read_ids(ids_dir)
    return [sum((ranks[r][k] for r in sorted(ranks)), []) for k in range(len(ranks[0]))]


def _project_module(project: Path, name: str):
    sys.path.insert(0, str(project))  # conftest restores sys.path and forgets the project's modules
    return import_file(project / f"{name}.py", f"{name}_{id(project)}")


def _class0(project: Path) -> set[int]:
    y = torch.load(project / "data.pt", weights_only=True)["train_y"]
    return set(torch.nonzero(y == 0).flatten().tolist())


# ---- in process: how a user's sampler becomes the epoch's order ----------------------------------------


def _dataset(n: int = 101) -> TensorDataset:
    return TensorDataset(torch.arange(float(n)).unsqueeze(1), torch.arange(n))


def _cfg(tmp_path, **overrides):
    return load_config(None, **{"seed": 7, "batch_size": 8, "output_dir": str(tmp_path), **overrides})


def _epoch_ids(loader, epoch: int) -> list[int]:
    epoch_sampler(loader).set_position(epoch, 0)
    return torch.cat([batch[1] for batch in loader]).tolist()


def test_shuffle_true_keeps_its_permutation_which_is_the_random_samplers_own_draw(tmp_path):
    """shuffle=True is unchanged (randperm of epoch_seed), and it is the general rule applied to a RandomSampler."""
    loader = _with_epoch_sampler(DataLoader(_dataset(), batch_size=8, shuffle=True), _cfg(tmp_path), 1)
    sampler = epoch_sampler(loader)
    assert sampler.source is None  # the plain shuffle draws its permutation itself, without a Python list
    for epoch in range(3):
        sampler.set_position(epoch, 0)
        permutation = torch.randperm(101, generator=torch.Generator().manual_seed(7 * 1_000_003 + epoch))
        assert torch.equal(sampler.order(), permutation)
        assert torch.equal(UserOrder(RandomSampler(_dataset()), 7).order(epoch), permutation)
    assert epoch_sampler(_with_epoch_sampler(DataLoader(_dataset(), batch_size=8), _cfg(tmp_path), 1)).source is None


@pytest.mark.parametrize(
    "make",
    [
        lambda d: WeightedRandomSampler(torch.linspace(0.1, 1, len(d)), num_samples=300),
        lambda d: SubsetRandomSampler(range(0, len(d), 3)),
        lambda d: RandomSampler(d, replacement=True),
        lambda d: RandomSampler(d, num_samples=250),
        lambda d: SequentialSampler(range(40)),
    ],
    ids=["weighted", "subset", "replacement", "num_samples", "sequential_subset"],
)
def test_a_user_sampler_is_its_own_draw_seeded_by_seed_and_epoch(tmp_path, make):
    dataset = _dataset()
    user = make(dataset)
    loader = _with_epoch_sampler(DataLoader(dataset, batch_size=10, sampler=user), _cfg(tmp_path), 1)
    expected = {}
    for epoch in range(2):
        if hasattr(user, "generator"):
            user.generator = torch.Generator().manual_seed(epoch_seed(7, epoch))
        expected[epoch] = [int(i) for i in user]
        got = _epoch_ids(loader, epoch)
        assert got == expected[epoch]  # each draw once, no padding: the last batch may be short
        assert len(loader) == math.ceil(len(got) / 10)
    if not isinstance(user, SequentialSampler):
        assert expected[0] != expected[1]  # another epoch draws anew
        other = _with_epoch_sampler(DataLoader(dataset, batch_size=10, sampler=make(dataset)), _cfg(tmp_path, seed=8), 1)
        assert _epoch_ids(other, 0)[: len(expected[0])] != expected[0]  # another seed too


def test_materialising_moves_no_rng_and_restores_the_users_generator(tmp_path):
    numpy = pytest.importorskip("numpy")

    class Everything(Sampler):
        """Draws from every global RNG: reproducible only because dist_train seeds them all."""

        def __iter__(self):
            order = list(range(50))
            random.shuffle(order)
            order = [order[i] for i in torch.randperm(50).tolist()]
            return iter(numpy.random.permutation(order).tolist())

    mine = torch.Generator().manual_seed(123)
    before = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy(), mine.get_state())
    weighted = WeightedRandomSampler(torch.ones(101), 64, generator=mine)
    for user in (Everything(), weighted):
        loader = _with_epoch_sampler(DataLoader(_dataset(), batch_size=8, sampler=user), _cfg(tmp_path), 1)
        assert _epoch_ids(loader, 1) == _epoch_ids(loader, 1)
    assert weighted.generator is mine
    after = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1], mine.get_state())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all() and torch.equal(before[3], after[3])


def test_a_set_epoch_sampler_is_told_the_epoch(tmp_path):
    class Rotating(Sampler):
        def __init__(self):
            self.epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter([(i + self.epoch) % 101 for i in range(101)])

    loader = _with_epoch_sampler(DataLoader(_dataset(), batch_size=8, sampler=Rotating()), _cfg(tmp_path), 1)
    assert _epoch_ids(loader, 3)[:5] == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    "loader, message",
    [
        (lambda d: DataLoader(d, batch_size=8, sampler=DistributedSampler(d, num_replicas=2, rank=0)), "DistributedSampler"),
        (lambda d: DataLoader(d, batch_size=None), "batch_size=None"),
        (lambda d: DataLoader(d, batch_size=8, sampler=BatchSampler(RandomSampler(d), 8, False)), "pass it as batch_sampler="),
        (lambda d: DataLoader(d, batch_size=8, sampler=[0.5, 1.5]), "float items, not integer dataset indices"),
        (lambda d: DataLoader(d, batch_size=8, sampler=SubsetRandomSampler([])), "yields nothing for epoch 0"),
        (lambda d: DataLoader(d, batch_sampler=[[1, 2], []]), "must be a non-empty list of integer indices"),
    ],
    ids=["distributed", "no_batching", "batches_as_sampler", "floats", "empty", "empty_batch"],
)
def test_what_cannot_be_honoured_is_refused_at_start(tmp_path, loader, message):
    with pytest.raises(UserError, match=message):
        _with_epoch_sampler(loader(_dataset()), _cfg(tmp_path), 1)


def test_a_batch_sampler_is_dealt_in_whole_batches_on_both_paths(tmp_path, project):
    """Variable-size batches, dealt whole; position = samples_consumed // batch_size batches (the loop's count)."""
    buckets = _project_module(project, "samplers").Buckets
    draw = UserOrder(buckets(101, 8), 7, batches=True).draw(2)
    assert len(draw) == 15 and len({len(b) for b in draw}) > 1  # 3 buckets of 5 batches, of 8 and fewer

    class PerSample(TensorDataset):
        def __getitem__(self, index):
            return super().__getitem__(index)

    for dataset in (_dataset(), PerSample(*_dataset().tensors)):  # fast path, regular path
        cfg = _cfg(tmp_path, grad_accum_steps=4)
        loader = _with_epoch_sampler(DataLoader(dataset, batch_sampler=buckets(101, 8)), cfg, 1)
        assert isinstance(loader.batch_sampler, UserBatches)
        sampler = epoch_sampler(loader)
        sampler.set_position(2, 8 * 8)  # 2 steps of 4 batches in (the loop counts batch_size=8 per batch)
        got = [batch[1].tolist() for batch in loader]
        assert got == draw[8:] and len(loader) == 7  # the rest of the draw, once: the last step holds 3 batches
    with pytest.raises(UserError, match="not a whole number of batch_sampler batches at batch_size 8"):
        sampler.set_position(2, 12)


def test_epochs_of_another_length_need_max_steps(tmp_path, project):
    """With `epochs` as the budget, a draw whose length changes is refused: at start, or when it is drawn."""

    class Growing(Sampler):
        def __init__(self, from_epoch):
            self.from_epoch, self.epoch = from_epoch, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(range(50 + (self.epoch >= self.from_epoch)))

    with pytest.raises(UserError, match="draws 50 indices for epoch 0 but 51 for epoch 1; .* or set max_steps"):
        _with_epoch_sampler(DataLoader(_dataset(), batch_size=5, sampler=Growing(1)), _cfg(tmp_path), 1)
    loader = _with_epoch_sampler(DataLoader(_dataset(), batch_size=5, sampler=Growing(3)), _cfg(tmp_path), 1)
    assert len(_epoch_ids(loader, 2)) == 50
    with pytest.raises(UserError, match="for epoch 0 but 51 for epoch 3"):
        _epoch_ids(loader, 3)
    loader = _with_epoch_sampler(DataLoader(_dataset(), batch_size=5, sampler=Growing(1)), _cfg(tmp_path, max_steps=30), 1)
    assert len(_epoch_ids(loader, 1)) == 51  # each draw once
    random_sizes = _project_module(project, "samplers").RandomSizes
    with pytest.raises(UserError, match="batch_sampler RandomSizes draws .* batches for epoch 0 but"):
        _with_epoch_sampler(DataLoader(_dataset(), batch_sampler=random_sizes(101, 8)), _cfg(tmp_path), 1)


# ---- real processes ------------------------------------------------------------------------------------

WEIGHTED = ("epochs=2", "grad_accum_steps=2", "checkpoint_every=4", "seed=11", "optimizer=sgd", "lr=0.05", "momentum=0.9")
DRAWS = 480  # per epoch: 30 optimizer steps of 16 samples
BATCH = {1: "batch_size=8", 2: "batch_size=4"}  # the same global batch, 16 per optimizer step
KILL_AT_FORWARD = 81  # rank 0's 81st forward (2 per step on 1 and 2 ranks): inside step 41; last save step 40


@pytest.fixture(scope="module")
def weighted(project, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted WeightedRandomSampler runs on 1 and 2 ranks (ids logged to run/ids)."""
    runs = {nproc: tmp_path_factory.mktemp(f"weighted{nproc}") / "run" for nproc in (1, 2)}
    for out in runs.values():
        (out.parent / "ids").mkdir()
    run_clis(
        *(
            {
                "args": _args(project, out, "weighted", *WEIGHTED, BATCH[nproc], draws=DRAWS),
                "nproc": nproc,
                "env": {"IDS_DIR": str(out.parent / "ids")},
            }
            for nproc, out in runs.items()
        )
    )
    return runs


def test_weighted_sampler_draws_by_its_weights_on_two_ranks(project, weighted):
    micro = _global(weighted[2].parent / "ids")
    per_epoch = DRAWS // 8  # global micro-batches of 2 ranks x 4
    epochs = [sum(micro[:per_epoch], []), sum(micro[per_epoch:], [])]
    assert len(micro) == 2 * per_epoch and [len(e) for e in epochs] == [DRAWS, DRAWS]
    class0 = _class0(project)
    p = 4 * len(class0) / (4 * len(class0) + NUM_TRAIN - len(class0))  # weight 4 for class 0, 1 for the rest
    draws = epochs[0] + epochs[1]
    share = sum(i in class0 for i in draws) / len(draws)
    # Binomial: std sqrt(p(1-p)/n) ~ 0.016 for 960 draws; unweighted would give len(class0)/200.
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / len(draws)), (share, p)
    assert abs(len(class0) / NUM_TRAIN - p) > 8 * math.sqrt(p * (1 - p) / len(draws))  # the check can tell them apart
    assert max(Counter(epochs[0]).values()) > 1  # with replacement, as the sampler draws
    assert epochs[0] != epochs[1]  # each epoch draws anew


def test_two_ranks_match_one_rank_with_a_weighted_sampler(weighted):
    """Two runs (1 rank x 8, 2 ranks x 4) draw the same ids in the same global order, and train alike."""
    one, two = _global(weighted[1].parent / "ids"), _global(weighted[2].parent / "ids")
    assert one == two and len(one) == 2 * DRAWS // 8
    w1, w2 = load_weights(weighted[1]), load_weights(weighted[2])
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nproc", sampled_params([1, 2], sample_cases("weighted_sigkill", [1, 2])))  # one drawn by DIST_TRAIN_MATRIX_SEED
def test_sigkill_then_resume_with_a_weighted_sampler_is_bitwise_identical(project, weighted, tmp_path, nproc):
    out, ids = tmp_path / "run", tmp_path / "ids"
    ids.mkdir()
    args = _args(project, out, "weighted", *WEIGHTED, BATCH[nproc], draws=DRAWS)
    killed = run_cli(args, nproc=nproc, check=False, env={"KILL_AT_FORWARD": str(KILL_AT_FORWARD)})
    assert killed.returncode != 0 and not (out / "model.safetensors").exists()
    resumed = run_cli(args, nproc=nproc, env={"IDS_DIR": str(ids)})
    assert "at optimizer step 40 (epoch 1, " in resumed.stdout  # mid-epoch: 10 of its 30 steps done
    assert_weights_equal(out, weighted[nproc])
    assert _global(ids) == _global(weighted[nproc].parent / "ids")[80:]  # the rest of the same draws, in order


@pytest.mark.parametrize("nproc", [1, 2])
def test_subset_sampler_trains_on_exactly_its_subset(project, tmp_path, nproc):
    """10% of the ids, each once per epoch and nothing else; 2 ranks x 5 (fast path) ≡ 1 rank x 10 (regular)."""
    out, ids = tmp_path / "run", tmp_path / "ids"
    ids.mkdir()
    extra = {"fast": "true"} if nproc == 2 else {}
    run_cli(
        _args(project, out, "subset", "epochs=2", f"batch_size={10 // nproc}", "seed=3", **extra), nproc=nproc, env={"IDS_DIR": str(ids)}
    )
    micro = _global(ids)
    subset = list(range(3, NUM_TRAIN, 10))
    assert len(micro) == 4 and all(len(b) == 10 for b in micro)  # 20 ids per epoch: 2 micro-batches of 10
    epochs = [sum(micro[:2], []), sum(micro[2:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == subset and epochs[0] != epochs[1]
    sampler = SubsetRandomSampler(subset)
    for epoch, got in enumerate(epochs):  # the sampler's own draw under the documented seed
        sampler.generator = torch.Generator().manual_seed(epoch_seed(3, epoch))
        assert got == list(sampler)


def test_subset_sampler_on_three_ranks_is_its_draw_once(project, tmp_path):
    """3 ranks x 2: the 20 ids of an epoch's draw, dealt 6 per global micro-batch; the last 2 on rank 0 (at least
    2 on a rank that gets any; stand-ins on ranks 1 and 2), so each subset id is trained on once and nothing else."""
    out, ids = tmp_path / "run", tmp_path / "ids"
    ids.mkdir()
    run_cli(_args(project, out, "subset", "epochs=2", "batch_size=2", "seed=3"), nproc=3, env={"IDS_DIR": str(ids)})
    micro = _global(ids)
    assert [len(b) for b in micro] == [6, 6, 6, 2] * 2  # 20 per epoch: 3 micro-batches of 6 and one of 2
    sampler = SubsetRandomSampler(list(range(3, NUM_TRAIN, 10)))
    for epoch in range(2):
        sampler.generator = torch.Generator().manual_seed(epoch_seed(3, epoch))
        draw = list(sampler)
        assert sum(micro[4 * epoch : 4 * epoch + 4], []) == draw


def test_custom_sampler_is_honoured(project, tmp_path):
    out, ids = tmp_path / "run", tmp_path / "ids"
    ids.mkdir()
    run_cli(_args(project, out, "even", "epochs=2", "batch_size=10", "seed=5"), env={"IDS_DIR": str(ids)})
    micro = _global(ids)
    sampler = _project_module(project, "samplers").EvenIds(NUM_TRAIN)
    expected = []
    for epoch in range(2):
        sampler.generator = torch.Generator().manual_seed(epoch_seed(5, epoch))
        expected += list(sampler)
    assert sum(micro, []) == expected and sorted(expected[:100]) == list(range(0, NUM_TRAIN, 2))


def test_unreproducible_custom_sampler_is_refused_in_one_line(project, tmp_path):
    result = run_cli(_args(project, tmp_path / "run", "unseeded", "epochs=1", "batch_size=10"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("dist-train: error:")]
    assert "sampler Unseeded draws a different order each time" in line and "`generator` attribute" in line
    assert "set_epoch(epoch)" in line and not (tmp_path / "run" / "model.safetensors").exists()


def test_a_sampler_drawing_per_rank_is_refused_on_two_ranks(project, tmp_path):
    result = run_cli(_args(project, tmp_path / "run", "per_rank", "epochs=1", "batch_size=10"), nproc=2, check=False)
    # (The launcher reports the rank that exited 2 with a traceback of its own, and stops the other.)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    assert "dist-train: error: data: the training sampler PerRank draws a different order on each process" in result.stderr


def test_batch_sampler_on_two_ranks_is_dealt_whole_and_resumes_bitwise(project, tmp_path):
    """Variable-size batches, whole, round-robin; SIGKILL mid-epoch 1 and resume ≡ the uninterrupted run."""
    # batch_size 7: buckets of 67, 67 and 66 ids make 10 batches each (9 of 7, then 4, 4 and 3); the loop
    # counts 7 samples per batch, whatever its size.
    common = ("epochs=2", "batch_size=7", "grad_accum_steps=2", "checkpoint_every=1", "seed=9", "lr=0.05")
    buckets = _project_module(project, "samplers").Buckets
    draws = [UserOrder(buckets(NUM_TRAIN, 7), 9, batches=True).draw(epoch) for epoch in range(2)]
    assert [len(draw) for draw in draws] == [30, 30] and sorted({len(b) for b in draws[0]}) == [3, 4, 7]
    # 7 steps of 2 ranks x 2 micro-batches, and a last step of one micro-batch: every batch once, none padded in.

    reference, ids = tmp_path / "reference", tmp_path / "ids"
    out, resumed_ids = tmp_path / "run", tmp_path / "resumed_ids"
    ids.mkdir(), resumed_ids.mkdir()
    steps0 = 8
    kill = 15 + 2 * 3 + 1  # rank 0's first forward of epoch 1's 4th step (15 in epoch 0); the last save: 3 steps into epoch 1
    _, killed = run_clis(  # the uninterrupted run and the one to be killed, at once
        {"args": _args(project, reference, "buckets", *common), "nproc": 2, "env": {"IDS_DIR": str(ids)}},
        {"args": _args(project, out, "buckets", *common), "nproc": 2, "check": False, "env": {"KILL_AT_FORWARD": str(kill)}},
    )
    ranks = read_ids(ids)
    assert ranks[0] == draws[0][0::2] + draws[1][0::2] and ranks[1] == draws[0][1::2] + draws[1][1::2]
    assert killed.returncode != 0
    resumed = run_cli(_args(project, out, "buckets", *common), nproc=2, env={"IDS_DIR": str(resumed_ids)})
    assert f"at optimizer step {steps0 + 3} (epoch 1, " in resumed.stdout
    assert_weights_equal(out, reference)
    assert read_ids(resumed_ids)[0] == ranks[0][len(ranks[0]) - (15 - 6) :]  # rank 0's 15 batches of epoch 1, less 3 steps
