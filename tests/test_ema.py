"""EMA weights: equal to torch.optim.swa_utils' EMA applied by hand to the weights of every step, bitwise
through a SIGKILL and a resume on 1 and 2 ranks, validated beside the raw weights, exported on request. The EMA
under FSDP2 (sharded, resumed bitwise after a SIGKILL, resharded) is tested in tests/test_fsdp.py, on its runs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dist_train.checkpoint.manifest import read_manifest
from dist_train.errors import UserError
from dist_train.export import export
from helpers import (
    assert_weights_equal,
    ids_model,
    run_cli,
    run_clis,
    sample_cases,
    sampled_params,
    seed_project_args,
    train_in_process,
    val_records,
    write_seed_project,
)

BATCHNORM_MODEL = textwrap.dedent("""
    import torch.nn as nn

    class MyModel(nn.Module):
        def __init__(self, in_features=16, hidden=32, num_classes=4):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.net(x)
""")
EMA = ("ema_decay=0.8", "ema_warmup=true", "ema_start_step=2", "ema_every=2")


def hand_ema(steps: list[dict[str, torch.Tensor]], decay=0.8, start_step=2, every=2) -> dict[str, torch.Tensor]:
    """The EMA of the weights after each optimizer step (steps[k-1]: after step k), with swa_utils' update."""
    ema, updates = None, 0
    for step, weights in enumerate(steps, start=1):
        if step <= start_step:
            ema = {k: v.clone() for k, v in weights.items()}
            continue
        if step % every:
            continue
        floats = [k for k in weights if weights[k].is_floating_point()]
        get_ema_multi_avg_fn(min(decay, (1 + updates) / (10 + updates)))([ema[k] for k in floats], [weights[k] for k in floats], None)
        ema.update({k: weights[k].clone() for k in weights if k not in floats})  # e.g. BatchNorm's num_batches_tracked
        updates += 1
    return ema


def test_the_ema_is_swa_utils_ema_of_every_step(tmp_path):
    """A BatchNorm model, warmup, a start step and every 2nd step: the run's EMA (final and in each
    checkpoint) equals swa_utils' EMA over the weights its checkpoints hold after each step, to 1e-6."""
    project = write_seed_project(tmp_path / "project", files={"model.py": BATCHNORM_MODEL})
    out = tmp_path / "run"
    args = ("max_steps=7", "batch_size=16", "checkpoint_every=1", "monitor=val_loss_ema", "keep_best=true", "eval_every=3")
    train_in_process(seed_project_args(project, out, *args, *EMA))
    checkpoints = sorted((out / "checkpoints").glob("step_*"), key=lambda p: read_manifest(p)["step"])
    assert [read_manifest(p)["step"] for p in checkpoints] == list(range(1, 8))
    steps = [load_file(str(p / "model.safetensors")) for p in checkpoints]
    want = hand_ema(steps)
    got = load_file(str(out / "ema" / "model.safetensors"))
    assert "net.1.running_mean" in got and "net.1.num_batches_tracked" in got
    assert_weights_equal(got, want, exact=False, rtol=0, atol=1e-6)
    assert not torch.equal(got["net.0.weight"], steps[-1]["net.0.weight"])  # the EMA is not the raw weights
    for k, path in enumerate(checkpoints[2:], start=3):  # the EMA in every checkpoint is the EMA at its step
        exported = export(path, tmp_path / f"export{k}", ema=True)
        assert_weights_equal(load_file(str(exported / "model.safetensors")), hand_ema(steps[:k]), exact=False, rtol=0, atol=1e-6)
    records = val_records(out)
    assert [r["step"] for r in records] == [3, 6, 7]
    assert all(r["val_loss_ema"] != r["val_loss"] and "val_accuracy_ema" in r for r in records)
    # evaluate takes the EMA weights on request: the loss the run logged for them (to 1e-8: the run was made in
    # this process with its thread count, the evaluation in one single-threaded one, whose matmuls add in another order).
    report = json.loads(run_cli([str(out), "--weights", "ema"], subcommand="evaluate").stdout)
    assert report["metrics"]["val_loss"] == pytest.approx(records[-1]["val_loss_ema"], rel=1e-8, abs=0)
    assert report["weights"] == f"the final EMA weights of {out}"


def test_ema_settings_are_checked(tmp_path):
    project = write_seed_project(tmp_path / "project")
    with pytest.raises(UserError, match="the _ema metrics need ema_decay"):
        train_in_process(seed_project_args(project, tmp_path / "a", "monitor=val_loss_ema"))
    with pytest.raises(UserError, match="must be below 1"):
        train_in_process(seed_project_args(project, tmp_path / "a", "ema_decay=1"))
    plain = tmp_path / "plain"
    train_in_process(seed_project_args(project, plain, "max_steps=2"))
    with pytest.raises(UserError, match="holds no EMA weights"):
        export(plain, tmp_path / "exported", ema=True)
    # Turning EMA on when resuming a run without it: refused, naming the key (the checkpoint has no EMA to continue).
    with pytest.raises(UserError, match="ema_decay changes from None to 0.9 .* has no EMA weights"):
        train_in_process(seed_project_args(project, plain, "max_steps=4", "resume=auto", "ema_decay=0.9"))


EXACT = ("epochs=2", "batch_size=8", "grad_accum_steps=2", "checkpoint_every=3", "seed=5", *EMA)
KILL_AT_FORWARD = {1: 21, 2: 14}  # rank 0's 21st / 14th training forward: inside step 11 / 7; last save 9 / 6

# The kill-and-resume cases are three real runs each (~15 s and ~35 s of CPU): the suite runs one, drawn by
# DIST_TRAIN_MATRIX_SEED (helpers.sample_cases); DIST_TRAIN_FULL_MATRIX=1 runs both.
KILL_CASES = [(1, "async_checkpoint=false"), (2, "async_checkpoint=true")]
SAMPLED = sample_cases("ema_sigkill", KILL_CASES)


@pytest.mark.parametrize("nproc, saving", sampled_params(KILL_CASES, SAMPLED, unpack=True))
def test_sigkill_then_resume_with_ema_is_bitwise_identical(tmp_path, nproc, saving):
    """1 rank saving in line, 2 ranks in the background (the snapshot holds the EMA too). A sampled matrix (see
    SAMPLED): DIST_TRAIN_MATRIX_SEED=N may pick the other case; `DIST_TRAIN_FULL_MATRIX=1 python -m pytest
    tests/test_ema.py -k sigkill` runs both."""
    project = write_seed_project(tmp_path / "project", num_train=128, num_val=40, ids=True, files={"model.py": ids_model(dropout=0.25)})
    straight, out = tmp_path / "straight", tmp_path / "run"
    args = lambda folder: seed_project_args(project, folder, "resume=auto", saving, *EXACT)
    _, killed = run_clis(
        {"args": args(straight), "nproc": nproc},
        {"args": args(out), "nproc": nproc, "env": {"KILL_AT_FORWARD": str(KILL_AT_FORWARD[nproc])}},
        check=False,
    )
    assert killed.returncode != 0 and not (out / "ema").exists()
    resumed = run_cli(args(out), nproc=nproc)
    assert "at optimizer step" in resumed.stdout
    assert_weights_equal(out, straight)
    assert_weights_equal(out / "ema", straight / "ema")
    assert [r["val_loss_ema"] for r in val_records(out)] == [r["val_loss_ema"] for r in val_records(straight)]
    assert Path(out / "ema" / "model.safetensors").is_file()
