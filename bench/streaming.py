"""Streaming throughput: dist_train against the same hand-written loop over the same IterableDataset.

    python -m bench.streaming [--steps 300] [--window 50] [--pairs 3] [--stateful]

The data is a user `IterableDataset` reading jsonl shard files line by line (written to a temp folder
first), the model an MLP of `--width` (the `mlp` workload's size), AdamW at a constant rate, batch 64,
one process, one thread. The seed arm is the loop a user writes over `DataLoader(dataset)`; the
dist_train arm is `dist_train.train` on the same dataset, model and optimizer. Both are timed by
`bench.arms.StepClock` (the optimizer-step hook), first window excluded, in alternating pairs.
`--stateful` gives the dataset `state_dict()`/`load_state_dict()`, so dist_train records the stream's
position after every batch (what makes a mid-epoch resume exact); without it dist_train records a
fingerprint of every batch instead (a resume replays the epoch and checks it). The report also times
one `state_dict()` copy, one `load_state_dict()` and one batch fingerprint.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from .arms import StepClock, _reset_accelerate

FEATURES, CLASSES, BATCH = 64, 10, 64


class JsonlStream(IterableDataset):
    """Samples read line by line from jsonl shards (no __len__), as a user's streaming dataset does."""

    def __init__(self, files: list[str]):
        self.files = files

    def __iter__(self):
        for path in self.files:
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    yield torch.tensor(record["x"]), record["y"]


class StatefulJsonlStream(JsonlStream):
    """The same stream with a position: (file, line) of the next sample."""

    def __init__(self, files: list[str]):
        super().__init__(files)
        self._file, self._line = 0, 0

    def state_dict(self) -> dict:
        return {"file": self._file, "line": self._line}

    def load_state_dict(self, state: dict) -> None:
        self._file, self._line = state["file"], state["line"]

    def __iter__(self):
        start_file, start_line = self._file, self._line
        for index in range(start_file, len(self.files)):
            with open(self.files[index]) as f:
                for number, line in enumerate(f):
                    if index == start_file and number < start_line:
                        continue
                    self._file, self._line = index, number + 1
                    record = json.loads(line)
                    yield torch.tensor(record["x"]), record["y"]
        self._file, self._line = 0, 0


def build_model(width: int = 512) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, CLASSES)
    )


def get_dataloader(cfg, train: bool) -> DataLoader:
    files = json.loads(Path(cfg.files_json).read_text())["train" if train else "val"]
    stream = (StatefulJsonlStream if cfg.stateful else JsonlStream)(files)
    return DataLoader(stream, batch_size=cfg.batch_size)


def write_shards(folder: Path, samples: int, shards: int = 4) -> Path:
    rng = random.Random(0)
    files = {"train": [], "val": []}
    for split, count in (("train", samples), ("val", BATCH)):
        for shard in range(shards):
            path = folder / f"{split}{shard}.jsonl"
            with open(path, "w") as f:
                for _ in range(count // shards):
                    x = [rng.gauss(0, 1) for _ in range(FEATURES)]
                    f.write(json.dumps({"x": x, "y": int(x[0] > 0) + 2 * int(x[1] > 0)}) + "\n")
            files[split].append(str(path))
    (folder / "files.json").write_text(json.dumps(files))
    return folder / "files.json"


def seed_arm(files_json: Path, steps: int, window: int, stateful: bool) -> list[float]:
    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = argparse.Namespace(files_json=str(files_json), stateful=stateful, batch_size=BATCH)
    with StepClock(window, "cpu") as clock:
        for step, (inputs, targets) in enumerate(get_dataloader(cfg, True), start=1):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            if step == steps:
                break
    return clock.window_times()


def dist_train_arm(files_json: Path, steps: int, window: int, stateful: bool) -> list[float]:
    from dist_train.config import load_config
    from dist_train.loop import train

    with tempfile.TemporaryDirectory(prefix="bench-stream-") as out:
        cfg = load_config(
            None,
            model="bench.streaming:build_model",
            data="bench.streaming:get_dataloader",
            data_args={"files_json": str(files_json), "stateful": stateful},
            batch_size=BATCH,
            lr=1e-3,
            max_steps=steps,
            log_every=window,
            progress=False,
            output_dir=out,
            resume="never",
            checkpoint_epochs=False,
            checkpoints=False,
            cpu=True,
        )
        with contextlib.redirect_stdout(io.StringIO()), StepClock(window, "cpu") as clock:
            try:
                train(cfg)
            finally:
                _reset_accelerate()
    return clock.window_times()


def state_costs(files_json: Path, repeats: int = 1000) -> tuple[float, float]:
    """Seconds for one deep copy of the stream's state and one load of it."""
    stream = StatefulJsonlStream(json.loads(files_json.read_text())["train"])
    iterator = iter(stream)
    for _ in range(100):
        next(iterator)
    start = time.perf_counter()
    for _ in range(repeats):
        state = copy.deepcopy(stream.state_dict())
    save_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        stream.load_state_dict(state)
    return save_s, (time.perf_counter() - start) / repeats


def fingerprint_cost(repeats: int = 1000) -> float:
    """Seconds to fingerprint one batch, the position a stream without a state records (streams.replay)."""
    from dist_train.data.streams import fingerprint

    batch = (torch.randn(BATCH, FEATURES), torch.randint(0, CLASSES, (BATCH,)))
    start = time.perf_counter()
    for _ in range(repeats):
        fingerprint(batch)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--stateful", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as folder:
        files_json = write_shards(Path(folder), (args.steps + 2) * BATCH)
        seed, ours = [], []
        for _ in range(args.pairs):  # alternating, so a slow phase of the machine hits both arms
            seed.append(median(seed_arm(files_json, args.steps, args.window, args.stateful)))
            ours.append(median(dist_train_arm(files_json, args.steps, args.window, args.stateful)))
        ratios = [s / o for s, o in zip(seed, ours)]
        kind = "stateful (position recorded after every batch)" if args.stateful else "plain"
        print(f"stream: {kind} IterableDataset over 4 jsonl shards, batch {BATCH}, {args.steps} steps, {args.pairs} pairs")
        print(f"seed loop:  median step {median(seed) * 1e3:.2f} ms ({BATCH / median(seed):.0f} samples/s)")
        print(f"dist_train: median step {median(ours) * 1e3:.2f} ms ({BATCH / median(ours):.0f} samples/s)")
        print(f"throughput dist_train / seed: {median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
        save_s, load_s = state_costs(files_json)
        print(f"stream position: state_dict copy {save_s * 1e6:.1f} µs, load_state_dict {load_s * 1e6:.1f} µs")
        print(f"replayed stream (no state): fingerprint of a batch {fingerprint_cost() * 1e6:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
