"""Metrics on several evaluation sets, `dist-train evaluate` and `dist-train predict`: exact on every world size.

One frozen training (lr=0) on 1, 2 and 3 ranks logs the loss and every kind of metric (built-ins, a
torchmetrics F1, two user functions) on four sets: the validation set (101 samples, batch 8: the size
divides neither the batch nor the ranks), a stream without a length (37), a map-style set read through
the user's SubsetRandomSampler (53 of 90), a soft-label set with its own metrics and interval, and a
set read through the user's batch_sampler (batches of 5, 7 and 3: 7 batches of 31 samples). Each
value must equal the metric computed here in one process, in float64, over the whole set.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train.checkpoint import read_manifest
from dist_train.config import load_config
from dist_train.errors import UserError
from helpers import cli_command, import_file, load_weights, read_metrics, run_cli, run_clis

PROJECT = '''
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset, SubsetRandomSampler, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


def tensors(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


class Stream(IterableDataset):
    """A stream without a length; SLOW_S makes each sample take that long (for a kill mid-way)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(len(self.y)):
            if os.environ.get("SLOW_S"):
                time.sleep(float(os.environ["SLOW_S"]))
            yield self.x[i], self.y[i]


def get_dataloader(cfg, train, split=None):
    if train:
        return TensorDataset(*tensors(0, 64))
    if split is None:
        return DataLoader(TensorDataset(*tensors(1, 101)), batch_size=cfg.batch_size)
    if split == "stream":
        return DataLoader(Stream(*tensors(2, 37)), batch_size=cfg.batch_size)
    raise ValueError(split)


SAMPLED = range(5, 58)


def sampled(cfg):
    x, y = tensors(3, 90)
    sampler = SubsetRandomSampler(SAMPLED, generator=torch.Generator().manual_seed(7))
    return DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, sampler=sampler)


def soft_data():
    x, _ = tensors(4, 23)
    return x, torch.softmax(torch.randn(23, 4, generator=torch.Generator().manual_seed(5)), -1)


def soft(cfg):
    return DataLoader(TensorDataset(*soft_data()), batch_size=cfg.batch_size)


class Buckets(torch.utils.data.Sampler):
    """Batches of 5, 7 and 3 samples in turn: 31 samples make 7 batches."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        start, sizes = 0, [5, 7, 3]
        while start < self.n:
            yield list(range(start, min(start + sizes[0], self.n)))
            start += sizes[0]
            sizes = sizes[1:] + sizes[:1]


def bucketed(cfg):
    return DataLoader(TensorDataset(*tensors(6, 31)), batch_sampler=Buckets(31))


def margin(outputs, targets):
    top2 = outputs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def hits(outputs, targets):
    return (outputs.argmax(-1) == targets).sum(), len(targets)
'''

CONFIG = """
model: {proj}:Net
data: {proj}:get_dataloader
epochs: 1
lr: 0.0
batch_size: 8
progress: false
plot: false
resume: never
monitor: val_f1
monitor_mode: max
keep_best: true
metrics:
  - accuracy
  - top2_accuracy
  - {{name: f1, metric: "torchmetrics.classification:MulticlassF1Score", args: {{num_classes: 4, average: macro}}}}
  - {{name: margin, metric: "{proj}:margin"}}
  - {{name: hits, metric: "{proj}:hits"}}
eval_sets:
  stream: {{}}
  sampled: {proj}:sampled
  soft: {{data: "{proj}:soft", every: 2, metrics: [mse, mae, {{name: margin, metric: "{proj}:margin"}}]}}
  bucketed: {proj}:bucketed
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same frozen training on 1, 2 and 3 ranks, at once."""
    folder = tmp_path_factory.mktemp("evalsets")
    (folder / "proj.py").write_text(PROJECT)
    (folder / "run.yaml").write_text(CONFIG.format(proj=folder / "proj.py"))
    outs = {n: folder / f"ranks{n}" for n in (1, 2, 3)}
    run_clis(*({"args": ["--config", str(folder / "run.yaml"), f"output_dir={outs[n]}"], "nproc": n} for n in outs))
    return folder, outs


def _reference(folder: Path, weights: dict) -> dict:
    """Every set's loss and metrics computed here, in one process, in float64, from the saved weights."""
    from sklearn.metrics import f1_score

    proj = import_file(folder / "proj.py")
    model = proj.Net().double()
    model.load_state_dict({k: v.double() for k, v in weights.items()})
    x, y = proj.tensors(1, 101)
    stream_x, stream_y = proj.tensors(2, 37)
    sampled_x, sampled_y = (t[list(proj.SAMPLED)] for t in proj.tensors(3, 90))
    sets = {"val": (x, y), "stream": (stream_x, stream_y), "sampled": (sampled_x, sampled_y), "bucketed": proj.tensors(6, 31)}
    expected = {}
    with torch.no_grad():
        for name, (inputs, targets) in sets.items():
            out = model(inputs.double())
            predicted = out.argmax(-1)
            top2 = out.topk(2, -1)
            expected[name] = {
                f"{name}_loss": torch.nn.functional.cross_entropy(out, targets).item(),
                f"{name}_samples": len(targets),
                f"{name}_accuracy": (predicted == targets).double().mean().item(),
                f"{name}_top2_accuracy": (top2.indices == targets[:, None]).any(-1).double().mean().item(),
                f"{name}_f1": f1_score(targets.numpy(), predicted.numpy(), average="macro", labels=range(4), zero_division=0),
                f"{name}_margin": (top2.values[:, 0] - top2.values[:, 1]).mean().item(),
                f"{name}_hits": (predicted == targets).double().mean().item(),
            }
        soft_x, soft_y = (t.double() for t in proj.soft_data())
        out = model(soft_x)
        top2 = out.topk(2, -1).values
        expected["soft"] = {
            "soft_loss": torch.nn.functional.cross_entropy(out, soft_y).item(),
            "soft_samples": 23,
            "soft_mse": ((out - soft_y) ** 2).mean().item(),
            "soft_mae": (out - soft_y).abs().mean().item(),
            "soft_margin": (top2[:, 0] - top2[:, 1]).mean().item(),
        }
    return expected


COUNTED = ("accuracy", "hits", "samples")  # from argmaxes and counts, summed in float64: exact


def _assert_equal(logged: dict, expected: dict) -> None:
    for key, value in expected.items():
        # the rest: a float32 forward (and torchmetrics' float32 F1 arithmetic) against float64
        tolerance = 1e-12 if key.endswith(COUNTED) else 2e-6 * abs(value)
        assert abs(logged[key] - value) <= tolerance, (key, logged[key], value)


def test_every_metric_on_1_2_3_ranks_is_the_whole_set_metric_in_float64(runs):
    folder, outs = runs
    weights = load_weights(outs[1])
    for n in (2, 3):  # lr=0: every run ends with the initial weights, so all evaluate the same model
        assert all(torch.equal(weights[k], v) for k, v in load_weights(outs[n]).items())
    expected = _reference(folder, weights)
    for n, out in outs.items():
        records = read_metrics(out)
        final = [r for r in records if "val_loss" in r][-1]
        assert final["num_processes"] == n
        for name in ("val", "stream", "sampled", "soft", "bucketed"):
            _assert_equal(final, expected[name])
        # keep_best ranks the checkpoints by the torchmetrics F1 the validation logged
        (checkpoint,) = (out / "checkpoints").glob("step_*")
        assert read_manifest(checkpoint)["monitor"] == {"name": "val_f1", "mode": "max", "value": final["val_f1"]}
        # soft has its own interval: every 2 optimizer steps, alone, and at the last step with the rest
        alone = [r["step"] for r in records if "soft_loss" in r and "val_loss" not in r]
        steps = final["step"]
        assert alone == [s for s in range(2, steps, 2)], (n, alone)
        assert all(
            set(r) == {"epoch", "step", "num_processes", *expected["soft"]} for r in records if r["step"] in alone and "soft_loss" in r
        )


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluate_reports_what_the_run_logged_on_1_and_2_ranks_and_leaves_the_run_alone(runs, tmp_path):
    folder, outs = runs
    logged = {n: [r for r in read_metrics(outs[n]) if "val_loss" in r][-1] for n in (1, 2)}
    (checkpoint,) = sorted((outs[2] / "checkpoints").glob("step_*"))
    before = _files(outs[1]), _files(outs[2])
    one, two, wrong = run_clis(
        {"args": [str(outs[1])], "subcommand": "evaluate"},
        {"args": [str(checkpoint), "--set", "sampled", "--out", str(tmp_path / "report.json")], "nproc": 2, "subcommand": "evaluate"},
        {"args": [str(outs[1]), "--set", "nope"], "subcommand": "evaluate", "check": False},
    )
    report = json.loads(one.stdout)
    assert (report["set"], report["num_processes"], report["optimizer_step"]) == ("val", 1, logged[1]["step"])
    assert {k: report["metrics"][k] for k in logged[1] if k.startswith("val_")} == {
        k: v for k, v in logged[1].items() if k.startswith("val_")
    }
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["set"], report["num_processes"], report["source"]) == ("sampled", 2, str(checkpoint.resolve()))
    for key, value in logged[2].items():
        if key.startswith("sampled_"):
            assert report["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert wrong.returncode == 2
    assert "dist-train: error: --set 'nope' is not a set of this run; choose one of: val, stream, sampled, soft, bucketed" in wrong.stderr
    assert (_files(outs[1]), _files(outs[2])) == before  # nothing written, nothing touched


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_predict_writes_the_same_files_on_1_2_3_ranks_each_sample_once(runs, tmp_path):
    folder, outs = runs
    preds = {n: tmp_path / f"preds{n}" for n in (1, 2, 3)}
    run_clis(
        *({"args": [str(outs[1]), "--out", str(p), "--shard-samples", "16"], "nproc": n, "subcommand": "predict"} for n, p in preds.items())
    )
    _same_files(preds[1], preds[2])
    _same_files(preds[1], preds[3])
    manifest = json.loads((preds[1] / "manifest.json").read_text())
    assert manifest["num_samples"] == 101 and [p["count"] for p in manifest["parts"]] == [16] * 6 + [5]
    parts = [load_file(str(preds[1] / p["file"])) for p in manifest["parts"]]
    assert torch.equal(torch.cat([p["index"] for p in parts]), torch.arange(101))  # each sample once, in order
    proj = import_file(folder / "proj.py")
    model = proj.Net()
    model.load_state_dict(load_weights(outs[1]))
    with torch.no_grad():
        expected = model(proj.tensors(1, 101)[0])
    assert torch.allclose(torch.cat([p["outputs"] for p in parts]), expected, rtol=1e-6, atol=1e-6)


def test_predict_killed_mid_way_then_rerun_writes_the_uninterrupted_files(runs, tmp_path):
    """A stream without a length, 4 samples a part: SIGKILL once two parts are written, then run again."""
    _, outs = runs
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = lambda out: [str(outs[1]), "--set", "stream", "--out", str(out), "--shard-samples", "4"]
    reference = subprocess.Popen(cli_command(args(straight), 2, "predict"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    slow = subprocess.Popen(
        cli_command(args(killed), 1, "predict"),
        env={**os.environ, "OMP_NUM_THREADS": "1", "SLOW_S": "0.25"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while len(list(killed.glob("part-*.safetensors"))) < 2 and slow.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    slow.send_signal(signal.SIGKILL)
    assert slow.wait() == -signal.SIGKILL  # killed mid-way, not finished
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed.glob("part-*.safetensors")}
    assert 2 <= len(written) < math.ceil(37 / 4) and not (killed / "manifest.json").exists()
    run_cli(args(killed), subcommand="predict")
    assert reference.wait(timeout=300) == 0
    _same_files(straight, killed)
    # the parts written before the kill were kept, not computed again
    assert {name: (killed / name).stat() for name in written} and all(
        ((killed / name).stat().st_ino, (killed / name).stat().st_mtime_ns) == stamp for name, stamp in written.items()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["metrics=[f2]"], "metrics: 'f2' is no built-in metric (accuracy, topK_accuracy such as top5_accuracy, mse, mae)"),
        (["metrics=[{metric: m.py:f, args: 3}]"], "metrics: 'args' of metric 'f' must be a mapping of keyword arguments, not 3."),
        (["metrics=[mse, mse]"], "metrics: the name 'mse' is given twice"),
        (["eval_sets={val: {}}"], "eval_sets: set name 'val' must be a word of letters, digits and _, other than val and train."),
        (["eval_sets={test: {every: 0}}"], "eval_sets.test: every 0 must be a number of optimizer steps >= 1"),
        (["eval_sets={test: {shuffle: true}}"], "eval_sets.test: unknown key 'shuffle'; a set takes data, split, every and metrics."),
        (
            ["metrics=[mae]", "eval_sets={test: {}, ood: {every: 5}}", "monitor=ood_loss"],
            "monitor: 'ood_loss' is never logged by validation; choose one of: val_loss, val_accuracy, train_loss, val_mae, test_loss, test_accuracy, test_mae.",
        ),
    ],
)
def test_a_wrong_metric_set_or_monitor_is_one_line_at_start(overrides, message):
    with pytest.raises(UserError) as caught:
        load_config(None, overrides)
    assert message in str(caught.value)


def test_monitor_may_name_any_metric_of_a_set_evaluated_with_validation():
    cfg = load_config(None, ["metrics=[top5_accuracy]", "eval_sets={test: {metrics: [mae]}}", "monitor=test_mae", "monitor_mode=min"])
    assert cfg.monitor == "test_mae"
    assert load_config(None, ["metrics=[top5_accuracy]", "monitor=val_top5_accuracy"]).monitor == "val_top5_accuracy"


def test_a_torchmetrics_metric_needs_torchmetrics_installed(tmp_path):
    """Without torchmetrics (hidden from a child process), naming one of its metrics is one clear line."""
    script = textwrap.dedent("""
        import sys
        sys.modules["torchmetrics"] = None  # as if not installed
        from dist_train.errors import UserError
        from dist_train.eval_spec import parse_metrics
        from dist_train.evaluation.metrics import build_metric
        try:
            build_metric(parse_metrics([{"name": "f1", "metric": "torchmetrics.classification:MulticlassF1Score"}])[0])
        except UserError as exc:
            print(exc)
        import dist_train.loop, dist_train.inference  # the package itself works without it
        assert "torchmetrics" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (
        "metrics: 'f1' names 'torchmetrics.classification:MulticlassF1Score' but torchmetrics is not installed; pip install 'dist-train[metrics]'"
        in result.stdout
    )


def test_metric_values_per_class_and_a_wrong_return_are_said(tmp_path):
    """In one process: a per-class torchmetrics value becomes NAME_0.., a scalar-returning function is one line."""
    from dist_train.eval_spec import parse_metrics
    from dist_train.evaluation import MetricSet

    (tmp_path / "m.py").write_text("def batch_mean(outputs, targets):\n    return outputs.mean()\n")
    entries = [
        "top3_accuracy",
        {"name": "recall", "metric": "torchmetrics.classification:MulticlassRecall", "args": {"num_classes": 3, "average": "none"}},
    ]
    metrics = MetricSet(parse_metrics(entries), torch.device("cpu"))
    outputs, targets = torch.eye(3)[[0, 1, 1, 2]], torch.tensor([0, 1, 2, 2])
    metrics.update(outputs, targets)
    values = metrics.result(metrics.sums, "test")
    assert values == {"test_top3_accuracy": 1.0, "test_recall_0": 1.0, "test_recall_1": 1.0, "test_recall_2": 0.5}
    wrong = MetricSet(parse_metrics([{"name": "mean", "metric": f"{tmp_path / 'm.py'}:batch_mean"}]), torch.device("cpu"))
    with pytest.raises(UserError) as caught:
        wrong.update(outputs, targets)
    assert str(caught.value) == (
        "metrics: 'mean' returned [] for a batch of 4; a metric function returns one value per sample "
        "(first dimension = batch) or a pair (numerator, denominator) summed over the set."
    )
    too_many = MetricSet(parse_metrics(["top5_accuracy"]), torch.device("cpu"))
    with pytest.raises(UserError, match="metrics: top5_accuracy needs at least 5 classes; the model returns 3."):
        too_many.update(outputs, targets)
