"""Exact resume of streaming data: a stream whose loader or dataset has state_dict()/load_state_dict().

Real processes throughout. The user's stream is either their own IterableDataset over jsonl shards (it
saves "file, line" per worker) or a Hugging Face `datasets` IterableDataset streaming the same shards,
shuffled (its state and epoch). The model logs the ids it trains on and SIGKILLs itself at a given
forward pass: the resumed run must end with the uninterrupted run's weights, bit for bit, and every id
must be trained on once per epoch across the killed and the resumed run. Then the refusals, each one
line, exit 2, no checkpoint touched: an empty stream, a load_state_dict that fails, a map-style dataset
whose length changed under a mid-epoch checkpoint.
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
from helpers import (
    FULL_MATRIX,
    MATRIX_SEED,
    load_weights,
    run_cli,
    run_clis,
    sample_cases,
    sampled_params,
    seed_project_args,
    write_seed_project,
)

pytest.importorskip("torchdata.stateful_dataloader")

STREAM_PROJECT = textwrap.dedent('''
    import json, os, signal, torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Shards(IterableDataset):
        """jsonl shard files, line by line; DataLoader workers split the files. Its state: the next (file, line)."""

        def __init__(self, files):
            self.files, self.position, self.resume_at = files, (0, 0), None

        def state_dict(self):
            return {"file": self.position[0], "line": self.position[1]}

        def load_state_dict(self, state):
            if os.environ.get("FAIL_LOAD"):
                raise ValueError(f"shard state {state} does not match the files")
            self.resume_at = (state["file"], state["line"])

        def __iter__(self):
            info = get_worker_info()
            files = self.files if info is None else self.files[info.id::info.num_workers]
            if os.environ.get("EMPTY") in ("all", os.environ.get("RANK", "0")):
                files = []
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

    class Model(nn.Module):
        """Dropout (the torch RNG must be restored exactly); logs its ids; SIGKILLs itself at KILL_AT_FORWARD."""

        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), nn.Dropout(0.25), nn.Linear(16, 2)
            self.forwards = 0

        def forward(self, x):
            if self.training:
                self.forwards += 1
                rank = os.environ.get("RANK", "0")
                if os.environ.get("IDS_DIR"):
                    with open(os.path.join(os.environ["IDS_DIR"], f"rank{rank}.txt"), "a") as f:
                        f.write(" ".join(str(int(i)) for i in x[:, -1].tolist()) + "\\n")
                if rank == "0" and self.forwards == int(os.environ.get("KILL_AT_FORWARD", "0")):
                    os.kill(os.getpid(), signal.SIGKILL)
            return self.fc2(self.drop(torch.tanh(self.fc1(x[:, :-1]))))

    def get_dataloader(cfg, train):
        files = [f"{cfg.folder}/{'train' if train else 'val'}{i}.jsonl" for i in range(4)]
        return DataLoader(Shards(files), batch_size=cfg.batch_size, num_workers=cfg.num_workers if train else 0)

    def _collate(rows):
        x = torch.tensor([r["x"] + [float(r["id"])] for r in rows])
        return x, torch.tensor([r["y"] for r in rows])

    def get_hf_dataloader(cfg, train):
        from datasets import load_dataset
        files = [f"{cfg.folder}/{'train' if train else 'val'}{i}.jsonl" for i in range(4)]
        stream = load_dataset("json", data_files=files, split="train", streaming=True)  # 4 shards
        if train and getattr(cfg, "buffer", 0):  # its state_dict() leaves the buffer out: dist_train replays the epoch
            stream = stream.shuffle(seed=5, buffer_size=cfg.buffer)
        return DataLoader(stream, batch_size=cfg.batch_size, collate_fn=_collate, num_workers=cfg.num_workers if train else 0)

    class Lines(IterableDataset):
        """The same shards without a state (dist_train replays the epoch to resume). UNSEEDED=1: not the same
        stream twice (lines shuffled without a seed); UNSEEDED=noise: unseeded augmentation."""

        def __init__(self, files):
            self.files = files

        def __iter__(self):
            import random
            info = get_worker_info()
            files = self.files if info is None else self.files[info.id::info.num_workers]
            for path in files:
                with open(path) as f:
                    lines = f.readlines()
                if os.environ.get("UNSEEDED") == "1":
                    random.SystemRandom().shuffle(lines)
                for line in lines:
                    record = json.loads(line)
                    if os.environ.get("UNSEEDED") == "noise":  # unseeded augmentation
                        record["x"][0] += random.SystemRandom().gauss(0, 0.01)
                    yield torch.tensor(record["x"] + [float(record["id"])]), record["y"]

    def get_plain_dataloader(cfg, train):
        files = [f"{cfg.folder}/{'train' if train else 'val'}{i}.jsonl" for i in range(4)]
        return DataLoader(Lines(files), batch_size=cfg.batch_size, num_workers=cfg.num_workers if train else 0)

    def get_stateful_dataloader(cfg, train):
        """torchdata's StatefulDataLoader: the loader's own state_dict() (per worker) is the position."""
        from torchdata.stateful_dataloader import StatefulDataLoader
        files = [f"{cfg.folder}/{'train' if train else 'val'}{i}.jsonl" for i in range(4)]
        return StatefulDataLoader(Shards(files), batch_size=cfg.batch_size, num_workers=cfg.num_workers if train else 0)
''')
TRAIN, VAL, SHARDS = 64, 12, 4  # 16 samples per shard: whole batches of 4 and 8 per worker, so the stream ends on a step
# Global batch 8: 8 optimizer steps per epoch, 16 in all. Saves at 5 (epoch 0, 40 samples in) and 10; killed in step 7.
COMMON = ("epochs=2", "checkpoint_every=5", "seed=11", "log_every=1", "lr=0.1")
KILL_AT_FORWARD, LAST_SAVED = 7, 5


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream_resume")
    (folder / "stream.py").write_text(STREAM_PROJECT)
    rng, next_id = random.Random(0), 0
    for split, count in (("train", TRAIN), ("val", VAL)):
        for shard in range(SHARDS):
            with open(folder / f"{split}{shard}.jsonl", "w") as f:
                for _ in range(count // SHARDS):
                    x = [rng.gauss(0, 1) for _ in range(4)]
                    f.write(json.dumps({"id": next_id, "x": x, "y": int(x[0] > 0)}) + "\n")
                    next_id += 1
    return folder


LOADERS = {  # source -> (loader function, data_args beyond the folder)
    "user": ("get_dataloader", ""),  # a stateful IterableDataset (read through a StatefulDataLoader with workers)
    "hf": ("get_hf_dataloader", ""),  # datasets.IterableDataset: its state_dict()
    "hf_buffer": ("get_hf_dataloader", ", buffer: 16"),  # shuffled with a buffer: replayed
    "plain": ("get_plain_dataloader", ""),  # no state: replayed
    "stateful": ("get_stateful_dataloader", ""),  # the user's own StatefulDataLoader
}


def _args(project: Path, out: Path, source: str, nproc: int, num_workers: int, *extra: str) -> list[str]:
    loader, data_args = LOADERS[source]
    return [
        f"model={project / 'stream.py'}:Model",
        f"data={project / 'stream.py'}:{loader}",
        f"data_args={{folder: {project}{data_args}}}",
        f"output_dir={out}",
        "progress=false",
        "plot=false",
        "resume=auto",
        f"batch_size={8 // nproc}",
        f"num_workers={num_workers}",
        *COMMON,
        *extra,
    ]


def _ids(folder: Path, steps: int | None = None) -> collections.Counter:
    """The ids trained on per rank file, of the first `steps` forwards (one per step) or all."""
    return collections.Counter(
        int(i) for path in folder.glob("rank*.txt") for line in path.read_text().splitlines()[:steps] for i in line.split()
    )


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under the checkpoints, with its size and mtime: 'no checkpoint touched' compares these."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in (out / "checkpoints").rglob("*") if p.is_file()}


CASES = [  # (source, processes, num_workers, extra): every source on 2 processes, and 1 process with 0 and 2 workers
    ("user", 1, 0, ()),
    ("user", 2, 2, ()),
    ("hf", 1, 2, ()),
    ("hf", 2, 0, ()),
    ("hf_buffer", 2, 2, ()),
    ("plain", 2, 0, ()),
    ("stateful", 2, 2, ()),
]


# Each case is three real runs (~20 s on 2 cores), so the suite runs a sample of them: one 1-process case and one
# 2-process case, drawn by DIST_TRAIN_MATRIX_SEED (see helpers.sample_cases); DIST_TRAIN_FULL_MATRIX=1 runs all 7.
def _sample(cases: list[tuple]) -> list[tuple]:
    if FULL_MATRIX:
        return cases
    rng = random.Random(f"{MATRIX_SEED}/sigkill")
    return rng.sample([c for c in cases if c[1] == 1], 1) + rng.sample([c for c in cases if c[1] > 1], 1)


SAMPLED = _sample(CASES)


@pytest.mark.parametrize("source, nproc, num_workers, extra", sampled_params(CASES, SAMPLED, unpack=True), ids=lambda v: str(v))
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(project, tmp_path, source, nproc, num_workers, extra):
    """A sampled matrix (see SAMPLED above): DIST_TRAIN_MATRIX_SEED=N picks other cases, and
    `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_streaming_resume.py -k sigkill` runs all 7."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    ids_killed, ids_resumed = tmp_path / "ids_killed", tmp_path / "ids_resumed"
    ids_killed.mkdir(), ids_resumed.mkdir()
    _, killed = run_clis(  # the uninterrupted run beside the one that is killed
        {"args": _args(project, reference, source, nproc, num_workers, *extra), "nproc": nproc},
        {
            "args": _args(project, out, source, nproc, num_workers, *extra),
            "nproc": nproc,
            "check": False,
            "env": {"KILL_AT_FORWARD": str(KILL_AT_FORWARD), "IDS_DIR": str(ids_killed)},
        },
    )
    assert killed.returncode != 0 and not (out / "model.safetensors").exists()
    saved = out / "checkpoints" / f"step_{LAST_SAVED:08d}"
    manifest = read_manifest(saved)
    assert manifest["samples_consumed"] == 40 and "data_state.pt" in manifest["files"]  # hashed like every file
    resumed = run_cli(_args(project, out, source, nproc, num_workers, *extra), nproc=nproc, env={"IDS_DIR": str(ids_resumed)})
    assert f"at optimizer step {LAST_SAVED} (epoch 0, 40 samples into it" in resumed.stdout
    got, want = load_weights(out), load_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run"
    # The killed run's first 5 steps, then the resumed run: each id once per epoch (2 epochs).
    assert _ids(ids_killed, LAST_SAVED) + _ids(ids_resumed) == collections.Counter({i: 2 for i in range(TRAIN)})


def test_sync_and_async_checkpoints_hold_the_same_files_and_resume_alike(project, tmp_path):
    modes = ("false", "true")
    for mode in modes:
        (tmp_path / f"ids_{mode}").mkdir()
    env = {mode: {"IDS_DIR": str(tmp_path / f"ids_{mode}")} for mode in modes}
    run_clis(*({"args": _args(project, tmp_path / m, "user", 1, 2, "max_steps=5", f"async_checkpoint={m}"), "env": env[m]} for m in modes))
    names = {m: set(read_manifest(tmp_path / m / "checkpoints" / "step_00000005")["files"]) for m in modes}
    resumed = run_clis(*({"args": _args(project, tmp_path / m, "user", 1, 2, f"async_checkpoint={m}"), "env": env[m]} for m in modes))
    weights = {}
    for mode, result in zip(modes, resumed):
        assert "at optimizer step 5 (epoch 0, 40 samples into it" in result.stdout
        assert _ids(tmp_path / f"ids_{mode}") == collections.Counter({i: 2 for i in range(TRAIN)})
        weights[mode] = load_weights(tmp_path / mode)
    assert names["false"] == names["true"] and "data_state.pt" in names["true"]
    assert all(torch.equal(weights["false"][k], weights["true"][k]) for k in weights["false"])


THREE_RANK_CASES = [("user", 2), ("hf_buffer", 0)]  # one drawn by DIST_TRAIN_MATRIX_SEED (~25 s each)


@pytest.mark.parametrize(
    "source, num_workers", sampled_params(THREE_RANK_CASES, sample_cases("three_ranks", THREE_RANK_CASES), unpack=True)
)
def test_three_ranks_train_each_id_once_per_epoch_across_a_kill(project, tmp_path, source, num_workers):
    """Global batch 6 does not divide the 64 samples: the last global batch, 4 samples, is split 2, 2 and a stand-in
    (weight 0) on rank 2; nothing is left out and nothing trained twice (filling the batch would)."""
    out, ids_killed, ids_resumed = tmp_path / "run", tmp_path / "ids_killed", tmp_path / "ids_resumed"
    ids_killed.mkdir(), ids_resumed.mkdir()
    args = [*_args(project, out, source, 3, num_workers), "batch_size=2"]
    killed = run_cli(args, nproc=3, check=False, env={"KILL_AT_FORWARD": str(KILL_AT_FORWARD), "IDS_DIR": str(ids_killed)})
    assert killed.returncode != 0
    resumed = run_cli(args, nproc=3, env={"IDS_DIR": str(ids_resumed)})
    assert f"at optimizer step {LAST_SAVED} (epoch 0, 30 samples into it" in resumed.stdout
    assert "left out" not in resumed.stdout
    seen = _ids(ids_killed, LAST_SAVED) + _ids(ids_resumed)
    assert seen == collections.Counter({i: 2 for i in range(TRAIN)})  # each id once per epoch


def test_another_world_size_continues_the_stream_exactly_once(project, tmp_path):
    """2 processes x 4 -> 1 process x 4: the same batches of 4 on rank 0, so the saved state still fits."""
    out, ids_killed, ids_resumed = tmp_path / "run", tmp_path / "ids_killed", tmp_path / "ids_resumed"
    ids_killed.mkdir(), ids_resumed.mkdir()
    run_cli(
        _args(project, out, "user", 2, 2), nproc=2, check=False, env={"KILL_AT_FORWARD": str(KILL_AT_FORWARD), "IDS_DIR": str(ids_killed)}
    )
    resumed = run_cli([*_args(project, out, "user", 2, 2), "batch_size=4"], env={"IDS_DIR": str(ids_resumed)})
    assert "written by 2 processes" in resumed.stdout
    assert _ids(ids_killed, LAST_SAVED) + _ids(ids_resumed) == collections.Counter({i: 2 for i in range(TRAIN)})


# ---- refusals: one line, exit 2, no checkpoint touched ----------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_mid_epoch(project, tmp_path_factory) -> Path:
    """A run that ends at step 5, mid-epoch 0 (a data_state.pt in its checkpoint)."""
    out = tmp_path_factory.mktemp("mid_epoch") / "run"
    run_cli(_args(project, out, "user", 1, 0, "max_steps=5"))
    return out


def _refused(result, *needles: str) -> str:
    # One process exits 2; under the launcher a rank exits 2 and the launcher reports it (exitcode 2) and exits 1.
    assert result.returncode == 2 or (result.returncode == 1 and "exitcode  : 2" in result.stderr), result.stderr[-2000:]
    lines = [line[line.index("dist-train: error:") :] for line in result.stderr.splitlines() if "dist-train: error:" in line]
    assert lines, result.stderr[-3000:]
    line = lines[0]  # every rank prints the same line
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("nproc, empty, expected", [(1, "all", "yields nothing;"), (2, "1", "yields nothing on rank(s) [1]")])
def test_an_empty_stream_is_refused_before_training(project, stopped_mid_epoch, nproc, empty, expected):
    before = _files(stopped_mid_epoch)
    result = run_cli(_args(project, stopped_mid_epoch, "user", nproc, 0), nproc=nproc, check=False, env={"EMPTY": empty})
    _refused(result, "Shards", expected)
    assert _files(stopped_mid_epoch) == before


def test_a_failing_load_state_dict_names_the_dataset_and_the_checkpoint(project, stopped_mid_epoch):
    before = _files(stopped_mid_epoch)
    result = run_cli(_args(project, stopped_mid_epoch, "user", 1, 0), check=False, env={"FAIL_LOAD": "1"})
    _refused(result, "Shards.load_state_dict() failed", "step_00000005", "ValueError: shard state {'file': 2, 'line': 8}")
    assert _files(stopped_mid_epoch) == before


def test_a_stream_without_a_state_is_still_refused_mid_epoch(project, stopped_mid_epoch, tmp_path):
    """A checkpoint without data_state.pt (an older dist_train, or a stream without state_dict) is never restarted."""
    out = tmp_path / "run"
    run_cli(_args(project, out, "user", 1, 0, "max_steps=5"))
    step = out / "checkpoints" / "step_00000005"
    (step / "data_state.pt").unlink()
    from dist_train.checkpoint.manifest import write_manifest

    manifest = read_manifest(step)
    write_manifest(step, {k: v for k, v in manifest.items() if k != "files"})
    _refused(run_cli(_args(project, out, "user", 1, 0), check=False), "cannot be restarted at that position", "state_dict()")


def test_a_replayed_stream_that_does_not_repeat_itself_is_refused(project, tmp_path):
    out = tmp_path / "run"
    run_cli(_args(project, out, "plain", 1, 0, "max_steps=5"), env={"UNSEEDED": "1"})
    before = _files(out)
    result = run_cli(_args(project, out, "plain", 1, 0), check=False, env={"UNSEEDED": "1"})
    _refused(result, "step_00000005", "gave other batches when epoch 0 was read again", "Lines is not the same stream")
    assert _files(out) == before


def test_a_stream_in_unseeded_random_order_on_two_ranks_is_refused_before_training(project, tmp_path):
    """Unseeded augmentation: the ranks start with other samples, and so does each read. Taken for a stream split
    per rank, every rank would train on all of it (tests/test_split_streams.py has the real split)."""
    result = run_cli(_args(project, tmp_path / "run", "plain", 2, 0), nproc=2, check=False, env={"UNSEEDED": "noise"})
    _refused(result, "Lines", "starts with another sample each time it is read on rank(s) [0, 1]", "Seed its randomness")


def test_a_map_style_dataset_whose_length_changed_is_refused_mid_epoch(tmp_path):
    folder = write_seed_project(tmp_path / "seed", num_train=128)
    out = tmp_path / "run"
    run_cli(seed_project_args(folder, out, "batch_size=8", "max_steps=5"))  # 16 steps per epoch: step 5 is mid-epoch
    assert read_manifest(out / "checkpoints" / "step_00000005")["dataset_length"] == 128
    write_seed_project(folder, num_train=120)  # the data changed under the run
    before = _files(out)
    result = run_cli(seed_project_args(folder, out, "batch_size=8", "epochs=1", "resume=auto"), check=False)
    _refused(result, "step_00000005", "training set of 128 samples, and it now has 120")
    assert _files(out) == before
