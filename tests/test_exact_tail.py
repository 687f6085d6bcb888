"""The exact tail (issue 19): an epoch trains every sample once, its last step may be short.

One process is the user's own hand-written loop over their DataLoader: 50 samples at batch 8 (six
batches of 8 and one of 2), shuffled, a BatchNorm model: the same samples in the same batches, and the
same weights, bitwise (the same arithmetic: one forward, a mean cross-entropy, backward, SGD step).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dist_train.data.user_order import epoch_seed
from helpers import assert_weights_equal, import_file, load_weights, train_in_process

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
