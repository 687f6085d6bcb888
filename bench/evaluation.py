"""`dist-train evaluate` and `predict` throughput against a hand-written `torch.no_grad()` loop over the same data.

    python -m bench.evaluation [--samples 40000] [--pairs 3] [--json out.json]
    python -m bench.evaluation --smoke

One process, one thread. A run folder is made first (config.yaml and model.safetensors of an MLP,
256 -> 1024 -> 1024 -> 10); both arms then start from it, as a user would: build the model, load the
safetensors weights, read the set (an in-memory TensorDataset, batch 512) and
- evaluate: the hand loop sums the cross-entropy, the right argmaxes and the top-5 hits; dist_train runs
  `inference.run_evaluate` (the exact loss, accuracy and a `top5_accuracy` metric);
- predict: the hand loop keeps the outputs and writes one safetensors file per 4096 samples;
  dist_train runs `inference.run_predict` into a fresh folder (parts of 4096, manifest with hashes).
Each arm is timed whole (start-up included: dist_train's Accelerator and config checks are part of
what a user waits for), in alternating pairs, by the wall clock and by this process's CPU time (one
thread: the CPU time is what other jobs on a shared machine perturb least); the ratio is hand-loop time
over dist_train time (throughput ratio, > 1: dist_train faster).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from .arms import _reset_accelerate

FEATURES, HIDDEN, CLASSES, BATCH, PART = 256, 1024, 10, 512, 4096


def Mlp() -> nn.Module:  # noqa: N802 (a model factory, named like the class it returns)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def tensors(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def get_dataloader(cfg, train):
    return DataLoader(TensorDataset(*tensors(cfg.samples)), batch_size=cfg.batch_size)


def make_run(folder: Path, samples: int) -> Path:
    from dist_train.config import load_config

    cfg = load_config(
        None,
        [],
        model="bench.evaluation:Mlp",
        data="bench.evaluation:get_dataloader",
        data_args={"samples": samples},
        batch_size=BATCH,
        metrics=["top5_accuracy"],
        output_dir=str(folder),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    save_file(Mlp().state_dict(), str(folder / "model.safetensors"))
    return folder


def _hand_model(run: Path) -> nn.Module:
    model = Mlp()
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def hand_evaluate(run: Path, samples: int) -> dict:
    model = _hand_model(run)
    loss_sum, right, top5, count = 0.0, 0, 0, 0
    for x, y in DataLoader(TensorDataset(*tensors(samples)), batch_size=BATCH):
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        right += (out.argmax(-1) == y).sum().item()
        top5 += (out.topk(5, dim=-1).indices == y[:, None]).any(-1).sum().item()
        count += len(y)
    return {"loss": loss_sum / count, "accuracy": right / count, "top5_accuracy": top5 / count}


@torch.no_grad()
def hand_predict(run: Path, samples: int, out: Path) -> None:
    model = _hand_model(run)
    out.mkdir(parents=True)
    pieces, part = [], 0
    for x, _ in DataLoader(TensorDataset(*tensors(samples)), batch_size=BATCH):
        pieces.append(model(x))
        if sum(len(p) for p in pieces) >= PART:  # PART is a multiple of BATCH
            save_file({"outputs": torch.cat(pieces)}, str(out / f"part-{part:06d}.safetensors"))
            pieces, part = [], part + 1
    if pieces:
        save_file({"outputs": torch.cat(pieces)}, str(out / f"part-{part:06d}.safetensors"))


def dist_train_evaluate(run: Path) -> dict:
    from dist_train.inference import run_evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        report = run_evaluate(str(run))
    _reset_accelerate()
    return report["metrics"]


def dist_train_predict(run: Path, out: Path) -> None:
    from dist_train.inference import run_predict

    with contextlib.redirect_stdout(io.StringIO()):
        run_predict(str(run), str(out), shard_samples=PART)
    _reset_accelerate()


def _timed(fn, *args) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (one thread: the CPU time is what a busy machine
    shared with other jobs perturbs least)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2000 samples, 1 pair: checks that it runs")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    samples, pairs = (2000, 1) if args.smoke else (args.samples, args.pairs)
    torch.set_num_threads(1)
    report = {"samples": samples, "pairs": pairs, "threads": 1, "batch": BATCH, "part_samples": PART}
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", samples)
        hand, ours = hand_evaluate(run, samples), dist_train_evaluate(run)
        # the two arms compute the same thing (dist_train's sum is float64, the hand loop's float64 too)
        report["same_result"] = (
            abs(hand["loss"] - ours["val_loss"]) <= 1e-6 * hand["loss"]
            and hand["accuracy"] == ours["val_accuracy"]
            and hand["top5_accuracy"] == ours["val_top5_accuracy"]
        )
        for name, hand_arm, our_arm in (
            ("evaluate", lambda i: hand_evaluate(run, samples), lambda i: dist_train_evaluate(run)),
            (
                "predict",
                lambda i: hand_predict(run, samples, Path(tmp) / f"hand{i}"),
                lambda i: dist_train_predict(run, Path(tmp) / f"ours{i}"),
            ),
        ):
            times = {"hand": [], "dist_train": []}
            for i in range(pairs):
                times["hand"].append(_timed(hand_arm, i))
                times["dist_train"].append(_timed(our_arm, i))
            report[name] = {}
            for clock, k in (("wall", 0), ("cpu", 1)):
                ratios = [h[k] / d[k] for h, d in zip(times["hand"], times["dist_train"])]
                report[name][clock] = {
                    "hand_samples_per_s": samples / statistics.median(t[k] for t in times["hand"]),
                    "dist_train_samples_per_s": samples / statistics.median(t[k] for t in times["dist_train"]),
                    "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)},
                }
    for name in ("evaluate", "predict"):
        for clock, r in report[name].items():
            print(
                f"{name:<9} {clock:<4} hand {r['hand_samples_per_s']:9.0f} samples/s   dist_train {r['dist_train_samples_per_s']:9.0f} samples/s   "
                f"ratio {r['ratio']['median']:.3f} ({r['ratio']['min']:.3f}-{r['ratio']['max']:.3f}, {pairs} pairs)"
            )
    print(f"same result: {report['same_result']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
