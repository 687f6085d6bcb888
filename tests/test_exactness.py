"""Regression tests for the silent wrong results a new user found a little off the tested path.

Each test here failed before its fix (issue 11): continuing a finished run, a changed key on resume,
two runs on one output_dir, accumulation on uneven data, a skipped step with BatchNorm, unused
parameters on 2 ranks, a full disk at the final save, and the exit status of a stopped run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (
    assert_weights_equal,
    cli_command,
    ids_model,
    load_weights,
    read_ids,
    read_metrics,
    run_cli,
    run_clis,
    seed_project_args,
    val_records,
    write_seed_project,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_seed_project(tmp_path_factory.mktemp("exact_seed"), num_train=80, num_val=30)


def _auto(args: list[str]) -> list[str]:
    """The same run with resume: auto (seed_project_args starts fresh with resume: never)."""
    return ["resume=auto" if a == "resume=never" else a for a in args]


def _train_steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "lr" in r]


# One finished run (1 epoch: 5 steps of 16 samples, a constant lr) that five tests below each continue in a copy of
# its output_dir: a run that has nothing left to train, a changed lr, a changed schedule, a change the checkpoint
# cannot take, a full disk at the final save. hidden=256 makes the final weights 21 kB (the full-disk test needs
# them above its 8 kB file-size limit).
FINISHED = ("batch_size=16", "log_every=1", "model_args={hidden: 256}")


def _finished_args(project: Path, out: Path, *extra: str, lr: float = 0.01) -> list[str]:
    return _auto(seed_project_args(project, out, *FINISHED, f"lr={lr}", *extra))


@pytest.fixture(scope="module")
def finished_run(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_cli(_finished_args(project, out, "epochs=1"))
    return out


def _copy_of_finished_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's output_dir (output_dir is not a key a resume compares) for one test to continue."""
    return shutil.copytree(finished_run, tmp_path / "run")


# ---- 1. continuing a finished run ------------------------------------------------------------------
def test_continuing_the_builtin_task_with_more_epochs_is_the_straight_run(tmp_path):
    """`dist-train train epochs=1`, then `epochs=2`: 45 + 45 steps, no NaN, weights bitwise equal."""
    common = ["progress=false", "plot=false", "log_every=1"]
    with ThreadPoolExecutor(1) as pool:  # the straight run alongside the other two (one-thread processes)
        straight = pool.submit(run_cli, [f"output_dir={tmp_path / 'straight'}", "epochs=2", *common])
        run_cli([f"output_dir={tmp_path / 'cont'}", "epochs=1", *common])
        continued = run_cli([f"output_dir={tmp_path / 'cont'}", "epochs=2", *common])
        straight.result()
    assert "resume: epochs: 1 -> 2" in continued.stdout
    steps = _train_steps(tmp_path / "cont")
    assert [r["step"] for r in steps] == list(range(1, 91))
    assert [sum(r["epoch"] == e for r in steps) for e in (0, 1)] == [45, 45]
    assert all(math.isfinite(r["train_loss"]) for r in steps)
    assert_weights_equal(load_weights(tmp_path / "cont"), load_weights(tmp_path / "straight"))
    assert [r["step"] for r in val_records(tmp_path / "cont")] == [45, 90]


def test_continuing_a_per_sample_dataset_run_is_the_straight_run(project, tmp_path):
    """The regular (per-sample Dataset) path, 80 samples at batch 16 x accumulation 2: 3 steps per epoch."""
    common = ("batch_size=16", "grad_accum_steps=2", "seed=2")
    with ThreadPoolExecutor(1) as pool:  # the straight run alongside the other two (one-thread processes)
        straight = pool.submit(run_cli, seed_project_args(project, tmp_path / "straight", "epochs=3", *common))
        run_cli(seed_project_args(project, tmp_path / "cont", "epochs=1", *common))
        run_cli(_auto(seed_project_args(project, tmp_path / "cont", "epochs=3", *common)))
        straight.result()
    assert_weights_equal(load_weights(tmp_path / "cont"), load_weights(tmp_path / "straight"))
    assert [r["step"] for r in val_records(tmp_path / "cont")] == [3, 6, 9]


def test_a_finished_run_trains_nothing_more(project, finished_run, tmp_path):
    out = _copy_of_finished_run(finished_run, tmp_path)
    before = load_weights(out)
    again = run_cli(_finished_args(project, out, "epochs=1"))
    assert "nothing to train" in again.stdout and "finished at optimizer step 5" in again.stdout
    assert_weights_equal(load_weights(out), before)


# ---- 2. a changed key on resume ---------------------------------------------------------------------
def test_a_changed_lr_on_resume_is_applied_and_said(project, finished_run, tmp_path):
    out = _copy_of_finished_run(finished_run, tmp_path)  # trained at lr 0.01
    resumed = run_cli(_finished_args(project, out, "epochs=2", lr=0.05))
    assert "resume: lr: 0.01 -> 0.05 (applied from optimizer step 6 on)" in resumed.stdout
    lrs = {r["step"]: r["lr"] for r in _train_steps(out)}
    assert [lrs[s] for s in range(1, 11)] == [0.01] * 5 + [0.05] * 5
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.05


def test_a_changed_schedule_on_resume_follows_the_new_budget(project, finished_run, tmp_path):
    """linear decay over 5 steps, continued to 10: the rate is the new schedule's at every step."""
    out = _copy_of_finished_run(finished_run, tmp_path)  # 5 steps at a constant 0.01
    run_cli(_finished_args(project, out, "epochs=2", "lr_schedule=linear"))
    lrs = {r["step"]: r["lr"] for r in _train_steps(out)}
    assert [lrs[s] for s in range(6, 11)] == pytest.approx([0.01 * (1 - s / 10) for s in range(5, 10)])


def test_a_change_the_checkpoint_cannot_take_is_refused_before_training(project, finished_run, tmp_path):
    out = _copy_of_finished_run(finished_run, tmp_path)
    args = lambda *extra: _finished_args(project, out, *extra)
    config_before = (out / "config.yaml").read_text()
    metrics_before = (out / "metrics.jsonl").read_text()
    result = run_cli(args("epochs=2", "optimizer=sgd"), check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "optimizer changes from 'adamw' to 'sgd' since checkpoint" in line and "Resume with optimizer: 'adamw'" in line
    assert (out / "config.yaml").read_text() == config_before
    assert (out / "metrics.jsonl").read_text() == metrics_before


def test_a_resume_with_a_larger_step_trains_every_remaining_epoch_whole(tmp_path):
    """Issue 19: max_steps=4 at batch 5 x 2 processes, continued with grad_accum_steps: 3 and epochs: 2 on 101
    samples. The length was epochs x steps per epoch at the new step (8) while the first 4 steps were smaller,
    so the run ended after 1.3 epochs (30 of epoch 1's 101 samples) with exit 0."""
    project = write_seed_project(tmp_path / "project", num_train=101, num_val=11, ids=True, files={"ids_model.py": ids_model()})
    out, ids_dir = tmp_path / "run", tmp_path / "ids"
    ids_dir.mkdir()
    args = lambda *extra: [  # noqa: E731
        f"model={project / 'ids_model.py'}:MyModel" if a.startswith("model=") else a
        for a in _auto(seed_project_args(project, out, "batch_size=5", "log_every=1", "lr_schedule=linear", "lr=0.1", *extra))
    ]
    env = {"IDS_DIR": str(ids_dir)}
    run_cli(args("max_steps=4"), nproc=2, env=env)
    resumed = run_cli(args("max_steps=null", "grad_accum_steps=3", "epochs=2"), nproc=2, env=env)
    ids = read_ids(ids_dir)
    sequence = [i for k in range(len(ids[0])) for rank in (0, 1) for i in ids[rank][k]]
    assert len(sequence) == 2 * 101  # each epoch every sample once (its last step short)
    assert sorted(sequence[:101]) == sorted(sequence[101:]) == list(range(101))
    steps = _train_steps(out)
    assert [r["step"] for r in steps] == list(range(1, 12))
    assert [r["epoch"] for r in steps] == [0] * 7 + [1] * 4
    # The linear decay spans the 11 steps the run really takes.
    assert [r["lr"] for r in steps[4:]] == pytest.approx([0.1 * (1 - s / 11) for s in range(4, 11)])
    assert [r["step"] for r in val_records(out)] == [4, 7, 11]  # the first run validated at its last step
    # 40 samples in 4 steps of 10; the rest of epoch 0 (61) in 3 steps of 30, epoch 1 (101) in 4: 11 in all.
    assert "7 optimizer steps remain, 11 in all (the checkpoint's run planned 4)" in resumed.stdout


# ---- 3. one run per output_dir ----------------------------------------------------------------------
def test_a_second_run_on_a_busy_output_dir_is_refused(project, tmp_path):
    (project / "slow_model.py").write_text(
        textwrap.dedent("""
        import time
        from model import MyModel

        class SlowModel(MyModel):
            def forward(self, x):
                time.sleep(0.05)
                return super().forward(x)
    """)
    )
    out = tmp_path / "run"
    args = _auto(seed_project_args(project, out, "epochs=20", "batch_size=16"))
    # The first run trains far longer than the test waits (epochs=2000): the second must meet it still running
    # however slow the machine is to start the second (a first run of 20 epochs sometimes ended before).
    slow = [
        f"model={project / 'slow_model.py'}:SlowModel" if a.startswith("model=") else "epochs=2000" if a == "epochs=20" else a for a in args
    ]
    assert "epochs=2000" in slow
    first = subprocess.Popen(
        cli_command(slow), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        second = run_cli(args, check=False)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert f"is in use by another run (pid {first.pid}" in line and "choose another output_dir" in line
        assert yaml.safe_load((out / "config.yaml").read_text())["model"].endswith("SlowModel")  # the second wrote nothing
    finally:
        first.kill()
        first.wait()
    run_cli(args)  # the killed run left no stale lock: the next one resumes its checkpoints


# ---- 4. accumulation on uneven data ----------------------------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
def test_accumulation_equals_the_big_batch_on_uneven_data(project, tmp_path, drop_last):
    """80 samples: 4 x 8 ≡ 1 x 32 (the last step of 16 weighted to the exact mean, or dropped, on both sides)."""
    if drop_last:
        (project / "drop_loader.py").write_text(
            (project / "dataloader.py").read_text().replace("num_workers=cfg.num_workers", "num_workers=cfg.num_workers, drop_last=train")
        )
    loader = [f"data={project / ('drop_loader.py' if drop_last else 'dataloader.py')}:get_dataloader"]
    common = ("epochs=3", "optimizer=sgd", "lr=0.5", "seed=1")
    accum = [
        a
        for a in seed_project_args(project, tmp_path / "accum", "batch_size=8", "grad_accum_steps=4", *common)
        if not a.startswith("data=")
    ]
    big = [a for a in seed_project_args(project, tmp_path / "big", "batch_size=32", *common) if not a.startswith("data=")]
    run_clis({"args": [*accum, *loader]}, {"args": [*big, *loader]})
    assert_weights_equal(tmp_path / "accum", tmp_path / "big", exact=False)
    steps = 2 if drop_last else 3
    assert [r["step"] for r in val_records(tmp_path / "accum")] == [steps, 2 * steps, 3 * steps]


# ---- 5. a skipped step leaves the buffers as they were ----------------------------------------------
BATCHNORM_PROJECT = """
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

class BNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))

def get_dataset(cfg, train):
    g = torch.Generator().manual_seed(0 if train else 1)
    x = torch.randn(32, 4, generator=g)
    if train and cfg.poison:
        x[5] = float("nan")  # one bad sample: its batch's forward puts NaN into BatchNorm's running stats
    return TensorDataset(x, (x[:, 0] > 0).long())
"""


def test_a_skipped_step_leaves_batchnorm_statistics_untouched(tmp_path):
    (tmp_path / "bn.py").write_text(BATCHNORM_PROJECT)
    common = [
        f"model={tmp_path / 'bn.py'}:BNModel",
        f"data={tmp_path / 'bn.py'}:get_dataset",
        "batch_size=8",
        "epochs=2",
        "on_nonfinite=skip",
        "progress=false",
        "plot=false",
        "resume=never",
        "log_every=1",
    ]
    run_cli([*common, f"output_dir={tmp_path / 'run'}", "data_args={poison: true}"])
    weights = load_weights(tmp_path / "run")
    assert torch.isfinite(weights["bn.running_mean"]).all() and torch.isfinite(weights["bn.running_var"]).all()
    final = val_records(tmp_path / "run")[-1]
    assert math.isfinite(final["val_loss"])
    assert _train_steps(tmp_path / "run")[-1]["nonfinite_skipped"] == 2  # the poisoned batch, once per epoch
    # BatchNorm counts only the batches it kept: 4 per epoch, minus the skipped one.
    assert int(weights["bn.num_batches_tracked"]) == 6


# ---- 7. smaller ones -------------------------------------------------------------------------------------
UNUSED_PROJECT = """
import torch.nn as nn
from model import MyModel

class WithUnused(MyModel):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(3, 3)  # never called in forward
"""


def test_an_unused_parameter_on_two_ranks_is_named_or_allowed(project, tmp_path):
    (project / "unused.py").write_text(UNUSED_PROJECT)
    args = lambda out, *extra: [
        a if not a.startswith("model=") else f"model={project / 'unused.py'}:WithUnused"
        for a in seed_project_args(project, out, "epochs=1", "batch_size=8", *extra)
    ]
    refused, _ = run_clis(
        {"args": args(tmp_path / "refused"), "nproc": 2, "check": False},
        {"args": args(tmp_path / "allowed", "find_unused_parameters=true"), "nproc": 2},
    )
    assert refused.returncode != 0
    assert "2 parameter(s) got no gradient in the first training step (spare.bias, spare.weight)" in refused.stderr
    assert "Set find_unused_parameters: true" in refused.stderr and "Expected to have finished reduction" not in refused.stderr
    assert val_records(tmp_path / "allowed")[-1]["num_processes"] == 2


def test_a_missing_tracker_stops_before_training(project, tmp_path):
    pytest.importorskip("torch")  # (wandb is not a test dependency: it is absent on CI)
    if subprocess.run([sys.executable, "-c", "import wandb"], capture_output=True).returncode == 0:
        pytest.skip("wandb is installed here")
    result = run_cli(seed_project_args(project, tmp_path / "run", "log_with=wandb"), check=False)
    assert result.returncode == 2 and "pip install 'dist-train[wandb]'" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_full_disk_at_the_final_save_is_one_line_and_keeps_the_checkpoints(project, finished_run, tmp_path):
    """The final weights (21 kB with hidden=256) cannot be written under an 8 kB file-size limit."""
    out = _copy_of_finished_run(finished_run, tmp_path)
    args = _finished_args(project, out, "epochs=1")
    final = out / "model.safetensors"
    before = final.read_bytes()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
    result = subprocess.run(
        cli_command(args), capture_output=True, text=True, preexec_fn=limit, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("dist-train: error: cannot write the final weights to") and "existing checkpoints are untouched" in line
    assert final.read_bytes() == before  # the previous final weights were not truncated
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints


def test_a_run_stopped_by_sigterm_exits_143_after_saving(project, tmp_path):
    """Not finished, so not 0: a caller chaining `&& dist-train export` must not take it for a finished run."""
    (project / "term_model.py").write_text(
        textwrap.dedent("""
        import os, signal
        from model import MyModel

        class TermModel(MyModel):
            forwards = 0

            def forward(self, x):
                if self.training:
                    TermModel.forwards += 1
                    if TermModel.forwards == 7:
                        os.kill(os.getpid(), signal.SIGTERM)
                return super().forward(x)
    """)
    )
    args = [
        a if not a.startswith("model=") else f"model={project / 'term_model.py'}:TermModel"
        for a in seed_project_args(project, tmp_path / "run", "epochs=2", "batch_size=16")
    ]
    result = run_cli(args, check=False)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "stopped by SIGTERM after saving a checkpoint" in result.stdout
    assert not (tmp_path / "run" / "model.safetensors").exists()
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_00000007" / "manifest.json").read_text())
    assert (manifest["epoch"], manifest["samples_consumed"]) == (1, 32)  # step 7 = epoch 1's second step


def test_only_a_failed_write_is_reported_as_a_disk_problem():
    """A collective timeout during a save keeps its traceback instead of becoming 'free disk space'."""
    from torch.distributed import DistBackendError

    from dist_train.checkpoint.async_save import is_write_failure as _is_write_failure

    assert _is_write_failure(OSError(28, "No space left on device"))
    assert _is_write_failure(
        RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed")
    )
    assert not _is_write_failure(DistBackendError("[gloo] Timed out waiting 600000ms for recv operation to complete"))
    assert not _is_write_failure(RuntimeError("an unrelated bug"))
