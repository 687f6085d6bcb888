"""Every promise under FSDP2, with real gloo processes on CPU (launch_configs/fsdp_cpu.yaml).

The FSDP2 path is asserted, not assumed from the config: the model records at its first training forward
whether its sub-unit's weight is a DTensor and how many rows of it this rank holds, and the checkpoints
hold one shard file per rank. The runs (a 96-sample train set, 23 validation samples: uneven over 2 and 3
ranks) are made at once, in two waves:

- one: 1 rank x batch 16; two: 2 ranks x 8; accum: 2 ranks x 4 x grad_accum_steps 2 (all fp32, AdamW); one, two
  and the runs continued from them keep an EMA of the weights (sharded under FSDP2), and so does plain_one, the same
  training on 1 process without FSDP;
- features: 2 ranks, bf16, tied weights, auto_batch_size shrinking 16 -> 8 (both ranks "fit" 8: under FSDP
  the probe's forward is collective, see docs/fsdp.md); killed: the same, SIGKILLed mid-epoch, then resumed
  with `resume: auto`;
- batchnorm: 2 ranks, fp32, BatchNorm (its statistics differ per rank under FSDP2); batchnorm_resumed: its
  mid-epoch checkpoint finished (BatchNorm in bf16 does not run on CPU: torch's CPU kernel wants one dtype);
- resized: `two`'s mid-epoch checkpoint finished on 1 and on 3 ranks, `one`'s on 2 (2 -> 3 always; one of 2 -> 1 and
  1 -> 2 drawn by DIST_TRAIN_MATRIX_SEED, both with DIST_TRAIN_FULL_MATRIX=1: see RESIZES_SAMPLED);
- checkpointing_offload: activation checkpointing and CPU offload, 3 steps; async: `async_checkpoint: true`;
  corrupt: async's checkpoints of steps 6 and 9, one byte of rank 1's shard of step 9 flipped, resumed;
  async_killed: async (with the EMA), every process SIGKILLed inside the background write of step 9, then resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train import load_model
from dist_train.accelerate_internals import check_launch_backend
from dist_train.checkpoint.manager import PAUSE_ENV
from dist_train.checkpoint.manifest import MANIFEST, verify
from dist_train.errors import UserError
from dist_train.export import export
from helpers import (
    FSDP_CPU_LAUNCH_CONFIG,
    assert_weights_equal,
    child_pids,
    cli_command,
    import_file,
    load_weights,
    read_ids,
    run_cli,
    run_clis,
    sample_cases,
    sampled_params,
    seed_project_args,
    val_records,
    write_seed_project,
)

NUM_TRAIN, NUM_VAL = 96, 23

# The seed's classifier with switches. `big` (32 x 128 + 128 = 4224 parameters) is its own FSDP unit
# (fsdp_min_num_params 4000 below), so at the start of the root's forward its weight is still sharded.
FSDP_MODEL = """
import json, os, signal
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

class FsdpModel(nn.Module):
    def __init__(self, tied=False, batchnorm=False, oom_above=None, rng_scale=False):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.mid = nn.Linear(32, 32, bias=False)
        self.mid_again = nn.Linear(32, 32, bias=False)
        if tied:
            self.mid_again.weight = self.mid.weight
        self.big = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 4)
        self.oom_above, self.rng_scale = oom_above, rng_scale
        self.rank = int(os.environ.get("RANK", "0"))
        self.forwards = 0

    def forward(self, x):
        ids, x = x[:, -1], x[:, :-1]
        if self.oom_above is not None and x.shape[0] > self.oom_above[self.rank]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]} (test limit)")
        if self.training:
            self.forwards += 1
            if os.environ.get("IDS_DIR"):
                with open(os.path.join(os.environ["IDS_DIR"], f"rank{self.rank}.txt"), "a") as f:
                    f.write(" ".join(str(int(i)) for i in ids.tolist()) + "\\n")
            if self.forwards == 1 and os.environ.get("PROBE_DIR"):
                weight = self.big.weight
                probe = {
                    "wrapped": type(self).__name__,
                    "dtensor": isinstance(weight, DTensor),
                    "rows": weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0],
                    "compute_dtype": str(self.fc1.weight.dtype),
                    "big_module": type(self.big).__name__,  # a CheckpointWrapper under activation checkpointing
                    "offload": repr(self._get_fsdp_state()._fsdp_param_group.offload_policy),
                }
                with open(os.path.join(os.environ["PROBE_DIR"], f"rank{self.rank}.json"), "w") as f:
                    json.dump(probe, f)
            if self.rank == 0 and self.forwards == int(os.environ.get("KILL_AT_FORWARD", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
            if self.rng_scale:  # one draw of the torch RNG per forward: a resume must restore it
                x = x * (1 + 0.01 * torch.rand(()))
        h = torch.tanh(self.norm(self.fc1(x)))
        h = torch.tanh(self.mid_again(torch.tanh(self.mid(h)))) + h
        return self.fc2(torch.tanh(self.big(h))).float()
"""

# SGD where runs are compared to a tolerance (AdamW's normalised step would turn a last-bit difference in a
# near-zero gradient into a visible one); AdamW where they must be bitwise, its state sharded in the checkpoints.
COMMON = ("epochs=2", "optimizer=sgd", "lr=0.1", "momentum=0.9", "seed=3", "checkpoint_every=3", "keep_last=null")
ADAMW = ("optimizer=adamw", "lr=0.01", "momentum=0")
# An EMA of the weights (tests/test_ema.py's settings): a warmup, a start step and an update every 2nd step.
EMA = ("ema_decay=0.8", "ema_warmup=true", "ema_start_step=2", "ema_every=2")
FEATURES = ("batch_size=16", "auto_batch_size=true", "mixed_precision=bf16", *ADAMW)
FEATURE_MODEL = {"tied": True, "oom_above": [8, 8], "rng_scale": True}
BATCHNORM_MODEL = {"batchnorm": True, "rng_scale": True}

# Resumes on another world size: 2 -> 3 ranks in every run (it is also the 3-rank run of the sharded-path and
# validation tests); of 2 -> 1 and 1 -> 2 (a launch each) the suite runs one, drawn by DIST_TRAIN_MATRIX_SEED
# (helpers.sample_cases). DIST_TRAIN_FULL_MATRIX=1 runs both.
RESIZES = ["two_to_one", "one_to_two"]
RESIZES_SAMPLED = sample_cases("fsdp_resize", RESIZES)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = write_seed_project(tmp_path_factory.mktemp("seed"), num_train=NUM_TRAIN, num_val=NUM_VAL, ids=True)
    (folder / "fsdp_model.py").write_text(FSDP_MODEL)
    config = FSDP_CPU_LAUNCH_CONFIG.read_text().replace("fsdp_min_num_params: 0", "fsdp_min_num_params: 4000")
    assert "fsdp_min_num_params: 4000" in config
    (folder / "fsdp_launch.yaml").write_text(config)
    for key in ("fsdp_activation_checkpointing", "fsdp_offload_params"):
        config = config.replace(f"{key}: false", f"{key}: true")
    assert config.count(": true") >= 3  # use_cpu, and the two
    (folder / "fsdp_checkpointing_offload.yaml").write_text(config)
    return folder


def _args(project: Path, out: Path, *extra: str, model_args: dict | None = None) -> list[str]:
    return seed_project_args(
        project, out, f"model={project / 'fsdp_model.py'}:FsdpModel", f"model_args={json.dumps(model_args or {})}", *COMMON, *extra
    )


def _call(
    project: Path, root: Path, name: str, nproc: int, *extra: str, env: dict | None = None, launch: str = "fsdp_launch.yaml", **kwargs
) -> dict:
    """run_cli's arguments for a run `name` under root/ (its ids and probes in root/name-ids, root/name-probe)."""
    ids, probe = root / f"{name}-ids", root / f"{name}-probe"
    ids.mkdir(exist_ok=True), probe.mkdir(exist_ok=True)
    return {
        "args": _args(project, root / name, *extra, **kwargs),
        "nproc": nproc,
        "launch_config": project / launch,
        "env": {"IDS_DIR": str(ids), "PROBE_DIR": str(probe), **(env or {})},
    }


def _continue_from(source: Path, step: int, out: Path) -> None:
    """A fresh output_dir holding only `source`'s checkpoint of `step`, to be resumed with resume: auto."""
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)


def _killed_in_background_write(project: Path, root: Path) -> dict:
    """`async` again, every process SIGKILLed (as a lost node: the ranks, then the launcher) inside the background
    write of step 9: every rank's shards written and hashed, the manifest not yet (the main process's writer paused
    there by PAUSE_ENV), training going on meanwhile. What the output folder holds then, and after."""
    call, marker = _call(project, root, "async_killed", 2, "batch_size=8", "async_checkpoint=true", *EMA), root / "paused"
    checkpoints, log = root / "async_killed" / "checkpoints", root / "async_killed.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **call["env"], PAUSE_ENV: f"9:{marker}"}
    with open(log, "w") as output:
        launcher = subprocess.Popen(
            cli_command(call["args"], 2, launch_config=call["launch_config"]), env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 280
        while not marker.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached the write of step 9:\n{log.read_text()[-6000:]}"
        time.sleep(0.5)  # training goes on meanwhile (until the save of step 12 waits for this write)
    finally:
        for pid in child_pids(launcher.pid):  # the ranks first: the launcher's death alone makes them save and stop
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
    tmp = checkpoints / ".tmp-step_00000009"
    return {
        "tmp_files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
        "folders": sorted(p.name for p in checkpoints.iterdir()),
        "previous": verify(checkpoints / "step_00000006")["step"],  # raises unless every file matches its manifest
    }


@pytest.fixture(scope="module")
def runs(project, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    pool = ThreadPoolExecutor(1)  # async_killed beside the first wave
    killed_in_write = pool.submit(_killed_in_background_write, project, root)
    plain_one = root / "plain_one"  # the EMA without FSDP: one process, no launcher
    first = run_clis(
        _call(project, root, "one", 1, "batch_size=16", *EMA),
        _call(project, root, "two", 2, "batch_size=8", *EMA),
        _call(project, root, "accum", 2, "batch_size=4", "grad_accum_steps=2"),
        _call(project, root, "features", 2, *FEATURES, model_args=FEATURE_MODEL),
        # 96 samples / (2 x 8) = 6 steps per epoch; rank 0's 5th forward (the probe at 8 is the 1st) is step 4's.
        _call(project, root, "killed", 2, *FEATURES, model_args=FEATURE_MODEL, env={"KILL_AT_FORWARD": "5"}),
        _call(project, root, "batchnorm", 2, "batch_size=8", *ADAMW, model_args=BATCHNORM_MODEL),
        _call(project, root, "checkpointing_offload", 2, "batch_size=8", "max_steps=3", launch="fsdp_checkpointing_offload.yaml"),
        _call(project, root, "async", 2, "batch_size=8", "async_checkpoint=true"),
        {"args": _args(project, plain_one, "batch_size=16", *EMA)},
        check=False,
    )
    for result in first[:4] + first[5:]:
        assert result.returncode == 0, result.stderr[-6000:]
    assert first[4].returncode != 0, "the killed run was not killed"
    _continue_from(root / "batchnorm", 3, root / "batchnorm_resumed")
    # The async run's checkpoints of steps 6 and 9, the newer with one byte of rank 1's model shard flipped.
    _continue_from(root / "async", 6, root / "corrupt")
    _continue_from(root / "async", 9, root / "corrupt")
    shard = root / "corrupt" / "checkpoints" / "step_00000009" / "pytorch_model_fsdp_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # two's checkpoint of step 3 is 48 samples into epoch 0 (2 ranks x 8), one's also (1 rank x 16).
    resizes = {
        "two_to_one": ("two", 1, "batch_size=16", *EMA),
        "one_to_two": ("one", 2, "batch_size=8", *EMA),
        # 3 ranks x 8 = 24 divides the 48 samples done and the 48 left of epoch 0.
        # 3 + 2 steps end epoch 0; the step budget (epochs x 4 steps at 3 ranks) would end the run in epoch 1.
        "two_to_three": ("two", 3, "batch_size=8", "max_steps=9", *EMA),
    }
    resizes = {name: resizes[name] for name in [*RESIZES_SAMPLED, "two_to_three"]}
    for name, (source, *_) in resizes.items():
        _continue_from(root / source, 3, root / name)
    killed_in_write = killed_in_write.result()
    pool.shutdown()
    second = run_clis(
        {**_call(project, root, "killed", 2, *FEATURES, "resume=auto", model_args=FEATURE_MODEL), "env": {}},
        _call(project, root, "batchnorm_resumed", 2, "batch_size=8", *ADAMW, "resume=auto", model_args=BATCHNORM_MODEL),
        _call(project, root, "corrupt", 2, "batch_size=8", "resume=auto"),
        _call(project, root, "async_killed", 2, "batch_size=8", "async_checkpoint=true", *EMA, "resume=auto"),
        *(_call(project, root, name, nproc, *extra, "resume=auto") for name, (_, nproc, *extra) in resizes.items()),
    )
    return {
        "root": root,
        "killed_resumed": second[0],
        "corrupt": second[2],
        "killed_in_write": {**killed_in_write, "resumed": second[3]},
        "resized": dict(zip(resizes, second[4:])),
    }


def _probes(root: Path, name: str) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted((root / f"{name}-probe").glob("rank*.json"))}


def test_the_sharded_path_is_taken_and_checkpoints_hold_a_shard_per_rank(runs):
    root = runs["root"]
    for name, world, rows in [("one", 1, [128]), ("two", 2, [64, 64]), ("two_to_three", 3, [43, 43, 42])]:
        probes = _probes(root, name)
        assert sorted(probes) == list(range(world)), name
        assert all(p["dtensor"] and p["wrapped"].startswith("FSDP") for p in probes.values()), probes
        assert [probes[r]["rows"] for r in range(world)] == rows  # dim 0 of `big` split over the ranks
        checkpoint = sorted((root / name / "checkpoints").glob("step_*"))[-1]
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert manifest["distributed_type"] == "DistributedType.FSDP" and manifest["world_size"] == world
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(world)]
        assert not (checkpoint / "model.safetensors").exists()
    # bf16: the unsharded parameters the forward computes with are bf16 (FSDP2's MixedPrecisionPolicy).
    assert {p["compute_dtype"] for p in _probes(root, "features").values()} == {"torch.bfloat16"}
    assert {p["compute_dtype"] for p in _probes(root, "two").values()} == {"torch.float32"}


def test_activation_checkpointing_and_cpu_offload_run_on_cpu_and_change_nothing(runs, tmp_path):
    """fsdp_activation_checkpointing and fsdp_offload_params (unpinned without a GPU): the same first 3 steps."""
    root = runs["root"]
    probes = _probes(root, "checkpointing_offload")
    assert {p["big_module"] for p in probes.values()} == {"FSDPCheckpointWrapper"}
    assert {p["offload"] for p in probes.values()} == {"CPUOffloadPolicy(pin_memory=False)"}
    assert {p["offload"] for p in _probes(root, "two").values()} == {"OffloadPolicy()"}
    # Its final weights (step 3) are the plain run's checkpoint of step 3, bitwise.
    assert_weights_equal(load_weights(root / "checkpointing_offload"), _sharded_weights(root / "two", 3, tmp_path))


def _sharded_weights(run: Path, step: int, tmp_path: Path) -> dict:
    """A sharded checkpoint's model, consolidated in this process (torch.distributed.checkpoint's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{run.name}-{step}.pt"
    dcp_to_torch_save(run / "checkpoints" / f"step_{step:08d}" / "pytorch_model_fsdp_0", target)
    return torch.load(target, weights_only=True)["model"]


def test_two_ranks_match_one_rank_and_accumulation_the_big_batch(runs):
    """Same global batch of 16 in each run (SGD with momentum, 12 steps). Tolerance 1e-5 relative: the 2-rank
    gradient is the reduce-scatter (a sum over ranks, then / 2) of per-rank means of 8, the 1-rank one a mean
    of 16, and accumulation adds two micro-batch gradients first: equal in exact arithmetic, a few float32
    ulps apart."""
    root = runs["root"]
    one, two, accum = load_weights(root / "one"), load_weights(root / "two"), load_weights(root / "accum")
    assert_weights_equal(two, one, exact=False, rtol=1e-5, atol=1e-6)
    assert_weights_equal(accum, two, exact=False, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in val_records(root / "two")] == [r["step"] for r in val_records(root / "one")] == [6, 12]


def _exact_val_loss(project: Path, weights: dict) -> float:
    """The mean over all 23 validation samples, in one pass here, from the saved weights."""
    data = torch.load(project / "data.pt", weights_only=True)
    model = import_file(project / "fsdp_model.py", "fsdp_model_ref").FsdpModel().eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        x = torch.cat([data["val_x"], torch.zeros(NUM_VAL, 1)], dim=1)  # the id column, dropped by the model
        return torch.nn.functional.cross_entropy(model(x), data["val_y"]).item()


@pytest.mark.parametrize("name", ["two", "two_to_three"])
def test_validation_is_the_exact_mean_over_uneven_shards(project, runs, name):
    """23 samples: 12 + 11 on 2 ranks, 8 + 8 + 7 on 3; FSDP's forward is collective, so no rank may skip one."""
    out = runs["root"] / name
    last = val_records(out)[-1]
    assert last["val_samples"] == NUM_VAL and last["num_processes"] == {"two": 2, "two_to_three": 3}[name]
    reference = _exact_val_loss(project, load_weights(out))
    assert abs(last["val_loss"] - reference) <= 1e-6 * reference


@pytest.mark.parametrize("pair", [("killed", "features"), ("batchnorm_resumed", "batchnorm")])
def test_resumed_mid_epoch_is_bitwise_the_uninterrupted_run(runs, pair):
    """killed: bf16, tied weights and a batch size found by auto_batch_size, SIGKILLed in step 5, `resume: auto`.
    batchnorm_resumed: its checkpoint of step 4 finished; each rank updates its own statistics between
    validations and saves, and both use rank 0's (as DDP does), so the resumed run is the same run."""
    root = runs["root"]
    resumed, uninterrupted = (root / name for name in pair)
    assert_weights_equal(resumed, uninterrupted)
    assert [r["val_loss"] for r in val_records(resumed)] == [r["val_loss"] for r in val_records(uninterrupted)]
    if pair[0] == "killed":
        assert "resumed from" in runs["killed_resumed"].stdout and "step_00000003" in runs["killed_resumed"].stdout
        for out in (resumed, uninterrupted):
            assert "\nbatch_size: 8\n" in (out / "config.yaml").read_text()  # 16 did not fit
    else:
        weights = load_weights(uninterrupted)
        assert int(weights["norm.num_batches_tracked"]) == 2 * 6  # every training step of rank 0
        assert not torch.equal(weights["norm.running_var"], torch.ones(32))


@pytest.mark.parametrize("name", sampled_params([*RESIZES, "two_to_three"], [*RESIZES_SAMPLED, "two_to_three"]))
def test_resume_on_another_world_size_sees_each_sample_once_per_epoch(runs, name):
    """A sampled matrix (see RESIZES_SAMPLED): `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_fsdp.py` runs
    2 -> 1 and 1 -> 2 as well as 2 -> 3."""
    root = runs["root"]
    source, world = {"two_to_one": ("two", 1), "one_to_two": ("one", 2), "two_to_three": ("two", 3)}[name]
    assert f"written by {2 if source == 'two' else 1} processes" in runs["resized"][name].stdout
    before = [i for lines in read_ids(root / f"{source}-ids").values() for line in lines[:3] for i in line]  # its 3 steps
    after = read_ids(root / f"{name}-ids")
    rest = (NUM_TRAIN - 48) // (world * 8 if name != "two_to_one" else 16)  # forwards left in epoch 0, per rank
    epoch0 = before + [i for lines in after.values() for line in lines[:rest] for i in line]
    epoch1 = [i for lines in after.values() for line in lines[rest:] for i in line]
    assert sorted(epoch0) == sorted(epoch1) == list(range(NUM_TRAIN))
    if name != "two_to_three":  # the same global batch of 16: the finished run is the uninterrupted one, to 1e-5
        assert_weights_equal(root / name, root / source, exact=False, rtol=1e-5, atol=1e-6)


def test_each_rank_hashes_its_shards_and_a_corrupt_one_of_rank_1_is_skipped(runs):
    """The manifest's digest of each shard comes from the rank that wrote it (synchronous and asynchronous saves);
    on resume the ranks verify their shares, rank 1 finds its flipped byte, and `resume: auto` takes the previous
    checkpoint. The asynchronous run (each rank's shards written by a thread of its own) is the synchronous one,
    bitwise, and so is the run resumed from its checkpoint."""
    root = runs["root"]
    assert_weights_equal(root / "async", root / "two")
    for name, world in [("two", 2), ("two_to_three", 3), ("one", 1), ("async", 2)]:
        checkpoint = sorted((root / name / "checkpoints").glob("step_*"))[-1]
        files = json.loads((checkpoint / "manifest.json").read_text())["files"]
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert [files[f"{part}/__{r}_0.distcp"]["rank"] for r in range(world)] == list(range(world))
        assert [files[f"random_states_{r}.pkl"]["rank"] for r in range(world)] == list(range(world))
        assert {files[n]["rank"] for n in ("pytorch_model_fsdp_0/.metadata", "scheduler.bin", "config.yaml")} == {0}
    result = runs["corrupt"]
    assert (
        "auto skips corrupt checkpoint" in result.stderr
        and "step_00000009/pytorch_model_fsdp_0/__1_0.distcp does not match" in result.stderr
    )
    assert "resumed from" in result.stdout and "step_00000006 at optimizer step 6" in result.stdout
    assert_weights_equal(root / "corrupt", root / "two")  # the same run, from the async run's step 6


def test_sigkill_during_a_background_sharded_write_keeps_the_previous_checkpoint(runs):
    """async_checkpoint under FSDP2, every process SIGKILLed while step 9 is written in the background (each rank's
    shards on disk, no manifest): step 6 stays intact and verified, the half-written step 9 is never resumed, and
    the rerun with resume: auto is the uninterrupted run, bitwise."""
    root, seen = runs["root"], runs["killed_in_write"]
    shards = [f"{part}/__{r}_0.distcp" for part in ("optimizer_0", "pytorch_model_fsdp_0") for r in (0, 1)]
    assert set(shards) <= set(seen["tmp_files"]) and MANIFEST not in seen["tmp_files"], seen["tmp_files"]
    assert seen["folders"] == [".tmp-step_00000009", "step_00000003", "step_00000006"] and seen["previous"] == 6
    resumed = seen["resumed"]
    assert "resume: auto skips incomplete checkpoint" in resumed.stderr and ".tmp-step_00000009" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000006 at optimizer step 6" in resumed.stdout
    assert_weights_equal(root / "async_killed", root / "two")
    assert [r["val_loss"] for r in val_records(root / "async_killed")] == [r["val_loss"] for r in val_records(root / "two")]
    assert verify(root / "async_killed" / "checkpoints" / "step_00000009")["step"] == 9  # written again, whole


def test_ema_under_fsdp2_is_sharded_resumes_bitwise_and_reshards(runs, tmp_path):
    """The EMA under FSDP2 on 2 gloo ranks (moved here from tests/test_ema.py, on this module's runs): kept per shard
    (saved by each rank, ema_fsdp/), equal to the EMA of the same training on one process without FSDP (plain_one)
    and on one FSDP rank to 1e-5 (the reduce-scatter sums in another order); bitwise the uninterrupted run's after a
    SIGKILL (async_killed: every rank killed inside a background write of its shards, resumed); resharded by a
    checkpoint resumed on another world size (the sampled resize: 2 -> 1 or 1 -> 2 at the same global batch); and
    exported from a sharded checkpoint merged on one process."""
    root = runs["root"]
    checkpoint = root / "two" / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in (checkpoint / "ema_fsdp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoint.glob("custom_checkpoint_1.pkl"))  # not a whole copy on the main process
    assert_weights_equal(root / "async_killed" / "ema", root / "two" / "ema")
    for name in ["two", "one", *RESIZES_SAMPLED]:
        assert_weights_equal(root / name / "ema", root / "plain_one" / "ema", exact=False, rtol=1e-5, atol=1e-5)
    exported = export(checkpoint, tmp_path / "exported", ema=True)  # the shards merged on one process
    assert load_file(str(exported / "model.safetensors")).keys() == load_file(str(root / "plain_one" / "ema" / "model.safetensors")).keys()


def test_export_gathers_one_safetensors_that_load_model_loads_without_a_launcher(project, runs, tmp_path):
    """The sharded checkpoint of the last step, consolidated by export, is the run's final model.safetensors."""
    run = runs["root"] / "features"
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    subprocess.run([sys.executable, "-m", "dist_train", "export", str(last), "--out", str(tmp_path / "exported")], check=True)
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    final = load_weights(run)
    for key in final:
        assert torch.equal(exported[key], final[key]), key
    module = import_file(project / "fsdp_model.py", "fsdp_model_export")
    model = load_model(tmp_path / "exported", model=module.FsdpModel)  # this process: no launcher, no process group
    assert model.mid_again.weight is model.mid.weight  # still tied
    assert torch.equal(model.mid.weight, final["mid.weight"]) and torch.equal(model.big.weight, final["big.weight"])


def test_settings_that_cannot_run_on_cpu_are_one_line(monkeypatch, project, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP version 1 .* on a machine without a GPU: FSDP1 needs a GPU. Set fsdp_version: 2"):
        check_launch_backend(has_gpu=False)
    check_launch_backend(has_gpu=True)  # on GPUs Accelerate runs FSDP1 itself
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_launch_backend(has_gpu=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="deepspeed package is not installed: pip install deepspeed"):
        check_launch_backend(has_gpu=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")  # HSDP: 2 replicas x 2 shards
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    with pytest.raises(UserError, match=r"parallelism_config \(dp_replicate_size 2, dp_shard_size 2\) needs GPUs"):
        check_launch_backend(has_gpu=False)
    # Through the launcher: one line from each rank, exit 2, no traceback from inside Accelerate.
    for name in (
        "ACCELERATE_USE_FSDP",
        "FSDP_VERSION",
        "ACCELERATE_USE_PARALLELISM_CONFIG",
        "PARALLELISM_CONFIG_DP_REPLICATE_SIZE",
        "PARALLELISM_CONFIG_DP_SHARD_SIZE",
    ):
        monkeypatch.delenv(name)
    legacy = tmp_path / "fsdp1.yaml"
    legacy.write_text(FSDP_CPU_LAUNCH_CONFIG.read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    result = run_cli(_args(project, tmp_path / "run", "max_steps=1"), nproc=2, launch_config=legacy, check=False)
    assert result.returncode != 0
    assert "dist-train: error: the launch config asks for FSDP version 1" in result.stderr
    assert "no available devices" not in result.stderr and "Inconsistent compute device" not in result.stderr
