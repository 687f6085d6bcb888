"""Streams already split per rank (`split_dataset_by_node`, files chosen by rank): each rank trains on its own
part, never split again, on 2 and 3 real processes.

The shards have different lengths, so the ranks' parts do too: a rank whose part ran out trains stand-ins
(weight 0) until the longest part ends, so per epoch every id is trained exactly once and nothing is left out. The validation set, split per rank too, gives the
exact mean over all of it. SIGKILL mid-epoch then resume: the uninterrupted run's weights, bit for bit. A
mid-epoch checkpoint on another world size is refused (each rank's position is in its own part).
"""

from __future__ import annotations

import collections
import json
import random
import textwrap
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint.manifest import read_manifest
from helpers import load_weights, read_metrics, run_cli, run_clis, sample_cases, sampled_params

pytest.importorskip("torchdata.stateful_dataloader")

PROJECT = textwrap.dedent('''
    import json, os, signal, torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    class RankShards(IterableDataset):
        """This rank's jsonl files (every WORLD-th), split again over DataLoader workers. Its state: the next
        (file, line) of this reader (STATELESS: none, so dist_train replays the epoch)."""

        def __init__(self, files):
            self.files, self.position, self.resume_at = files[RANK::WORLD], (0, 0), None

        def state_dict(self):
            return {"file": self.position[0], "line": self.position[1]}

        def load_state_dict(self, state):
            self.resume_at = (state["file"], state["line"])

        def __iter__(self):
            info = get_worker_info()
            files = self.files if info is None else self.files[info.id::info.num_workers]
            first_file, first_line = self.resume_at or (0, 0)
            self.resume_at = None
            for file_index in range(first_file, len(files)):
                with open(files[file_index]) as f:
                    for line_index, line in enumerate(f):
                        if file_index == first_file and line_index < first_line:
                            continue
                        self.position = (file_index, line_index + 1)
                        record = json.loads(line)
                        yield torch.tensor(record["x"] + [float(record["id"])]), record["y"]

    class Stateless(RankShards):
        state_dict = load_state_dict = None

    class Model(nn.Module):
        """Dropout (the torch RNG must be restored exactly); logs its ids per epoch; SIGKILLs itself at KILL_AT_FORWARD."""

        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), nn.Dropout(0.25), nn.Linear(16, 2)
            self.forwards = 0

        def forward(self, x):
            if torch.is_grad_enabled() and os.environ.get("IDS_DIR"):  # a training forward; a stand-in's as an empty line
                with open(os.path.join(os.environ["IDS_DIR"], f"rank{RANK}.txt"), "a") as f:
                    f.write((" ".join(str(int(i)) for i in x[:, -1].tolist()) if self.training else "") + "\\n")
            if self.training:
                self.forwards += 1
                if RANK == 0 and self.forwards == int(os.environ.get("KILL_AT_FORWARD", "0")):
                    os.kill(os.getpid(), signal.SIGKILL)
            return self.fc2(self.drop(torch.tanh(self.fc1(x[:, :-1]))))

    def _files(cfg, train):
        return [f"{cfg.folder}/{'train' if train else 'val'}{i}.jsonl" for i in range(6)]

    def get_dataloader(cfg, train):
        dataset = (Stateless if getattr(cfg, "stateless", False) else RankShards)(_files(cfg, train))
        return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers if train else 0)

    def _collate(rows):
        return torch.tensor([r["x"] + [float(r["id"])] for r in rows]), torch.tensor([r["y"] for r in rows])

    def get_hf_dataloader(cfg, train):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node
        stream = load_dataset("json", data_files=_files(cfg, train), split="train", streaming=True)  # 6 shards
        stream = split_dataset_by_node(stream, rank=RANK, world_size=WORLD)  # whole shards per rank (6 % WORLD == 0)
        return DataLoader(stream, batch_size=cfg.batch_size, collate_fn=_collate, num_workers=cfg.num_workers if train else 0)
''')
# Lines per shard: rank r of 2 reads shards r, r+2, r+4 (54 and 38 samples); of 3, shards r and r+3 (34, 26, 32).
TRAIN_SHARDS, VAL_SHARDS = (20, 12, 16, 14, 18, 12), (5, 3, 4, 6, 2, 3)
TRAIN, VAL = sum(TRAIN_SHARDS), sum(VAL_SHARDS)
COMMON = ("epochs=2", "seed=3", "log_every=1", "lr=0.1", "batch_size=4", "progress=false", "plot=false")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("split_streams")
    (folder / "stream.py").write_text(PROJECT)
    rng, next_id = random.Random(1), 0
    for split, sizes in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        for shard, size in enumerate(sizes):
            with open(folder / f"{split}{shard}.jsonl", "w") as f:
                for _ in range(size):
                    x = [rng.gauss(0, 1) for _ in range(4)]
                    f.write(json.dumps({"id": next_id, "x": x, "y": int(x[0] > 0)}) + "\n")
                    next_id += 1
    return folder


def _args(project: Path, out: Path, source: str, num_workers: int = 0, *extra: str) -> list[str]:
    loader, data_args = {
        "user": ("get_dataloader", ""),
        "stateless": ("get_dataloader", ", stateless: true"),
        "hf": ("get_hf_dataloader", ""),
    }[source]
    return [
        f"model={project / 'stream.py'}:Model",
        f"data={project / 'stream.py'}:{loader}",
        f"data_args={{folder: {project}{data_args}}}",
        f"output_dir={out}",
        f"num_workers={num_workers}",
        "resume=auto",
        *COMMON,
        *extra,
    ]


def _forwards(folder: Path) -> list[list[list[int]]]:
    """Per rank, the ids of each training forward, in order; [] for a stand-in (a rank whose part ran out)."""
    return [
        [[int(i) for i in line.split()] for line in (folder / f"rank{rank}.txt").read_text().splitlines()]
        for rank in range(len(list(folder.glob("rank*.txt"))))
    ]


def _epochs(out: Path, per_rank: list[list[list[int]]]) -> list[list[list[int]]]:
    """Each rank's forwards cut into epochs, by the steps each epoch logged (log_every=1, one forward a step)."""
    steps = collections.Counter(record["epoch"] for record in read_metrics(out) if "lr" in record)
    bounds = [sum(steps[e] for e in range(epoch)) for epoch in range(len(steps) + 1)]
    return [[rank[bounds[e] : bounds[e + 1]] for rank in per_rank] for e in range(len(steps))]


def _own_ids(rank: int, nproc: int) -> set[int]:
    """The ids in rank's files (every nproc-th shard from rank)."""
    return {i for shard in range(rank, 6, nproc) for i in range(sum(TRAIN_SHARDS[:shard]), sum(TRAIN_SHARDS[: shard + 1]))}


@pytest.mark.parametrize("source, nproc, num_workers", [("user", 3, 2), ("hf", 2, 0), ("stateless", 3, 0)])
def test_each_rank_trains_its_own_part_and_every_sample_once(project, tmp_path, source, nproc, num_workers):
    """The user's files go to rank r as r, r+n, ... in every epoch; `split_dataset_by_node` deals datasets'
    shards anew each epoch (its own rule): either way each epoch trains every id once, none left out: the ranks
    whose part ran out train stand-ins until the longest part ends."""
    out, ids = tmp_path / "run", tmp_path / "ids"
    ids.mkdir()
    result = run_cli(_args(project, out, source, num_workers), nproc=nproc, env={"IDS_DIR": str(ids)})
    per_rank = _forwards(ids)
    assert len({len(rank) for rank in per_rank}) == 1  # the ranks stepped together
    assert "left out" not in result.stdout
    epochs = _epochs(out, per_rank)
    assert len(epochs) == 2 and sum(len(epoch[0]) for epoch in epochs) == len(per_rank[0])
    for epoch, batches in enumerate(epochs):
        trained = collections.Counter(i for rank in batches for batch in rank for i in batch)
        assert max(trained.values()) == 1 and sum(trained.values()) == TRAIN, epoch
        for rank in batches:  # a rank trains its part, then only stand-ins
            real = [bool(batch) for batch in rank]
            assert real == sorted(real, reverse=True), "a stand-in before a rank's part ran out"
    if source != "hf":  # not dealt from rank 0: each rank trains on its own files, and the longest part ends the epoch
        for rank, batches in enumerate(per_rank):
            assert {i for batch in batches for i in batch} <= _own_ids(rank, nproc)
        parts = [len(_own_ids(rank, nproc)) for rank in range(nproc)]
        assert [len(epoch[0]) for epoch in epochs] == [max(-(-part // 4) for part in parts)] * 2
    # The validation set, split per rank too: its loss is the exact mean over every part.
    record = [r for r in read_metrics(out) if "val_loss" in r][-1]
    assert record["val_samples"] == VAL
    assert abs(record["val_loss"] - _val_loss(project, load_weights(out))) <= 1e-6 * record["val_loss"]


def _val_loss(project: Path, weights: dict) -> float:
    """The mean cross-entropy over every validation sample, computed here from the final weights."""
    losses = []
    for shard in range(6):
        for line in (project / f"val{shard}.jsonl").read_text().splitlines():
            row = json.loads(line)
            hidden = torch.tanh(torch.tensor(row["x"]) @ weights["fc1.weight"].T + weights["fc1.bias"])
            logits = hidden @ weights["fc2.weight"].T + weights["fc2.bias"]
            losses.append(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(row["y"])).item())
    return sum(losses) / len(losses)


KILL_CASES = [("user", 2), ("hf", 0), ("stateless", 0)]  # three real runs each (~20 s): one drawn by DIST_TRAIN_MATRIX_SEED


@pytest.mark.parametrize("source, num_workers", sampled_params(KILL_CASES, sample_cases("split_sigkill", KILL_CASES), unpack=True))
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(project, tmp_path, source, num_workers):
    """2 ranks, 14 steps per epoch (parts of 54 and 38 at batch 4: rank 1 runs out after 10 and trains stand-ins):
    saves every 4; killed in step 14 of epoch 0, so the resume at step 12 finds rank 1's part spent: its stand-in
    comes from rank 0, and its saved position (state or replay) is the end of its part."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    ids_reference, ids_killed, ids_resumed = tmp_path / "ids_reference", tmp_path / "ids_killed", tmp_path / "ids_resumed"
    ids_reference.mkdir(), ids_killed.mkdir(), ids_resumed.mkdir()
    args = {run: _args(project, run, source, num_workers, "checkpoint_every=4") for run in (reference, out)}
    _, killed = run_clis(
        {"args": args[reference], "nproc": 2, "env": {"IDS_DIR": str(ids_reference)}},
        {"args": args[out], "nproc": 2, "check": False, "env": {"KILL_AT_FORWARD": "14", "IDS_DIR": str(ids_killed)}},
    )
    assert killed.returncode != 0 and not (out / "model.safetensors").exists()
    manifest = read_manifest(out / "checkpoints" / "step_00000012")
    assert manifest["samples_consumed"] == 96 and "data_state.pt" in manifest["files"]
    resumed = run_cli(args[out], nproc=2, env={"IDS_DIR": str(ids_resumed)})
    assert "at optimizer step 12 (epoch 0, 96 samples into it" in resumed.stdout
    got, want = load_weights(out), load_weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The killed run's first 12 steps, then the resumed run: the uninterrupted run's ids, rank by rank, step by step.
    killed_ids, resumed_ids = _forwards(ids_killed), _forwards(ids_resumed)
    assert [before[:12] + after for before, after in zip(killed_ids, resumed_ids)] == _forwards(ids_reference)
    assert resumed_ids[1][:2] == [[], []]  # rank 1 resumed with nothing left: stand-ins


def test_a_mid_epoch_checkpoint_on_another_world_size_is_refused_untouched(project, tmp_path):
    out = tmp_path / "run"
    run_cli(_args(project, out, "user", 0, "max_steps=4"), nproc=2)
    before = {str(p): p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    result = run_cli(_args(project, out, "user", 0), nproc=3, check=False)
    assert result.returncode == 1 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert "stream split per rank over 2 processes" in result.stderr and "Resume on 2 processes" in result.stderr
    assert {str(p): p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before
