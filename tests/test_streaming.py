"""Streaming data: a user IterableDataset over jsonl shards, without a length or a state, on 1 and 2 ranks.

Accelerate dispatches an IterableDataset: rank 0 reads the stream (its DataLoader workers split the
shard files) and sends each rank its slice of every global batch, so each sample is read once and
trained on by exactly one rank per epoch, the last, uneven batch split without padding.
"""

from __future__ import annotations

import collections
import json
import random
import textwrap
from pathlib import Path

import pytest

from helpers import read_metrics, run_cli, val_records

STREAM_PROJECT = textwrap.dedent('''
    import json, os, torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Shards(IterableDataset):
        """Samples read line by line from jsonl shard files (no __len__); DataLoader workers split the files."""

        def __init__(self, files):
            self.files = files

        def __iter__(self):
            info = get_worker_info()
            for path in self.files if info is None else self.files[info.id::info.num_workers]:
                with open(path) as f:
                    for line in f:
                        record = json.loads(line)
                        yield torch.tensor(record["x"] + [float(record["id"])]), record["y"]

    class Model(nn.Module):
        """Logs the sample ids it trains on (last input column) to IDS_DIR/rank{RANK}.txt."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if self.training and os.environ.get("IDS_DIR"):
                with open(os.path.join(os.environ["IDS_DIR"], f"rank{os.environ.get('RANK', '0')}.txt"), "a") as f:
                    f.write(" ".join(str(int(i)) for i in x[:, -1].tolist()) + "\\n")
            return self.fc(x[:, :-1])

    def get_dataloader(cfg, train):
        files = [f"{cfg.folder}/{'train' if train else 'val'}{i}.jsonl" for i in range(4)]
        return DataLoader(Shards(files), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
''')
TRAIN, VAL = 50, 13


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream")
    (folder / "stream.py").write_text(STREAM_PROJECT)
    rng, next_id = random.Random(0), 0
    for split, count in (("train", TRAIN), ("val", VAL)):
        for shard in range(4):
            with open(folder / f"{split}{shard}.jsonl", "w") as f:
                for _ in range(count // 4 + (shard < count % 4)):
                    x = [rng.gauss(0, 1) for _ in range(4)]
                    f.write(json.dumps({"id": next_id, "x": x, "y": int(x[0] > 0)}) + "\n")
                    next_id += 1
    return folder


def _args(project: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={project / 'stream.py'}:Model",
        f"data={project / 'stream.py'}:get_dataloader",
        f"data_args={{folder: {project}}}",
        f"output_dir={out}",
        "progress=false",
        "plot=false",
        "resume=never",
        *extra,
    ]


@pytest.mark.parametrize("nproc, num_workers", [(1, 0), (2, 2)])
def test_each_streamed_sample_is_trained_on_once_per_epoch(project, tmp_path, nproc, num_workers):
    ids_dir = tmp_path / "ids"
    ids_dir.mkdir()
    out = tmp_path / "run"
    run_cli(
        _args(project, out, "epochs=2", f"batch_size={8 // nproc}", f"num_workers={num_workers}"),
        nproc=nproc,
        env={"IDS_DIR": str(ids_dir)},
    )
    seen = collections.Counter(int(i) for p in ids_dir.glob("rank*.txt") for i in p.read_text().split())
    assert seen == collections.Counter({i: 2 for i in range(TRAIN)})  # 2 epochs, no sample lost, none padded in
    records = val_records(out)
    assert [r["step"] for r in records] == [7, 14]  # 50 samples / global batch 8: 6 full steps and the rest
    assert all(r["val_samples"] == VAL for r in records)


def test_a_schedule_that_needs_the_length_asks_for_max_steps(project, tmp_path):
    result = run_cli(_args(project, tmp_path / "run", "lr_schedule=cosine"), check=False)
    assert result.returncode == 2 and "set max_steps" in result.stderr
    run_cli(_args(project, tmp_path / "run", "lr_schedule=cosine", "max_steps=10", "batch_size=8"))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1] == 10


def test_a_stream_without_a_state_resumes_mid_epoch_by_replaying_it(project, tmp_path):
    """No state_dict(): the resumed run reads epoch 0 again, skips the 3 x 8 samples trained, goes on with the rest."""
    out, ids_dir = tmp_path / "run", tmp_path / "ids"
    ids_dir.mkdir()
    run_cli(_args(project, out, "batch_size=8", "max_steps=3"), env={"IDS_DIR": str(ids_dir)})  # ends mid-epoch 0
    result = run_cli(_args(project, out, "batch_size=8", "epochs=1", "resume=auto"), env={"IDS_DIR": str(ids_dir)})
    assert "replaying the first 3 batches of epoch 0 to reach the saved position (it has no state_dict())" in result.stdout
    seen = collections.Counter(int(i) for p in ids_dir.glob("rank*.txt") for i in p.read_text().split())
    assert seen == collections.Counter({i: 1 for i in range(TRAIN)})
