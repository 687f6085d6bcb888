"""Training features (issue 3): precision, accumulation, clipping, schedules, early stopping, trackers, debug modes.

Few real runs, each checking several features, with the math checked against a reference or by hand
(one-process runs call `train` in this process; two-process runs go through `accelerate launch`, gloo):
- reference: 1 process, batch 16. Equal to it: 1 process x batch 4 x grad_accum_steps 4, and 2 processes
  x batch 4 x accum 2 (which also check the schedule, the interval-mean loss, tensorboard, the profiler,
  the plot and a quiet progress bar). One clipped step is recomputed by hand.
- auto_batch_size + early stopping on 2 ranks with different memory limits ≡ the same on 1 rank.
- a NaN on rank 1 stops both ranks; overfit_batches + on_nonfinite: skip + bf16 on 1 and 2 ranks;
  fast_dev_run + detect_anomaly on 2 ranks, fast_dev_run + a progress bar on a terminal on 1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_train.cli import main
from dist_train.config import load_config
from dist_train.errors import UserError
from helpers import (
    assert_weights_equal,
    cli_command,
    import_file,
    load_weights,
    read_metrics,
    run_cli,
    sample_cases,
    sampled_params,
    seed_project_args,
    start_cli,
    train_in_process,
    val_records,
    write_seed_project,
)

NUM_TRAIN, NUM_VAL = 64, 40

# A model with switches for the tests: an out-of-memory limit per rank, a NaN on one rank's n-th training
# forward, and checks that the forward runs under the autocast dtype / anomaly mode the config asked for.
PROBE_MODEL = """
import os
import torch
import torch.nn as nn

class ProbeModel(nn.Module):
    def __init__(self, oom_above=None, nan_rank=None, nan_call=None, expect_dtype=None, expect_anomaly=False, stateful=False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)
        # stateful: BatchNorm statistics and dropout's RNG, which a probe step could disturb.
        self.extra = nn.Sequential(nn.BatchNorm1d(32), nn.Dropout(0.3)) if stateful else nn.Identity()
        self.oom_above, self.nan_rank, self.nan_call = oom_above, nan_rank, nan_call
        self.expect_dtype, self.expect_anomaly = expect_dtype, expect_anomaly
        self.rank = int(os.environ.get("RANK", "0"))
        self.calls = 0

    def forward(self, x):
        if self.oom_above is not None and x.shape[0] > self.oom_above[self.rank]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]} (test limit)")
        if self.expect_anomaly and not torch.is_anomaly_enabled():
            raise RuntimeError("detect_anomaly: true but anomaly detection is off")
        hidden = self.fc1(x)
        if self.expect_dtype is not None and hidden.dtype != getattr(torch, self.expect_dtype):
            raise RuntimeError(f"expected autocast to {self.expect_dtype}, got {hidden.dtype}")
        if self.training:
            self.calls += 1
            if self.rank == self.nan_rank and self.calls == self.nan_call:
                hidden = hidden * float("nan")
        return self.fc2(self.extra(self.act(hidden))).float()
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = write_seed_project(tmp_path_factory.mktemp("seed"), num_train=NUM_TRAIN, num_val=NUM_VAL)
    (folder / "probe_model.py").write_text(PROBE_MODEL)
    return folder


def train_here(project: Path, out: Path, *extra: str) -> dict:
    """One process, in this process: `train` on the seed project (faster than a CLI run)."""
    return train_in_process(seed_project_args(project, out, *extra))


def probe_model(project: Path, **model_args) -> list[str]:
    return [f"model={project / 'probe_model.py'}:ProbeModel", f"model_args={json.dumps(model_args)}"]


def expected_lr(step: int, peak: float, schedule: str, warmup: int, total: int) -> float:
    """The rate optimizer step `step` (1-based) uses: linear warmup to `peak`, then the schedule to 0."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - 1 - warmup) / (total - warmup)
    return peak * {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def assert_same_weights(a: Path, b: Path) -> None:
    assert_weights_equal(b, a, exact=False)


def log_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "lr" in r]


# ---- R, A, T: accumulation, clipping, schedule, max_steps, eval_every, logging, trackers, profiler, plot ----

# 64 samples / global batch 16 = 4 steps per epoch; max_steps=6 runs into a second epoch (overriding epochs=1).
COMMON = (
    "epochs=1",
    "max_steps=6",
    "optimizer=sgd",
    "lr=0.5",
    "momentum=0.9",
    "max_grad_norm=0.5",
    "lr_schedule=cosine",
    "warmup_steps=2",
    "eval_every=3",
    "seed=5",
)


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    train_here(project, out, "batch_size=16", "log_every=1", *COMMON)
    return out


def test_accumulation_4x_batch_4_equals_batch_16(project, reference, tmp_path):
    train_here(project, tmp_path / "accum", "batch_size=4", "grad_accum_steps=4", "log_every=1", *COMMON)
    assert_same_weights(reference, tmp_path / "accum")
    ref, acc = log_records(reference), log_records(tmp_path / "accum")
    assert [r["step"] for r in acc] == [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]  # optimizer steps, not micro-batches
    for r, a in zip(ref, acc):  # the logged loss is the mean over the step's micro-batches, not the last one
        assert a["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
        assert a["lr"] == r["lr"]


def test_schedule_max_steps_and_eval_every(reference):
    records = log_records(reference)
    for r in records:
        assert r["lr"] == pytest.approx(expected_lr(r["step"], 0.5, "cosine", 2, 6), rel=1e-9, abs=1e-12)
        assert r["peak_memory_mb"] > 0 and r["samples_per_s"] > 0 and r["step_time_s"] > 0
    assert records[-1]["step"] == 6 and records[-1]["epoch"] == 1  # max_steps overrides epochs=1
    assert [r["step"] for r in val_records(reference)] == [3, 4, 6]  # every 3 steps, the epoch end, the last step


def test_one_clipped_step_matches_a_hand_computation(project, tmp_path):
    """max_grad_norm rescales the global gradient; the logged grad_norm is its norm before clipping."""
    out = tmp_path / "clip"
    train_here(project, out, "batch_size=16", "max_steps=1", "optimizer=sgd", "lr=0.5", "max_grad_norm=0.05", "log_every=1", "seed=5")
    module = import_file(project / "model.py", "hand_model")
    torch.manual_seed(5)
    model = module.MyModel()
    data = torch.load(project / "data.pt", weights_only=True)
    first = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(5 * 1_000_003))[:16]  # epoch 0's order
    loss = torch.nn.functional.cross_entropy(model(data["train_x"][first]), data["train_y"][first])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    assert norm > 0.05 * 2  # clipping must bite
    expected = {name: p.detach() - 0.5 * (0.05 / (norm + 1e-6)) * g for (name, p), g in zip(model.named_parameters(), grads)}
    weights = load_weights(out)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)
    (record,) = log_records(out)
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)


@pytest.fixture(scope="module")
def two_process_run(project, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """2 ranks x batch 4 x accum 2 (global batch 16), with tensorboard, the profiler and a progress bar asked for."""
    out = tmp_path_factory.mktemp("runs") / "two"
    result = run_cli(
        seed_project_args(
            project,
            out,
            "batch_size=4",
            "grad_accum_steps=2",
            "log_every=2",
            "log_with=tensorboard",
            "profile_steps=[1, 3]",
            "progress=true",
            "plot=true",
            *COMMON,
        ),
        nproc=2,
    )
    return out, result


def test_two_ranks_with_accumulation_equal_the_reference(reference, two_process_run):
    out, _ = two_process_run
    assert_same_weights(reference, out)
    ref = {r["step"]: r for r in log_records(reference)}
    records = log_records(out)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        # train_loss is the mean over the log interval (both steps), not the last batch.
        assert r["train_loss"] == pytest.approx((ref[r["step"] - 1]["train_loss"] + ref[r["step"]]["train_loss"]) / 2, rel=1e-5)
        assert r["grad_norm"] == pytest.approx(ref[r["step"]]["grad_norm"], rel=1e-4)
        assert r["lr"] == pytest.approx(expected_lr(r["step"], 0.5, "cosine", 2, 6), rel=1e-9)
    assert [r["step"] for r in val_records(out)] == [3, 4, 6]


def test_trackers_profiler_plot_and_quiet_progress(two_process_run):
    out, result = two_process_run
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "log_with: tensorboard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {tag for event in events for tag in EventAccumulator(str(event)).Reload().Tags()["scalars"]}
    assert {"train_loss", "lr", "grad_norm", "val_loss"} <= scalars
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank{rank}.pt.trace.json").read_text())
        assert trace["traceEvents"], f"rank {rank}'s profiler trace is empty"
    assert (out / "curves.png").stat().st_size > 10_000  # drawn at the end of the run
    assert "samples_s=" not in result.stderr and "step/s" not in result.stderr  # stdout is not a TTY: no bar


def test_plot_command(reference, capsys):
    assert not (reference / "curves.png").exists()  # plot=false (helpers.seed_project_args): not drawn
    assert main(["plot", str(reference)]) == 0
    assert capsys.readouterr().out.strip() == str(reference / "curves.png")
    png = (reference / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(reference / "missing")]) == 2


def test_linear_and_constant_schedules_and_one_process_trackers(project, tmp_path):
    for schedule, warmup in (("linear", 3), ("constant", 2)):
        out = tmp_path / schedule
        train_here(
            project,
            out,
            "batch_size=16",
            "max_steps=7",
            "lr=0.01",
            f"lr_schedule={schedule}",
            f"warmup_steps={warmup}",
            "log_every=1",
            "log_with=tensorboard",
            "profile_steps=[0, 2]",
        )
        lrs = [r["lr"] for r in log_records(out)]
        assert lrs == pytest.approx([expected_lr(s, 0.01, schedule, warmup, 7) for s in range(1, 8)], rel=1e-9, abs=1e-15)
        assert list(out.rglob("events.out.tfevents.*"))
        assert json.loads((out / "profile" / "rank0.pt.trace.json").read_text())["traceEvents"]  # a window from step 0


# ---- auto_batch_size + early stopping: 2 ranks with different memory limits, and 1 rank ----

# lr > 0 makes val_loss fall; monitor_mode: max then sees no improvement, so patience 2 stops the run early.
STOPPING = (
    "optimizer=sgd",
    "lr=0.2",
    "epochs=3",
    "eval_every=1",
    "early_stopping_patience=2",
    "monitor_mode=max",
    "auto_batch_size=true",
    "batch_size=16",
    "log_every=1",
    "seed=2",
)


def _expected_stop_step(values: list[float], patience: int) -> int:
    """Where EarlyStopping (mode max) must stop, replayed from the logged validations (steps 1, 2, ...)."""
    best, bad = None, 0
    for step, value in enumerate(values, start=1):
        best, bad = (value, 0) if best is None or value > best else (best, bad + 1)
        if bad >= patience:
            return step
    raise AssertionError(f"early stopping never triggered on {values}")


def test_auto_batch_size_and_early_stopping_agree_across_ranks(project, tmp_path):
    # Rank 0 fits 8 samples, rank 1 only 4: both must shrink 16 -> 8 -> 4 together (global batch 8).
    two, one = tmp_path / "two", tmp_path / "one"
    launched = start_cli(seed_project_args(project, two, *probe_model(project, oom_above=[8, 4]), *STOPPING), nproc=2)
    # One process fitting 8 samples trains the same global batch of 8 (here, while the 2 ranks run): the same
    # run, stopped at the same step.
    train_here(project, one, *probe_model(project, oom_above=[8]), *STOPPING)
    result = launched.result()
    assert "batch_size 16 does not fit; trying 8" in result.stdout and "batch_size 8 does not fit; trying 4" in result.stdout
    assert yaml.safe_load((two / "config.yaml").read_text())["batch_size"] == 4
    assert yaml.safe_load((one / "config.yaml").read_text())["batch_size"] == 8
    for out in (one, two):
        vals = val_records(out)
        stop_step = _expected_stop_step([r["val_loss"] for r in vals], patience=2)
        assert [r["step"] for r in vals] == list(range(1, stop_step + 1))
        assert read_metrics(out)[-1]["step"] == stop_step < 3 * NUM_TRAIN // 8  # stopped early, every rank at once
    assert f"finished at optimizer step {len(val_records(two))}" in result.stdout
    assert_same_weights(one, two)


def test_auto_batch_size_probe_leaves_no_trace(project, tmp_path):
    """When the configured size fits, the probe step changes nothing (weights, BatchNorm statistics, dropout RNG)."""
    for name, auto in (("plain", "false"), ("auto", "true")):
        train_here(
            project,
            tmp_path / name,
            *probe_model(project, stateful=True),
            "batch_size=16",
            "log_every=1",
            f"auto_batch_size={auto}",
            *COMMON,
        )
    assert_same_weights(tmp_path / "plain", tmp_path / "auto")  # the saved state dict includes BatchNorm's running stats
    assert [r["train_loss"] for r in log_records(tmp_path / "auto")] == [r["train_loss"] for r in log_records(tmp_path / "plain")]


def test_auto_batch_size_needs_a_loader_built_with_cfg_batch_size(project, tmp_path):
    fixed = tmp_path / "fixed_loader.py"
    fixed.write_text(
        "from torch.utils.data import DataLoader\nfrom dataset import MyDataset\n\n"
        "def get_dataloader(cfg, train):\n    return DataLoader(MyDataset(cfg.data_path, train), batch_size=32)\n"
    )
    with pytest.raises(UserError, match="yields batches of 32, not batch_size 16; build the DataLoader .* batch_size=cfg.batch_size"):
        train_here(project, tmp_path / "fixed", f"data={fixed}:get_dataloader", "auto_batch_size=true", "batch_size=16", "epochs=1")


# ---- non-finite losses ----


def test_nonfinite_stop_names_step_batch_and_rank(project, tmp_path):
    out = tmp_path / "nan"
    args = seed_project_args(project, out, *probe_model(project, nan_rank=1, nan_call=3), "batch_size=4", "epochs=1", "checkpoint_every=1")
    result = run_cli(args, nproc=2, check=False)
    assert result.returncode != 0
    assert "Non-finite loss or gradient at optimizer step 3 (epoch 0, batch 2) on rank(s) [1]" in result.stderr
    assert "]: Traceback" not in result.stderr  # the ranks print one line each (only the launcher reports its child's exit)
    # The checkpoints of steps 1 and 2 are left as they were; nothing is written for the failed step.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert not (out / "model.safetensors").exists()


OVERFIT = ("mixed_precision=bf16", "overfit_batches=2", "epochs=20", "optimizer=adam", "lr=0.03", "on_nonfinite=skip", "log_every=1")


def test_nonfinite_stop_on_one_process(project, tmp_path):
    with pytest.raises(UserError, match=r"optimizer step 2 \(epoch 0, batch 1\) on rank\(s\) \[0\]"):
        train_here(project, tmp_path / "nan", *probe_model(project, nan_rank=0, nan_call=2), "batch_size=16", "epochs=1")


@pytest.fixture(scope="module")
def overfit_runs(project, tmp_path_factory) -> dict[int, Path]:
    """overfit_batches: 2 global batches of 8 (16 samples), in bf16, with rank 0's 5th forward (step 5) made NaN."""
    runs = tmp_path_factory.mktemp("runs")
    model = probe_model(project, nan_rank=0, nan_call=5, expect_dtype="bfloat16")
    launched = start_cli(seed_project_args(project, runs / "two", *model, "batch_size=4", *OVERFIT), nproc=2)
    train_here(project, runs / "one", *model, "batch_size=8", *OVERFIT)  # while the 2 ranks run
    launched.result()
    return {1: runs / "one", 2: runs / "two"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_overfit_batches_loss_falls_near_zero(overfit_runs, nproc):
    vals = val_records(overfit_runs[nproc])
    assert all(r["val_samples"] == 16 for r in vals)  # validates on the same 2 global batches
    assert vals[-1]["step"] == 40  # 2 steps per epoch
    assert vals[-1]["val_loss"] < 0.05 < vals[0]["val_loss"] and vals[-1]["val_accuracy"] == 1.0


@pytest.mark.parametrize("nproc", [1, 2])
def test_nonfinite_skip_drops_the_update_and_counts_it(overfit_runs, nproc):
    by_step = {r["step"]: r for r in log_records(overfit_runs[nproc])}
    assert "nonfinite_skipped" not in by_step[4]
    assert math.isnan(by_step[5]["train_loss"]) and by_step[5]["nonfinite_skipped"] == 1
    assert by_step[40]["nonfinite_skipped"] == 1 and math.isfinite(by_step[40]["train_loss"])
    assert all(torch.isfinite(w).all() for w in load_weights(overfit_runs[nproc]).values())


# ---- fast_dev_run, detect_anomaly, the progress bar ----


def test_fast_dev_run_with_anomaly_detection_on_two_ranks(project, tmp_path):
    out = tmp_path / "dev"
    result = run_cli(
        seed_project_args(
            project,
            out,
            *probe_model(project, expect_anomaly=True),
            "fast_dev_run=2",
            "detect_anomaly=true",
            "batch_size=4",
            "log_every=1",
            "checkpoint_every=1",
        ),
        nproc=2,
    )
    assert result.returncode == 0
    assert [r["step"] for r in log_records(out)] == [1, 2]
    (val,) = val_records(out)
    assert val["val_samples"] == 2 * 4 * 2  # N validation batches per rank
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_progress_bar_on_a_terminal(project, tmp_path):
    """On a TTY the main process shows loss, lr and samples/s (tqdm writes to stderr)."""
    # warmup_steps=5 is longer than the 3 steps: fast_dev_run smoke-tests the real run's config as it is.
    args = seed_project_args(project, tmp_path / "tty", "fast_dev_run=3", "log_every=1", "progress=true", "warmup_steps=5")
    leader, follower = os.openpty()
    try:
        result = subprocess.run(
            cli_command(args), stdout=follower, stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 0, result.stderr
    assert "loss=" in result.stderr and "lr=" in result.stderr and "samples_s=" in result.stderr and "3/3" in result.stderr
    # ... and fast_dev_run on one process: 3 steps, one validation pass, nothing saved.
    assert [r["step"] for r in log_records(tmp_path / "tty")] == [1, 2, 3]
    assert not (tmp_path / "tty" / "checkpoints").exists() and not (tmp_path / "tty" / "model.safetensors").exists()


# ---- precision, compile, bad input ----


def test_fp16_on_cpu_is_a_clear_error(project, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is valid here")
    assert main(["train", *seed_project_args(project, tmp_path / "fp16", "mixed_precision=fp16")]) == 2
    assert "mixed_precision: fp16 needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling and CUDA peak memory need a GPU")
def test_fp16_overflow_skips_are_logged_on_gpu(project, tmp_path):
    """A NaN forward at micro-batch 3 under fp16: Accelerate's scaler skips that step, and it is counted."""
    out = tmp_path / "fp16"
    train_here(
        project,
        out,
        *probe_model(project, nan_rank=0, nan_call=3),
        "mixed_precision=fp16",
        "batch_size=16",
        "epochs=1",
        "log_every=1",
        "cpu=false",
    )
    records = log_records(out)
    assert all("overflow_skipped" in r for r in records)
    assert records[-1]["overflow_skipped"] >= 1  # the NaN step (plus any the initial loss scale overflowed)
    assert all(torch.isfinite(t).all() for t in load_weights(out).values())
    assert records[-1]["peak_memory_mb"] > 0


# Each compiled run costs ~20 s of CPU with an empty Inductor cache: the suite runs 1 or 2 ranks, drawn by
# DIST_TRAIN_MATRIX_SEED (helpers.sample_cases); DIST_TRAIN_FULL_MATRIX=1 runs both.
COMPILE_NPROC = [1, 2]
COMPILE_SAMPLED = sample_cases("features_compile", COMPILE_NPROC)


@pytest.mark.parametrize("nproc", sampled_params(COMPILE_NPROC, COMPILE_SAMPLED))
def test_compile_matches_eager(project, reference, tmp_path, nproc):
    """compile: true through Accelerate's dynamo settings equals the eager reference run, on 1 and 2 ranks.

    Inductor on CPU builds C++ kernels with the system compiler: measured ~17 s for one process and
    ~21 s for two with an empty cache on 2 cores (a few seconds once /tmp/torchinductor_* is warm).
    A sampled matrix (see COMPILE_SAMPLED): `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_features.py -k compile`
    runs both.
    """
    args = seed_project_args(project, tmp_path / "compiled", f"batch_size={16 // nproc}", "log_every=1", "compile=true", *COMMON)
    if nproc == 1:
        train_in_process(args)
    else:
        run_cli(args, nproc=2)
    assert_same_weights(reference, tmp_path / "compiled")  # keys as MyModel's: no `_orig_mod.` prefix
    # The checkpoint (and so `export` / `load_model`) is keyed as MyModel too.
    checkpoint = sorted((tmp_path / "compiled" / "checkpoints").glob("step_*"))[-1]
    assert load_file(str(checkpoint / "model.safetensors")).keys() == load_weights(reference).keys()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["warmup_steps=10", "max_steps=5"], r"warmup_steps \(10\) is larger than max_steps \(5\)"),
        (["grad_accum_steps=0"], "'grad_accum_steps' has value 0; expected a number >= 1"),
        (["lr_schedule=step"], "'lr_schedule' has value 'step'; expected one of constant, linear, cosine"),
        (["monitor=val_acc"], "monitor: 'val_acc' is never logged by validation; choose one of: val_loss, val_accuracy, train_loss"),
        (["monitor=val_accuracy", "loss=mse"], "'val_accuracy' is never logged with loss: mse"),
        (["profile_steps=[3, 1]"], r"profile_steps \[3, 1\] must be \[start, end\]"),
        (["fast_dev_run=2", "overfit_batches=2"], "use one debug mode at a time"),
    ],
)
def test_bad_combinations_fail_before_training(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_warmup_longer_than_the_run_fails_before_training(project, tmp_path):
    # 64 samples / batch 16 x 1 epoch = 4 steps: known only once the loader exists, still before any step.
    with pytest.raises(UserError, match=r"warmup_steps \(5\) is larger than the run's 4 optimizer steps"):
        train_here(project, tmp_path / "warm", "batch_size=16", "epochs=1", "warmup_steps=5")
    assert not (tmp_path / "warm" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "warm")


# ---- a Hugging Face transformers model through the same plug-in contract ----

HF_PROJECT = '''
import torch
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification

def make_model(**config):
    """Built from a config: no download. forward(input_ids) returns a SequenceClassifierOutput."""
    return BertForSequenceClassification(BertConfig(**config))

def get_dataloader(cfg, train):
    g = torch.Generator().manual_seed(0 if train else 1)
    input_ids = torch.randint(2, 30, (64 if train else 24, 8), generator=g)
    labels = (input_ids < 10).sum(dim=1).gt(2).long()  # token ids (integer inputs): tokens/s is logged
    return TensorDataset(input_ids, labels)
'''
TINY_BERT = {
    "vocab_size": 30,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 8,
    "num_labels": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def test_transformers_model_trains_on_one_and_two_ranks(tmp_path):
    """The built-in losses take `outputs.logits` from a model output object; N ranks ≡ 1 rank holds for it too."""
    pytest.importorskip("transformers")
    (tmp_path / "hf_project.py").write_text(HF_PROJECT)
    args = [
        f"model={tmp_path / 'hf_project.py'}:make_model",
        f"model_args={json.dumps(TINY_BERT)}",
        f"data={tmp_path / 'hf_project.py'}:get_dataloader",
        "optimizer=sgd",
        "lr=0.1",
        "epochs=2",
        "log_every=2",
        "progress=false",
        "plot=false",
        "resume=never",
    ]
    launched = start_cli([*args, f"output_dir={tmp_path / 'two'}", "batch_size=4"], nproc=2)
    train_in_process([*args, f"output_dir={tmp_path / 'one'}", "batch_size=8"])  # while the 2 ranks run
    launched.result()
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    for out in (tmp_path / "one", tmp_path / "two"):
        records = log_records(out)
        assert records and all(r["tokens_per_s"] > 0 for r in records)
        assert val_records(out)[-1]["val_samples"] == 24 and "val_accuracy" in val_records(out)[-1]
