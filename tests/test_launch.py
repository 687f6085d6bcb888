"""Launching: the accelerate configs, `dist-train doctor`, signals, no hangs, and the shell scripts' lint.

`launch_configs/cpu.yaml` launching a real 2-process training is proven by test_core.py
(test_seed_layout_trains_through_the_cli[2] and the N ranks = 1 rank test run through it).
The SLURM scripts run for real in test_slurm.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    REPO,
    SLOW_MODEL,
    child_pids,
    cli_command,
    load_weights,
    read_metrics,
    run_cli,
    run_clis,
    seed_project_args,
    start_cli,
    write_seed_project,
)

LAUNCH_CONFIGS = sorted((REPO / "launch_configs").glob("*.yaml"))
SHELL_SCRIPTS = sorted(
    [*(REPO / "slurm").glob("*.sbatch"), REPO / "tests" / "run.sh", REPO / ".ci" / "run", *(REPO / "tests" / "slurm_sandbox").glob("*.sh")]
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_seed_project(tmp_path_factory.mktemp("seed"), num_train=256, num_val=32, files={"slow_model.py": SLOW_MODEL})


def _slow_args(project: Path, out: Path, delay_s: float, *extra: str) -> list[str]:
    return [
        *seed_project_args(project, out, "batch_size=8", "log_every=1", "optimizer=sgd", "lr=0.05", "momentum=0.9", "seed=2", *extra),
        f"model={project / 'slow_model.py'}:SlowModel",
        f"model_args.delay_s={delay_s}",
    ]


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for pid in child_pids(launcher.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} under launcher {launcher.pid}")


def _wait_for_training(out: Path, launcher: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until the run has logged an optimizer step (its signal handlers are installed by then)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            return
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    raise AssertionError("training never logged a step")


def _launch(args: list[str], nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


# ---- launch configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_launch_config_loads_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # rejects unknown keys itself
    text = path.read_text()
    assert text.startswith("#") and "When to use" in text and ("What to change" in text or "what to change" in text.lower())
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
    if path.name in ("fsdp.yaml", "fsdp_cpu.yaml"):
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP"
        assert config.mixed_precision == ("bf16" if path.name == "fsdp.yaml" else "no") and config.use_cpu == (path.name == "fsdp_cpu.yaml")
    if path.name == "deepspeed_zero2.yaml":
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FSDP and DDP configs launch with 1 GPU)")
@pytest.mark.parametrize("name", ["single_gpu.yaml", "multi_gpu.yaml", "fsdp.yaml"])
def test_gpu_launch_configs_train(project, tmp_path, name):
    out = tmp_path / name
    extra = ["mixed_precision=bf16"] if name == "fsdp.yaml" else []
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch_configs" / name),
        "--num_processes",
        "1",
        "-m",
        "dist_train",
        "train",
        *seed_project_args(project, out, "epochs=1", *extra),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [r for r in read_metrics(out) if "val_loss" in r][-1]["num_processes"] == 1


# ---- doctor ------------------------------------------------------------------------------------
@pytest.mark.parametrize("nproc", [1, 2])
def test_doctor_prints_the_launch_and_passes(nproc):
    result = run_cli(["--timeout_s", "30", "lr=0.01"], nproc=nproc, subcommand="doctor")
    out = result.stdout
    assert f"world size {nproc} on 1 node(s)" in out, out
    assert ("backend gloo" in out) if nproc == 2 else ("single process" in out)
    for rank in range(nproc):
        assert re.search(rf"rank\s+{rank}\s+local rank\s+{rank}/{nproc}\s+node \S+\s+device cpu\s+config [0-9a-f]{{12}}", out), out
    assert f"all_reduce across {nproc} ranks: ok" in out and "OK: the launch is consistent" in out


def _start_rank(rank: int, port: int, overrides: list[str], extra_env: dict, timeout_s: float = 30) -> subprocess.Popen:
    """One rank started by hand with the variables every launcher sets (torchrun, srun wrappers)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
        **extra_env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dist_train", "doctor", "--timeout_s", str(timeout_s), *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_doctor_names_disagreeing_configs_and_a_node_count_mismatch():
    """Rank 1 resolves another lr, and SLURM says 2 nodes while both ranks share one host."""
    from helpers import _free_port

    port = _free_port()
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}
    ranks = [_start_rank(0, port, ["lr=0.1"], slurm), _start_rank(1, port, ["lr=0.2"], slurm)]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [1, 1], outputs
    stdout, stderr = outputs[0]
    assert "ranks disagree on the resolved config: rank(s) [1]" in stderr, stderr
    assert "processes != nodes x GPUs: the SLURM allocation has 2 nodes but the 2 ranks run on 1" in stderr, stderr
    assert "SLURM_NNODES=2" in stdout and "all_reduce across 2 ranks: ok" in stdout


def test_doctor_names_an_unreachable_main_address():
    from helpers import _free_port

    closed_port = _free_port()  # nothing listens there
    rank1 = _start_rank(1, closed_port, [], {}, timeout_s=2)
    unresolvable = _start_rank(1, closed_port, [], {"MASTER_ADDR": "no-such-host.invalid"}, timeout_s=2)
    _, stderr = rank1.communicate(timeout=120)
    assert rank1.returncode == 1
    assert f"main address 127.0.0.1:{closed_port} (127.0.0.1) unreachable from" in stderr, stderr
    _, stderr = unresolvable.communicate(timeout=120)
    assert unresolvable.returncode == 1 and "main address 'no-such-host.invalid' does not resolve" in stderr, stderr


# A stand-in for a rank that joins the process group and then never takes part in a collective
# (a stuck or deadlocked process): the other rank's collectives must fail after their timeout.
_SILENT_RANK = """
import datetime, sys, time
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
print("joined", flush=True)
time.sleep(float(sys.argv[1]))
"""


def _rank_env(rank: int, port: int) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
    }


def test_doctor_fails_when_the_smoke_test_times_out():
    """Rank 1 joins the group but never reaches the smoke test: rank 0 fails after --timeout_s, naming it."""
    from helpers import _free_port

    port = _free_port()
    silent = subprocess.Popen([sys.executable, "-c", _SILENT_RANK, "120"], env=_rank_env(1, port), stdout=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        rank0 = _start_rank(0, port, [], {}, timeout_s=3)
        _, stderr = rank0.communicate(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        silent.kill()
        silent.communicate()
    assert rank0.returncode == 1, stderr
    assert "FAILED: all_reduce smoke test on rank 0" in stderr and "did not complete within 3 s" in stderr, stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"  # the 3 s timeout, plus interpreter start-up under load


def test_doctor_fails_when_the_process_group_does_not_form():
    """WORLD_SIZE=2 but rank 1 never starts: rank 0 gives up after --timeout_s instead of waiting forever."""
    from helpers import _free_port

    started = time.monotonic()
    rank0 = _start_rank(0, _free_port(), [], {}, timeout_s=3)
    _, stderr = rank0.communicate(timeout=120)
    assert rank0.returncode == 1, stderr
    assert "FAILED: the process group did not form on rank 0" in stderr and "within 3 s" in stderr, stderr
    assert time.monotonic() - started < 60


def test_doctor_fails_and_says_so_when_the_all_reduce_sum_is_wrong(monkeypatch, capsys):
    """A collective that returns but with a wrong value: not "ok", exit 1 with the numbers."""
    from accelerate import Accelerator

    from dist_train.config import load_config
    from dist_train.doctor import run_doctor

    monkeypatch.setattr(Accelerator, "reduce", lambda self, tensor, reduction="sum": tensor * 0)
    assert run_doctor(load_config(None, ["cpu=true"]), timeout_s=5) == 1
    out, err = capsys.readouterr()
    assert "all_reduce across 1 ranks: FAILED (sum 0)" in out and ": ok" not in out, out
    assert "FAILED: all_reduce smoke test returned 0, expected 1" in err, err


def _view(rank: int, host: str, gpus: int = 0, uuid: str | None = None, precision: str | None = None) -> dict:
    return {
        "host": host,
        "rank": rank,
        "local_rank": 0,
        "local_world_size": 1,
        "gpus_on_node": gpus,
        "device": "cpu",
        "gpu_uuid": uuid,
        "config_sha": "0" * 12,
        "launcher_precision": precision,
        "slurm": {},
    }


def test_doctor_names_process_gpu_mismatches_shared_gpus_and_precision_conflicts():
    """The checks that need GPUs, judged from the ranks' views as the doctor gathers them."""
    from dist_train.config import load_config
    from dist_train.doctor import _problems

    cfg = load_config(None, [])
    # 2 nodes x 4 GPUs, but only 3 processes on node-b: processes != nodes x GPUs.
    views = [_view(r, "node-a", gpus=4, uuid=f"a{r}") for r in range(4)] + [_view(4 + r, "node-b", gpus=4, uuid=f"b{r}") for r in range(3)]
    (problem,) = _problems(views, cfg)
    assert problem.startswith("processes != nodes x GPUs: 3 processes on node-b, which has 4 GPUs") and "launched 7" in problem
    assert _problems(views[:4], cfg) == []
    # Ranks 0 and 1 on the same GPU.
    views = [_view(0, "node-a", gpus=2, uuid="GPU-x"), _view(1, "node-a", gpus=2, uuid="GPU-x")]
    assert _problems(views, cfg) == ["ranks [0, 1] share one GPU (GPU-x); check CUDA_VISIBLE_DEVICES and the process count"]
    # The launch config asks for bf16, the run config for none.
    (problem,) = _problems([_view(0, "node-a", precision="bf16")], cfg)
    assert problem.startswith("mixed precision: the launch config says bf16 but the run config says no")
    assert _problems([_view(0, "node-a", precision="bf16")], load_config(None, ["mixed_precision=bf16"])) == []


# ---- signals and failures ----------------------------------------------------------------------
def _signal_test_args(project: Path, out: Path, *extra: str) -> list[str]:
    """The run both signal tests interrupt: 2 ranks, 3 epochs of 16 steps, 0.05 s per forward."""
    return _slow_args(project, out, 0.05, "epochs=3", "resume=auto", *extra)


@pytest.fixture(scope="module")
def uninterrupted(project, tmp_path_factory):
    """The uninterrupted run (2 ranks) that the SIGTERM test and the dead-launcher test each end equal to: one run for
    both, started by the first test that asks, beside its interrupted runs. Call it for its output_dir, finished."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    launched = start_cli(_signal_test_args(project, out), nproc=2)
    done = []

    def finished() -> Path:
        if not done:
            done.append(launched.result())  # fails the test that asks if the run failed
        return out

    return finished


def test_sigterm_to_one_rank_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(project, uninterrupted, tmp_path):
    """TERM reaches rank 1 only: both ranks agree at the next step, save, exit 143 (stopped, not finished);
    the resumed run ≡ uninterrupted."""
    args = lambda out: _signal_test_args(project, out)
    interrupted = _launch(args(tmp_path / "run"))
    _wait_for_training(tmp_path / "run", interrupted)
    os.kill(_rank_pid(interrupted, 1), signal.SIGTERM)
    output, _ = interrupted.communicate(timeout=120)
    # Both ranks exit 143 after saving; the launcher reports them and exits non-zero itself.
    assert interrupted.returncode != 0 and re.search(r"exitcode\s*:\s*143", output), output[-4000:]
    assert "stopped by SIGTERM after saving a checkpoint; not requeueing" in output
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    stopped_at = int(saved[-1].name.split("_")[1])
    assert 0 < stopped_at < 48 and not (tmp_path / "run" / "model.safetensors").exists()

    resumed = run_cli(args(tmp_path / "run"), nproc=2)
    assert f"at optimizer step {stopped_at}" in resumed.stdout
    expected, got = load_weights(uninterrupted()), load_weights(tmp_path / "run")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_a_killed_rank_ends_the_whole_job_naming_it(project, tmp_path):
    """No hang: SIGKILL one of 2 ranks mid-training; the launcher stops the other and names rank 1."""
    job = _launch(_slow_args(project, tmp_path / "run", 0.2, "epochs=50"))
    _wait_for_training(tmp_path / "run", job)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    try:
        output, _ = job.communicate(timeout=60)  # the bound; the launcher needs about a second
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError("the job did not exit within 60 s of losing rank 1") from None
    assert job.returncode != 0
    root_cause = output[output.index("Root Cause") :]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause) and "SIGKILL" in root_cause, output[-3000:]


@contextlib.contextmanager
def _adopting_orphans():
    """While inside, this process adopts its orphaned descendants (PR_SET_CHILD_SUBREAPER) instead of
    init, so the test can wait for them and read their exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


_PR_SET_CHILD_SUBREAPER = 36


def _adopted(marker: Path) -> list[int]:
    """This process's children whose command line names `marker` (a run's folder)."""
    return [pid for pid in child_pids(os.getpid()) if str(marker).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _reap(pids: list[int], timeout_s: float) -> dict[int, int | None]:
    """pid -> exit status of each adopted process, waiting up to timeout_s; None for one still running (then killed)."""
    codes, deadline = {}, time.monotonic() + timeout_s
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in set(pids) - codes.keys():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    for pid in set(pids) - codes.keys():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        codes[pid] = None
    return codes


def test_a_dead_launcher_stops_its_workers_and_the_rerun_resumes_bitwise(project, uninterrupted, tmp_path):
    """SIGKILL to the launcher's process group (its workers live in sessions of their own): both workers
    notice, agree, save a checkpoint and exit 129 within 10 s, naming the launcher; the run lock is free at
    once and the rerun resumes from that checkpoint, ending bitwise as the uninterrupted run. Twice at once:
    logging to a file; and logging into a pipe that dies with the launcher (`| tee log`), with
    async_checkpoint (a background write every 2 steps) and 2 DataLoader workers per rank.
    Beside them, a run without a launcher (`python -m dist_train` in a shell that exits mid-run) trains on."""
    args = lambda out, *extra: _signal_test_args(project, out, *extra)
    configs = {"plain": [], "async": ["async_checkpoint=true", "checkpoint_every=2", "num_workers=2"]}
    with _adopting_orphans():
        nohup = subprocess.Popen(  # the shell exits once training runs; its orphan must not care
            [
                "bash",
                "-c",
                f'"$@" >{tmp_path}/nohup.log 2>&1 & echo $!; until [ -s {tmp_path}/nohup/metrics.jsonl ]; do sleep 0.2; done',
                "bash",
            ]
            + cli_command(_slow_args(project, tmp_path / "nohup", 0.05, "epochs=1")),
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        launchers, readers = {}, {}
        for name, extra in configs.items():
            with open(tmp_path / f"{name}.log", "w") as log:  # the workers write to the same file...
                output = log
                if name == "async":  # ...or, as `accelerate launch ... | tee log`, into a pipe whose reader dies with the launcher
                    readers[name] = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
                    output = readers[name].stdin
                launchers[name] = subprocess.Popen(
                    cli_command(args(tmp_path / name, *extra), nproc=2),
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, to kill as `kill -9 -PGID` would
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
        workers = {}
        for name, launcher in launchers.items():
            _wait_for_training(tmp_path / name, launcher)
        for name, launcher in launchers.items():  # both mid-run
            workers[name] = child_pids(launcher.pid)
            os.killpg(launcher.pid, signal.SIGKILL)
            if name in readers:
                readers[name].kill()
                readers[name].communicate()
            launcher.wait()  # its workers are this process's children from here on
        stopped = {name: _reap(pids, timeout_s=10) for name, pids in workers.items()}
        for name, launcher in launchers.items():
            _reap(_adopted(tmp_path / name), timeout_s=0)  # DataLoader workers left by their rank (they would end within 5 s)
            log = (tmp_path / f"{name}.log").read_text()
            assert sorted(stopped[name].values()) == [129, 129], (name, stopped[name], log[-4000:])
            for rank in (0, 1):  # the restart ledger's record, wherever the output went
                record = json.loads((tmp_path / name / "diagnostics" / f"failure-rank{rank}.json").read_text())
                assert record["error"] == "stopped by the launcher's death after saving a checkpoint (exit 129)", record
            if name not in readers:
                assert f"dist_train: error: the launcher of ranks 0, 1 (pid {launcher.pid} on " in log, log[-4000:]
                assert "died; every rank stopped after saving a checkpoint. Rerun the same command to resume" in log
        nohup_pid = int(nohup.stdout.readline())
        nohup.wait()
        assert _reap([nohup_pid], timeout_s=300) == {nohup_pid: 0}, (tmp_path / "nohup.log").read_text()[-4000:]
    assert (tmp_path / "nohup" / "model.safetensors").exists()

    saved = {}
    for name in configs:
        checkpoints = tmp_path / name / "checkpoints"
        assert not list(checkpoints.glob(".tmp-*")) and not (tmp_path / name / "model.safetensors").exists(), name
        saved[name] = int(sorted(checkpoints.glob("step_*"))[-1].name.split("_")[1])
        assert 0 < saved[name] < 48, (name, saved[name])
    reruns = run_clis(*({"args": args(tmp_path / name, *extra), "nproc": 2} for name, extra in configs.items()))
    for (name, rerun), step in zip(zip(configs, reruns), saved.values()):
        assert f"at optimizer step {step}" in rerun.stdout, (name, rerun.stdout[-3000:])
        expected, got = load_weights(uninterrupted()), load_weights(tmp_path / name)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)
    print(f"\nlauncher killed; the workers left {stopped} and saved at steps {saved}")


# ---- lint --------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_passes_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (tests/run.sh installs it with apt as root)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_requeue_targets_the_array_task_or_the_job(monkeypatch):
    from dist_train.faults.preemption import slurm_job_id

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert slurm_job_id() == "1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "1200_7"  # `scontrol requeue 1200_7`: this task, not the whole array


_SIDE_GROUP_RANK = """
import os, sys, time
import torch.distributed as dist
from dist_train.config import load_config
from dist_train.loop import make_accelerator
from dist_train.faults.preemption import Preemption

accelerator = make_accelerator(load_config(None, ["cpu=true", "collective_timeout_s=3", "hang_timeout_s=null"]))
dist.get_backend = lambda group=None: "nccl"  # take the GPU path: the flag goes through a side gloo group
preemption = Preemption(accelerator)
if int(os.environ["RANK"]) == 1:
    time.sleep(120)  # alive but never joins a round, like a rank stuck in a long step
started = time.monotonic()
try:
    preemption.requested()  # starts a round
    preemption.requested()  # waits for it: rank 1 never takes part
    print("no timeout", flush=True)
except RuntimeError as exc:
    print(f"timed out after {time.monotonic() - started:.1f} s: {str(exc).splitlines()[0]}", flush=True)
os._exit(0)
"""


def test_preemption_side_group_uses_the_collective_timeout():
    """On GPUs the flag is agreed over a side gloo group; it must time out after collective_timeout_s, not
    new_group's default 30 min (forced here on CPU by making the world look like NCCL)."""
    from helpers import _free_port

    port = _free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _SIDE_GROUP_RANK], env=_rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for rank in (0, 1)
    ]
    try:
        out, _ = ranks[0].communicate(timeout=120)
    finally:
        for rank in ranks:
            rank.kill()
        ranks[1].communicate()
    match = re.search(r"timed out after ([\d.]+) s", out)
    assert match and float(match.group(1)) < 30, out[-3000:]  # 3 s configured; 30 min without it
