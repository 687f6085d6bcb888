"""Checkpoints: crash-safe saves, exact resume after a real SIGKILL, another world size, security, export.

Every run is a real `dist-train train` process (gloo for 2 ranks). The user project records the ids of
the samples it trains on (one file per rank) and can SIGKILL itself at a given forward pass, so the
tests see exactly what a preempted job sees.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train import UserError
from dist_train.checkpoint.manifest import MANIFEST, read_manifest, verify, write_manifest
from helpers import (
    assert_weights_equal,
    cli_command,
    ids_model,
    load_weights,
    read_ids,
    read_metrics,
    run_cli,
    run_clis,
    sample_cases,
    sampled_params,
    seed_project_args,
    train_in_process,
    val_records,
    write_seed_project,
)

# 1 process: 8 steps/epoch; 2 processes: 4 steps/epoch (batch 8 per process, 2 micro-batches per step).
EXACT = (
    "epochs=2",
    "batch_size=8",
    "grad_accum_steps=2",
    "checkpoint_every=3",
    "lr_schedule=linear",
    "warmup_steps=2",
    "seed=5",
    "log_every=2",
)
KILL_AT_FORWARD = {1: 21, 2: 14}  # rank 0's 21st / 14th training forward: inside step 11 / 7; last save 9 / 6

# Three real-process matrices here are sampled, each case being a few real runs: the SIGKILL-resume test on 1 or 2
# processes, the resume on another world size (2 -> 1 or 1 -> 2), and the asynchronous write killed before its
# files, its manifest or its rename (the synchronous save's kill always runs). DIST_TRAIN_MATRIX_SEED picks one case
# of each (helpers.sample_cases); DIST_TRAIN_FULL_MATRIX=1 runs every case:
#     DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_checkpoint.py
SIGKILL_SIZES = [1, 2]
SIGKILL_SAMPLED = sample_cases("checkpoint_sigkill", SIGKILL_SIZES)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The seed project; its model logs the ids it trains on, can SIGKILL itself, and has dropout (which
    draws from the torch RNG: a resume must restore it exactly)."""
    return write_seed_project(
        tmp_path_factory.mktemp("ckpt_seed"), num_train=128, num_val=40, ids=True, files={"model.py": ids_model(dropout=0.25)}
    )


def _args(project: Path, out: Path, *extra: str) -> list[str]:
    return seed_project_args(project, out, "resume=auto", *extra)


def _refused(args: list[str]) -> str:
    """The UserError of a run that must stop before its first step, run in this process (no start-up cost)."""
    with pytest.raises(UserError) as caught:
        train_in_process(args)
    return str(caught.value)


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs that the interrupted ones must reproduce bit for bit: on 1 process (every test here that
    needs one), and on 2 when the SIGKILL sample has 2 processes."""
    runs = {nproc: tmp_path_factory.mktemp(f"reference{nproc}") / "run" for nproc in sorted({1, *SIGKILL_SAMPLED})}
    run_clis(*({"args": _args(project, out, *EXACT), "nproc": nproc} for nproc, out in runs.items()))
    return runs


@pytest.mark.parametrize("nproc", sampled_params(SIGKILL_SIZES, SIGKILL_SAMPLED))
def test_sigkill_then_resume_is_bitwise_identical(project, reference, tmp_path, nproc):
    """A sampled matrix (see SIGKILL_SAMPLED): `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_checkpoint.py -k sigkill`
    runs 1 and 2 processes."""
    out = tmp_path / "run"
    killed = run_cli(_args(project, out, *EXACT), nproc=nproc, check=False, env={"KILL_AT_FORWARD": str(KILL_AT_FORWARD[nproc])})
    assert killed.returncode != 0 and not (out / "model.safetensors").exists()
    last_saved = {1: 9, 2: 6}[nproc]
    assert max(read_manifest(p)["step"] for p in (out / "checkpoints").glob("step_*")) == last_saved
    resumed = run_cli(_args(project, out, *EXACT), nproc=nproc)
    assert f"step_{last_saved:08d} at optimizer step {last_saved} (epoch 1, " in resumed.stdout  # mid-epoch
    assert_weights_equal(out, reference[nproc])
    # metrics.jsonl continues the run: the killed run's records after the checkpoint are not repeated.
    logged = [r["step"] for r in read_metrics(out) if "val_loss" not in r]
    assert logged == [r["step"] for r in read_metrics(reference[nproc]) if "val_loss" not in r]


def _read_ids(ids_dir: Path) -> dict[int, list[int]]:
    """rank -> every id it trained on, in order."""
    return {rank: [i for batch in batches for i in batch] for rank, batches in read_ids(ids_dir).items()}


def _epoch_ids(first: dict, second: dict, first_epoch_rest: int, world_sizes: tuple[int, int]) -> list[list[int]]:
    """Ids trained on in epochs 0 and 1 over both runs (per-rank logs, split where epoch 0 ends)."""
    per_rank_rest = first_epoch_rest // world_sizes[1]
    epoch0 = [i for ids in first.values() for i in ids] + [i for ids in second.values() for i in ids[:per_rank_rest]]
    epoch1 = [i for ids in second.values() for i in ids[per_rank_rest:]]
    return [sorted(epoch0), sorted(epoch1)]


RESIZES = [(2, 1), (1, 2)]
RESIZES_SAMPLED = sample_cases("checkpoint_resize", RESIZES)
RESIZE_COMMON = ("epochs=2", "batch_size=8", "checkpoint_every=1")


@pytest.fixture(scope="module")
def resized(project, tmp_path_factory) -> dict[tuple[int, int], dict]:
    """The sampled resizes at once: stopped after 3 steps on one world size, then finished on the other."""
    cases = {sizes: {"root": tmp_path_factory.mktemp(f"resized{sizes[0]}to{sizes[1]}")} for sizes in RESIZES_SAMPLED}
    for case in cases.values():
        case["out"], case["ids"] = case["root"] / "run", (case["root"] / "ids0", case["root"] / "ids1")
        case["ids"][0].mkdir(), case["ids"][1].mkdir()
    run_clis(
        *(
            {"args": _args(project, case["out"], *RESIZE_COMMON, "max_steps=3"), "nproc": sizes[0], "env": {"IDS_DIR": str(case["ids"][0])}}
            for sizes, case in cases.items()
        )
    )
    # 1 rank x 8, 3 steps = 24 samples in: a global batch of 16 (here 1 rank x 16; 2 x 8 alike) cannot deal the rest exactly.
    if (1, 2) in cases:
        cases[1, 2]["refusal"] = _refused(_args(project, cases[1, 2]["out"], *RESIZE_COMMON, "batch_size=16", "max_steps=null"))
    # The same global batch as the first run: 2 ranks x 4 = 8; 1 rank x 8 = 8 divides 48 (2 ranks x 8 x 3 steps).
    second_batch = {(2, 1): "batch_size=8", (1, 2): "batch_size=4"}
    results = run_clis(
        *(
            {
                "args": _args(project, case["out"], *RESIZE_COMMON, second_batch[sizes], "max_steps=null"),
                "nproc": sizes[1],
                "env": {"IDS_DIR": str(case["ids"][1])},
            }
            for sizes, case in cases.items()
        )
    )
    for case, result in zip(cases.values(), results):
        case["resumed"] = result
    return cases


@pytest.mark.parametrize("sizes", sampled_params(RESIZES, RESIZES_SAMPLED))
def test_resume_on_another_world_size_sees_each_sample_once_per_epoch(resized, sizes):
    """Stopped mid-epoch on one world size, finished on the other: the rest of the epoch is exactly what was left.
    A sampled matrix (see RESIZES_SAMPLED): `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_checkpoint.py -k
    another_world_size` runs both directions."""
    case = resized[sizes]
    out, (first_ids, second_ids) = case["out"], case["ids"]
    consumed = 3 * 8 * sizes[0]  # 2 ranks x 8: 3 steps = 48 of 128 samples; 1 rank x 8: 3 steps = 24 samples.
    if sizes == (1, 2):
        assert "does not divide" in case["refusal"] and "step_00000003" in case["refusal"]
    assert f"written by {sizes[0]} processes" in case["resumed"].stdout
    epochs = _epoch_ids(_read_ids(first_ids), _read_ids(second_ids), 128 - consumed, sizes)
    assert epochs == [list(range(128)), list(range(128))]
    assert [r["epoch"] for r in val_records(out)] == [0, 0, 1] and val_records(out)[-1]["num_processes"] == sizes[1]


KILL_PHASES = ["sync", "files", "manifest", "rename"]  # a synchronous save; an asynchronous write before each part
ASYNC_KILL_SAMPLED = sample_cases("checkpoint_async_kill", KILL_PHASES[1:])


def _kill_during_save(project: Path, root: Path, phase: str) -> dict:
    """A run paused in the save of step 12 (sync: its files written, no manifest yet; async: training goes on
    meanwhile, before the write's files, manifest or rename) and SIGKILLed there, then resumed."""
    out, marker = root / "run", root / "paused"
    extra = () if phase == "sync" else ("async_checkpoint=true",)
    spec = f"12:{marker}" if phase in ("sync", "manifest") else f"12:{phase}:{marker}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_TRAIN_TEST_PAUSE_IN_SAVE": spec}
    proc = subprocess.Popen(cli_command(_args(project, out, *EXACT, *extra)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never reached the save of step 12"
        seen = {"files_without_manifest": (out / "checkpoints" / ".tmp-step_00000012" / "model.safetensors").exists()}
        if phase != "sync":
            time.sleep(0.5)  # training goes on meanwhile (until the next save waits for this one)
    finally:
        proc.kill()  # SIGKILL in the middle of the save
        proc.wait()
    seen["step_12"] = (out / "checkpoints" / "step_00000012").exists()
    seen["step_9"] = (out / "checkpoints" / "step_00000009").exists()
    seen["resumed"] = run_cli(_args(project, out, *EXACT, *extra))
    seen["tmp_left"] = (out / "checkpoints" / ".tmp-step_00000012").exists()
    seen["out"] = out
    return seen


@pytest.fixture(scope="module")
def killed_in_save(project, tmp_path_factory):
    """The synchronous and the sampled asynchronous kill-and-resume runs at once (one thread each); a test gets its
    own's result or failure."""
    phases = ["sync", *ASYNC_KILL_SAMPLED]
    pool = ThreadPoolExecutor(len(phases))
    futures = {phase: pool.submit(_kill_during_save, project, tmp_path_factory.mktemp(f"kill_{phase}"), phase) for phase in phases}
    yield futures
    pool.shutdown()


def test_kill_during_save_keeps_the_previous_checkpoint(killed_in_save, reference):
    seen = killed_in_save["sync"].result()
    assert seen["files_without_manifest"]  # files written, no manifest
    assert not seen["step_12"]
    resumed = seen["resumed"]
    assert "skips incomplete checkpoint" in resumed.stderr and ".tmp-step_00000012" in resumed.stderr
    assert "step_00000009 at optimizer step 9" in resumed.stdout
    assert_weights_equal(seen["out"], reference[1])
    assert not seen["tmp_left"]  # cleaned up by the next save


@pytest.mark.parametrize("phase", sampled_params(KILL_PHASES[1:], ASYNC_KILL_SAMPLED))
def test_kill_during_an_asynchronous_write_keeps_the_previous_checkpoint(killed_in_save, reference, phase):
    """async_checkpoint: training goes on while step 12 is written; SIGKILL before its files, its manifest or
    its rename: resume takes step 9, and the final weights are those of the uninterrupted synchronous run. A sampled
    matrix (see ASYNC_KILL_SAMPLED): `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_checkpoint.py -k
    asynchronous_write` runs all three phases."""
    seen = killed_in_save[phase].result()
    assert not seen["step_12"] and seen["step_9"]
    assert "step_00000009 at optimizer step 9" in seen["resumed"].stdout
    assert_weights_equal(seen["out"], reference[1])


def _plant_pickle(path: Path, marker: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    torch.save({"epoch": Exploit()}, path)


def test_planted_pickle_is_never_executed(reference, project, tmp_path):
    source = sorted((reference[1] / "checkpoints").glob("step_*"))[-1]
    marker = tmp_path / "pwned"
    # 1. A modified file fails its hash before anything is loaded.
    tampered = shutil.copytree(source, tmp_path / "tampered")
    _plant_pickle(tampered / "optimizer.bin", marker)
    error = _refused(_args(project, tmp_path / "a", *EXACT, f"resume={tampered}"))
    assert "is not a usable checkpoint" in error and "optimizer.bin" in error
    # 2. Even with a re-hashed manifest, the TrainState file (which Accelerate itself would unpickle
    #    with weights_only=False) is read with weights_only=True and refused.
    rehashed = shutil.copytree(source, tmp_path / "rehashed")
    _plant_pickle(rehashed / "custom_checkpoint_0.pkl", marker)
    info = {k: v for k, v in json.loads((rehashed / MANIFEST).read_text()).items() if k != "files"}
    write_manifest(rehashed, info)
    verify(rehashed)
    error = _refused(_args(project, tmp_path / "b", *EXACT, f"resume={rehashed}"))
    assert "refusing to unpickle" in error and "custom_checkpoint_0.pkl" in error
    assert not marker.exists(), "the planted pickle was executed"


def test_checkpoint_of_another_model_names_the_tensors(reference, project, tmp_path):
    source = sorted((reference[1] / "checkpoints").glob("step_*"))[-1]
    error = _refused(_args(project, tmp_path / "run", *EXACT, "model_args={hidden: 8}", f"resume={source}"))
    assert "fc1.weight (checkpoint [32, 16], model [8, 16])" in error and "fc2.weight" in error


def test_full_disk_is_a_clear_error_and_leaves_checkpoints_untouched(project, tmp_path):
    out = tmp_path / "run"
    run_cli(_args(project, out, "epochs=1", "batch_size=16"))
    before = {p.name: verify(p)["files"] for p in (out / "checkpoints").glob("step_*")}
    # RLIMIT_FSIZE makes every write past 8 kB fail (EFBIG) as a full disk would; optimizer.bin is ~10 kB.
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        cli_command(_args(project, out, "epochs=2", "batch_size=16")),
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot write a checkpoint" in result.stderr and "existing checkpoints are untouched" in result.stderr
    after = {p.name: verify(p)["files"] for p in (out / "checkpoints").glob("step_*")}
    assert after == before and not list((out / "checkpoints").glob(".tmp-*"))


def test_lifecycle_keep_last_keep_best_auto_and_corrupt_checkpoints(project, tmp_path):
    out = tmp_path / "run"
    # monitor_mode: max keeps the *worst* val_loss (epoch 0's) as "best": an old checkpoint keep_last would prune.
    args = _args(project, out, "batch_size=32", "keep_last=2", "keep_best=true", "monitor_mode=max")
    first = run_cli([*args, "epochs=4"])  # resume: auto with no checkpoints starts fresh
    assert "resumed" not in first.stdout
    records = val_records(out)
    best_step = max(records, key=lambda r: r["val_loss"])["step"]
    kept = sorted(read_manifest(p)["step"] for p in (out / "checkpoints").glob("step_*"))
    assert kept == sorted({best_step, 12, 16}) and best_step < 12
    manifest = verify(out / "checkpoints" / "step_00000016")
    assert (
        manifest["epoch"] == 4
        and manifest["samples_consumed"] == 0
        and manifest["world_size"] == 1
        and manifest["versions"]["torch"] == torch.__version__
    )
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "config.yaml"} <= manifest[
        "files"
    ].keys()
    final = load_weights(out)

    again = run_cli([*args, "epochs=4"])  # auto on a finished run: resumes at its last step, trains nothing
    assert "at optimizer step 16" in again.stdout and "finished at optimizer step 16" in again.stdout
    assert all(torch.equal(load_weights(out)[k], final[k]) for k in final)

    newest = out / "checkpoints" / "step_00000016"
    with open(newest / "optimizer.bin", "r+b") as f:
        f.truncate(100)
    (out / "checkpoints" / "step_00000099").mkdir()  # a folder without a manifest
    explicit = _refused([*args, "epochs=5", f"resume={newest}"])
    assert "is not a usable checkpoint" in explicit and "optimizer.bin has 100 bytes" in explicit and "truncated" in explicit
    extended = run_cli([*args, "epochs=5"])
    assert "skips corrupt checkpoint" in extended.stderr and "step_00000016" in extended.stderr and "step_00000099" in extended.stderr
    assert "from " + str(out / "checkpoints" / "step_00000012") in extended.stdout
    assert "resume: never" in _refused(seed_project_args(project, out, "epochs=5"))


def test_fast_dev_run_writes_no_checkpoints(project, tmp_path):
    train_in_process(_args(project, tmp_path / "run", "fast_dev_run=2"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_and_load_model(reference, tmp_path):
    from dist_train import load_model
    from dist_train.cli import main

    assert main(["export", str(reference[1]), "--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "single" / "model.safetensors").exists()
    model = load_model(tmp_path / "single", trust_code=True)  # our own export
    want = load_weights(reference[1])
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)

    checkpoint = reference[1] / "checkpoints" / "step_00000016"
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "sharded"), "--max-shard-size", "1KB"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = load_model(tmp_path / "sharded", trust_code=True)
    assert all(torch.equal(sharded.state_dict()[k], want[k]) for k in want)
    assert load_file(str(tmp_path / "single" / "model.safetensors")).keys() == want.keys()


def _fsdp_layout(source: Path, folder: Path, extra: dict | None = None) -> Path:
    """A copy of `source` laid out as Accelerate's FSDP SHARDED_STATE_DICT writes it (the model as a
    torch.distributed.checkpoint folder instead of model.safetensors), re-hashed: built on CPU in one
    process, since FSDP itself needs GPUs."""
    import torch.distributed.checkpoint as dcp

    checkpoint = shutil.copytree(source, folder)
    weights = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    dcp.save({"model": weights, **(extra or {})}, checkpoint_id=str(checkpoint / "pytorch_model_fsdp_0"))
    write_manifest(checkpoint, {k: v for k, v in read_manifest(checkpoint).items() if k != "files"})
    return checkpoint


def test_fsdp_sharded_state_is_consolidated_on_export_and_vetted_before_unpickling(reference, project, tmp_path):
    """DCP unpickles its .metadata and non-tensor values with weights_only=False: dist_train vets both first."""
    from dist_train import load_model
    from dist_train.export import export

    source = sorted((reference[1] / "checkpoints").glob("step_*"))[-1]
    sharded = _fsdp_layout(source, tmp_path / "sharded")
    model = load_model(export(sharded, tmp_path / "exported"), trust_code=True)
    want = load_weights(reference[1])
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    planted_value = _fsdp_layout(source, tmp_path / "planted_value", extra={"note": Exploit()})
    with pytest.raises(UserError, match=r"value 'note' holds pickled objects other than tensors"):
        export(planted_value, tmp_path / "never")
    planted_metadata = _fsdp_layout(source, tmp_path / "planted_metadata")
    (planted_metadata / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(Exploit()))  # DCP reads it with pickle.load
    write_manifest(planted_metadata, {k: v for k, v in read_manifest(planted_metadata).items() if k != "files"})
    error = _refused(_args(project, tmp_path / "run", *EXACT, f"resume={planted_metadata}"))
    assert ".metadata is not a plain torch.distributed.checkpoint metadata file" in error
    assert not marker.exists(), "the planted pickle was executed"


def test_manifest_pieces_catch_a_flipped_byte_anywhere(tmp_path, monkeypatch):
    """Loads verify 64 MiB pieces in parallel (small pieces here): every piece is checked, and a
    manifest without pieces falls back to the whole-file SHA-256."""
    import hashlib

    from dist_train.checkpoint import manifest as manifest_module
    from dist_train.checkpoint.manifest import InvalidCheckpoint

    monkeypatch.setattr(manifest_module, "PIECE_BYTES", 1000)
    data = os.urandom(3500)
    (tmp_path / "weights.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    written = write_manifest(tmp_path, {"step": 1})
    entry = written["files"]["weights.bin"]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["pieces"] == [hashlib.sha256(data[i : i + 1000]).hexdigest() for i in range(0, 3500, 1000)]
    verify(tmp_path)
    for offset in (0, 999, 1000, 3499):  # first, last byte of a piece, and of the file
        flipped = bytearray(data)
        flipped[offset] ^= 1
        (tmp_path / "weights.bin").write_bytes(bytes(flipped))
        with pytest.raises(InvalidCheckpoint, match="weights.bin does not match its SHA-256"):
            verify(tmp_path)
    (tmp_path / "weights.bin").write_bytes(data)
    legacy = json.loads((tmp_path / MANIFEST).read_text())
    for file_entry in legacy["files"].values():
        del file_entry["pieces"]
    (tmp_path / MANIFEST).write_text(json.dumps(legacy))
    verify(tmp_path)
    (tmp_path / "weights.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(InvalidCheckpoint, match="weights.bin does not match"):
        verify(tmp_path)
