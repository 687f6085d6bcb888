"""The exact tail (issue 19): an epoch trains every sample once, its last step may be short and is weighted
to the exact mean over its samples.

One process is the user's own hand-written loop over their DataLoader: 50 samples at batch 8 (six
batches of 8 and one of 2), shuffled, a BatchNorm model: the same samples in the same batches, and the
same weights, bitwise (the same arithmetic: one forward, a mean cross-entropy, backward, SGD step).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dist_train.data.user_order import epoch_seed
from helpers import assert_weights_equal, ids_model, import_file, load_weights, read_ids, read_metrics, run_clis, train_in_process

PROJECT = """
import os
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def tensors(n, train):
    g = torch.Generator().manual_seed(1 if train else 2)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return torch.cat([x, torch.arange(n).unsqueeze(1).float()], 1), y  # the last column: the sample's id


def get_dataloader(cfg, train):
    x, y = tensors(50 if train else 13, train)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=train)


class BNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        if self.training and os.environ.get("IDS_FILE"):
            with open(os.environ["IDS_FILE"], "a") as f:
                f.write(" ".join(str(int(i)) for i in x[:, -1].tolist()) + "\\n")
        return self.out(torch.tanh(self.bn(self.fc(x[:, :-1]))))
"""


def _batches(path: Path) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in path.read_text().splitlines()]


def test_one_process_is_the_users_own_loop_bitwise(tmp_path, monkeypatch):
    (tmp_path / "proj.py").write_text(textwrap.dedent(PROJECT))
    project = import_file(tmp_path / "proj.py", "exact_tail_project")
    seed, epochs = 3, 2
    monkeypatch.setenv("IDS_FILE", str(tmp_path / "dist_train_ids.txt"))
    train_in_process(
        [
            f"model={tmp_path / 'proj.py'}:BNModel",
            f"data={tmp_path / 'proj.py'}:get_dataloader",
            "batch_size=8",
            f"epochs={epochs}",
            "optimizer=sgd",
            "lr=0.1",
            "max_grad_norm=null",
            f"seed={seed}",
            f"output_dir={tmp_path / 'out'}",
            "progress=false",
            "plot=false",
            "resume=never",
        ]
    )
    # The user's loop: their DataLoader, its shuffle drawn from the run's (seed, epoch) as dist_train draws it.
    monkeypatch.setenv("IDS_FILE", str(tmp_path / "user_ids.txt"))
    set_seed(seed)  # as dist_train does before building the model
    model = project.BNModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dataset = TensorDataset(*project.tensors(50, True))
    for epoch in range(epochs):
        model.train()
        order = RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        for x, y in DataLoader(dataset, batch_size=8, sampler=order):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    ours, theirs = _batches(tmp_path / "dist_train_ids.txt"), _batches(tmp_path / "user_ids.txt")
    assert [len(b) for b in ours] == [8] * 6 + [2] + [8] * 6 + [2]
    assert ours == theirs
    for epoch in range(epochs):
        assert sorted(sum(ours[7 * epoch : 7 * (epoch + 1)], [])) == list(range(50))  # each sample once
    assert_weights_equal(load_weights(tmp_path / "out"), model.state_dict())  # buffers included, bitwise


# ---- every data source of the README's table, on 1, 2 and 3 ranks --------------------------------------------

SOURCES = """
import os
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, SubsetRandomSampler, TensorDataset

N = 47  # 15 batches of 3 and one of 2; no world size x accumulation here divides it


def tensors(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return torch.cat([x, torch.arange(n).unsqueeze(1).float()], 1), (x[:, 0] > 0).long()  # last column: the id


class Sizes(Sampler):
    \"\"\"A batch_sampler: a seeded permutation cut into batches of 3, 2, 4, 1, 3, 2, ... (19 batches).\"\"\"

    def __init__(self, n):
        self.n, self.generator = n, None

    def __iter__(self):
        order, start, k = torch.randperm(self.n, generator=self.generator).tolist(), 0, 0
        while start < self.n:
            size = (3, 2, 4, 1)[k % 4]
            yield order[start : start + size]
            start, k = start + size, k + 1


class Stream(IterableDataset):
    \"\"\"The whole set in order (dealt from rank 0), or, `split`, rank r's own contiguous part, the parts growing
    with the rank (of 2 ranks: 15 and 32 ids; of 3: 7, 16 and 24), as a stream split by rank would be.\"\"\"

    def __init__(self, x, y, split):
        self.x, self.y, self.split = x, y, split

    def __iter__(self):
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        bounds = [len(self.x) * r * (r + 1) // (world * (world + 1)) for r in range(world + 1)] if self.split else [0, len(self.x)]
        part = range(bounds[rank], bounds[rank + 1]) if self.split else range(len(self.x))
        for i in part:
            yield self.x[i], self.y[i]


def get_dataloader(cfg, train):
    if not train:
        return DataLoader(TensorDataset(*tensors(11, 2)), batch_size=4)
    x, y = tensors(N, 1)
    source = cfg.source
    if source == "shuffle":
        return DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    if source == "subset":  # every id but the multiples of 5: 37 of them
        return DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, sampler=SubsetRandomSampler([i for i in range(N) if i % 5]))
    if source == "batch_sampler":
        return DataLoader(TensorDataset(x, y), batch_sampler=Sizes(N))
    return DataLoader(Stream(x, y, split=source == "split"), batch_size=cfg.batch_size)
"""
# The step is 6 of the user's batches on every world size (1 x 6, 2 x 3, 3 x 2 accumulation), so N ranks train
# what one rank does, step for step: the weights agree to rounding (a per-rank stream has no one-rank twin).
WORLDS = {1: 6, 2: 3, 3: 2}
SOURCE_IDS = {
    "shuffle": list(range(47)),
    "subset": [i for i in range(47) if i % 5],
    "batch_sampler": list(range(47)),
    "stream": list(range(47)),
    "split": list(range(47)),
}


def _source_args(folder: Path, out: Path, source: str, accumulation: int) -> list[str]:
    return [
        f"model={folder / 'model.py'}:MyModel",
        f"data={folder / 'sources.py'}:get_dataloader",
        f"data_args={{source: {source}}}",
        "model_args={in_features: 6, hidden: 8, num_classes: 2}",
        f"output_dir={out}",
        "batch_size=3",
        f"grad_accum_steps={accumulation}",
        "epochs=2",
        "optimizer=sgd",
        "lr=0.1",
        "seed=5",
        "log_every=1",
        "progress=false",
        "plot=false",
        "resume=never",
    ]


def _epochs(ids_dir: Path) -> list[list[list[list[int]]]]:
    """[epoch][rank] -> that rank's micro-batches ([] a stand-in): each rank's lines, in two epochs of one length."""
    ranks = read_ids(ids_dir)
    lengths = {len(lines) for lines in ranks.values()}
    assert len(lengths) == 1 and lengths.pop() % 2 == 0, "the ranks did not step together, or the epochs differ"
    half = len(ranks[0]) // 2
    return [[ranks[rank][e * half : (e + 1) * half] for rank in sorted(ranks)] for e in range(2)]


def test_every_data_source_trains_each_id_once_per_epoch_on_1_2_3_ranks(tmp_path, monkeypatch, capsys):
    """Per-epoch id logs for each source of the README's data table: each id exactly once, nothing left out or
    padded in, a rank without samples only in an epoch's last micro-batch (or, for a per-rank stream, after its
    part ran out); N ranks' weights equal one rank's (rtol 1e-5) at the same step of 6 batches."""
    (tmp_path / "model.py").write_text(ids_model())
    (tmp_path / "sources.py").write_text(SOURCES)
    runs = {}
    for source in SOURCE_IDS:  # one rank, in this process
        if source == "split":
            continue
        monkeypatch.setenv("IDS_DIR", str(tmp_path / f"ids-{source}-1"))
        (tmp_path / f"ids-{source}-1").mkdir()
        train_in_process(_source_args(tmp_path, tmp_path / f"{source}-1", source, WORLDS[1]))
        runs[source, 1] = capsys.readouterr().out
    monkeypatch.delenv("IDS_DIR")
    calls = []
    for source in SOURCE_IDS:
        for world in (2, 3):
            (tmp_path / f"ids-{source}-{world}").mkdir()
            args = _source_args(tmp_path, tmp_path / f"{source}-{world}", source, WORLDS[world])
            calls.append(((source, world), {"args": args, "nproc": world, "env": {"IDS_DIR": str(tmp_path / f"ids-{source}-{world}")}}))
    for i in range(0, len(calls), 2):  # two launches at a time: each is mostly start-up
        results = run_clis(*(call for _, call in calls[i : i + 2]))
        runs.update({key: result.stdout for (key, _), result in zip(calls[i : i + 2], results)})

    for (source, world), stdout in runs.items():
        assert "left out" not in stdout, (source, world)
        for epoch, ranks in enumerate(_epochs(tmp_path / f"ids-{source}-{world}")):
            trained = sorted(i for batches in ranks for batch in batches for i in batch)
            assert trained == SOURCE_IDS[source], (source, world, epoch)  # each id once: none twice, none missing
            for batches in ranks:
                real = [bool(batch) for batch in batches]
                if source == "split":  # its part, then stand-ins until the longest part ends
                    assert real == sorted(real, reverse=True), (world, epoch)
                else:  # a stand-in only in the epoch's last micro-batch
                    assert all(real[:-1]), (source, world, epoch)
        if source != "split" and world > 1:
            assert_weights_equal(tmp_path / f"{source}-{world}", tmp_path / f"{source}-1", exact=False)
            # train_loss, step by step, is the step's exact mean too: a stand-in's loss counts for nothing.
            losses = [[r["train_loss"] for r in read_metrics(tmp_path / f"{source}-{w}") if "train_loss" in r] for w in (world, 1)]
            assert len(losses[0]) == len(losses[1]) and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(*losses)), source
    # The uneven ends really happened: a stand-in on 3 ranks for each source (the last micro-batch, 2 ids, or 1 batch).
    for source in SOURCE_IDS:
        assert any(not batch for ranks in _epochs(tmp_path / f"ids-{source}-3") for batches in ranks for batch in batches), source
