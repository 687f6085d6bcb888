"""In-job restarts: `accelerate launch --max_restarts N` (torchrun's elastic agent), real processes, gloo on CPU.

A rank killed mid-run: the agent restarts every rank, `resume: auto` continues from the newest complete
checkpoint, and the final weights are bitwise those of an uninterrupted run. A rank that fails at the same
step every time: the run stops naming the rank and the step. A restarted group that cannot form: it fails
within `startup_timeout_s`. The SLURM version (a rank killed on the second node) is in test_slurm.py;
tests/restart_trials.py repeats the kill-and-restart trial by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    CPU_LAUNCH_CONFIG,
    REPO,
    SLOW_MODEL,
    Background,
    _free_port,
    load_weights,
    read_metrics,
    seed_project_args,
    write_seed_project,
)

# A model whose forward raises on one rank at its N-th call since the process started: without a
# checkpoint before that step every attempt starts from step 0 and fails at the same optimizer step.
CRASH_MODEL = textwrap.dedent("""
    import os
    from model import MyModel

    class CrashModel(MyModel):
        def __init__(self, crash_rank=1, crash_at_call=3, **kwargs):
            super().__init__(**kwargs)
            self.crash = int(os.environ.get("RANK", "0")) == crash_rank
            self.crash_at_call, self.calls = crash_at_call, 0

        def forward(self, x):
            self.calls += self.training
            if self.crash and self.calls == self.crash_at_call:
                raise RuntimeError(f"boom in forward call {self.calls}")
            return super().forward(x)
""")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    files = {"slow_model.py": SLOW_MODEL, "crash_model.py": CRASH_MODEL}
    return write_seed_project(tmp_path_factory.mktemp("seed"), num_train=256, num_val=32, files=files)


def _args(project: Path, out: Path, *extra: str) -> list[str]:
    return [
        *seed_project_args(
            project,
            out,
            "batch_size=8",
            "log_every=1",
            "optimizer=sgd",
            "lr=0.05",
            "momentum=0.9",
            "seed=2",
            "epochs=3",
            "resume=auto",
            *extra,
        )
    ]


def _launch(args: list[str], max_restarts: int) -> subprocess.Popen:
    """`accelerate launch --max_restarts N` of 2 CPU processes (the static rendezvous of launch_configs/cpu.yaml)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_LAUNCH_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "--max_restarts",
        str(max_restarts),
        "-m",
        "dist_train",
        "train",
        *args,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def _workers(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (the agent runs inside the launcher process)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
        if parent == launcher.pid and rank is not None:
            found[rank] = int(entry.name)
    return found


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    pid = _workers(launcher).get(rank)
    assert pid is not None, f"no process of rank {rank} under launcher {launcher.pid}"
    return pid


def _wait_for_step(out: Path, launcher: subprocess.Popen, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = read_metrics(out) if (out / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= step for r in records):
            return
        assert launcher.poll() is None, launcher.communicate()[0][-4000:]
        time.sleep(0.2)
    raise AssertionError(f"training never reached optimizer step {step}")


def _finish(launcher: subprocess.Popen, timeout_s: float = 300) -> str:
    try:
        return launcher.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        for pid in _workers(launcher).values():  # each in its own session (torchrun): with its DataLoader workers
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        launcher.kill()
        output = launcher.communicate()[0]
        raise AssertionError(f"the launcher hung for {timeout_s} s:\n{output[-6000:]}") from None


@pytest.fixture(scope="module")
def launched(project, tmp_path_factory) -> dict:
    """The module's three launched jobs (a rank killed and restarted, a rank failing every attempt, a restarted group
    that cannot form), all started by the first test that asks, each in a thread: most of their time is waiting (the
    slow model's sleeps, restarts, a startup timeout), which one job at a time left a core idle. Each test asserts on
    what its own job did. (Every job is started, its environment read, before that test ends: no later test's
    monkeypatched variables reach it.)"""
    return {
        "killed": Background(_kill_a_rank_and_let_the_agent_restart_it, project, tmp_path_factory.mktemp("killed")),
        "same_step": Background(_fail_at_the_same_step_every_time, project, tmp_path_factory.mktemp("same_step")),
        "no_group": Background(_restart_a_group_that_cannot_form, tmp_path_factory.mktemp("no_group")),
    }


def _kill_a_rank_and_let_the_agent_restart_it(project: Path, root: Path) -> dict:
    args = lambda out: _args(project, out, "checkpoint_every=4", f"model={project / 'slow_model.py'}:SlowModel", "model_args.delay_s=0.05")
    reference = _launch(args(root / "reference"), max_restarts=0)
    run = _launch(args(root / "run"), max_restarts=2)
    _wait_for_step(root / "run", run, 6)
    os.kill(_rank_pid(run, 1), signal.SIGKILL)
    output = _finish(run)
    return {"root": root, "run": run, "output": output, "reference": reference, "reference_output": _finish(reference)}


def test_a_killed_rank_restarts_the_group_and_the_run_matches_an_uninterrupted_one(launched):
    """SIGKILL rank 1 after the checkpoint at step 4: the agent restarts both ranks, they resume from it,
    the job exits 0 and its final weights and metrics are those of an uninterrupted run."""
    seen = launched["killed"].result()
    tmp_path, run, output, reference = seen["root"], seen["run"], seen["output"], seen["reference"]
    assert run.returncode == 0, output[-6000:]
    assert "restart 1 (--max_restarts 2): attempt 1 failed at optimizer step" in output, output[-6000:]
    assert "rank 1 left no error record" in output, output[-6000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at optimizer step (\d+)", output)]
    assert len(resumed) == 1 and resumed[0] >= 4 and resumed[0] % 4 == 0, output[-6000:]

    reference_output = seen["reference_output"]
    assert reference.returncode == 0, reference_output[-4000:]
    expected, got = load_weights(tmp_path / "reference"), load_weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # metrics.jsonl continues: every step once, in order, the same losses as the uninterrupted run.
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "val_loss" not in r]
    assert steps == list(range(1, 49)), steps
    # The same losses as the uninterrupted run. (A validation record's train_loss is the mean since the
    # previous validation *in this process*: after a mid-epoch resume it covers the resumed steps only.)
    losses = lambda out: [(r["step"], r.get("val_loss"), None if "val_loss" in r else r["train_loss"]) for r in read_metrics(out)]
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    ledger = json.loads((tmp_path / "run" / "diagnostics" / "restart.json").read_text())
    first, second = ledger["attempts"]
    assert first["previous"] is None and second["previous"]["ranks"] == [1] and second["refused"] is None


def _fail_at_the_same_step_every_time(project: Path, root: Path) -> dict:
    out = root / "run"
    started = time.monotonic()
    run = _launch(_args(project, out, f"model={project / 'crash_model.py'}:CrashModel"), max_restarts=2)
    output = _finish(run)
    return {"out": out, "run": run, "output": output, "elapsed": time.monotonic() - started}


def test_a_rank_that_fails_at_the_same_step_every_time_stops_the_run_naming_it(launched):
    """Rank 1 raises in step 3 of every attempt: after two such attempts the third refuses to compute the
    same steps again, the launcher's restarts are used up and it fails; the output names rank 1 and step 3."""
    seen = launched["same_step"].result()
    out, run, output, elapsed = seen["out"], seen["run"], seen["output"], seen["elapsed"]
    assert run.returncode != 0, output[-6000:]
    assert output.count("dist_train: rank 1 failed at optimizer step 3: RuntimeError: boom in forward call 3") == 2, output[-6000:]
    assert (
        "restart 1 (--max_restarts 2): attempt 1 failed at optimizer step 3: rank 1 RuntimeError: boom in forward call 3; resuming"
    ) in output, output[-6000:]
    assert (
        "attempts 1 and 2 both failed at optimizer step 3: rank 1 RuntimeError: boom in forward call 3. A restart from the "
        "same checkpoint would fail there again, so this run stops"
    ) in output, output[-6000:]
    # The launcher's own table, once its restarts are used up, carries the same line.
    assert "both failed at optimizer step 3: rank 1 RuntimeError" in output[output.index("Root Cause") :], output[-3000:]
    ledger = json.loads((out / "diagnostics" / "restart.json").read_text())
    assert [(e["attempt"], bool(e["refused"])) for e in ledger["attempts"]] == [(1, False), (2, False), (3, True)]
    print(f"\nfailing run: 3 attempts (2 trained, the third refused at once) in {elapsed:.0f} s")


# A worker of a hand-rolled torchrun job: forms the group through make_accelerator (attempt 0), then rank 1
# dies; in attempt 1 rank 1 never comes back, so rank 0's group cannot form.
_NEVER_REJOINS = """
import os, sys, time
from dist_train.config import load_config
from dist_train.loop import make_accelerator

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(300)  # alive, but never joins the restarted group
started = time.monotonic()
try:
    make_accelerator(load_config(None, ["cpu=true", "startup_timeout_s=5", "hang_timeout_s=null", f"output_dir={sys.argv[1]}"]))
except Exception as exc:
    print(f"attempt {attempt} rank {rank}: no group after {time.monotonic() - started:.1f} s: {str(exc).splitlines()[0]}", flush=True)
    raise
print(f"attempt {attempt} rank {rank}: group formed", flush=True)
if rank == 1:
    os.kill(os.getpid(), 9)
time.sleep(300)  # the agent stops it to restart the group
"""


def _restart_a_group_that_cannot_form(tmp_path: Path) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(_NEVER_REJOINS)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "--max_restarts",
        "1",
        str(script),
        str(tmp_path / "out"),
    ]
    started = time.monotonic()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    return {"result": result, "elapsed": time.monotonic() - started}


def test_a_restarted_group_that_cannot_form_fails_within_the_startup_timeout(launched):
    """The process group is made with startup_timeout_s (not collective_timeout_s, 30 min) and with this
    attempt's keys: rank 0 waits for the restarted rank 1 for 5 s, never for the dead one's old address."""
    seen = launched["no_group"].result()
    result, elapsed = seen["result"], seen["elapsed"]
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "attempt 0 rank 0: group formed" in output and "attempt 0 rank 1: group formed" in output, output[-4000:]
    match = re.search(r"attempt 1 rank 0: no group after ([\d.]+) s: (.*)", output)
    assert match and float(match.group(1)) < 30, output[-4000:]
    assert "Connection refused" not in output and "connectFullMesh" not in output, output[-4000:]  # no stale address read
    assert elapsed < 180, f"took {elapsed:.0f} s"


def test_the_group_gets_the_collective_timeout_after_the_first_optimizer_step(tmp_path):
    """startup_timeout_s until the first optimizer step, collective_timeout_s from then on (a one-shot hook)."""
    import torch.distributed as dist

    from dist_train.faults.restarts import _TimeoutAfterFirstStep

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=5))
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    _TimeoutAfterFirstStep(77)
    assert backend.options._timeout == datetime.timedelta(seconds=5)
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    parameter.grad = torch.ones(2)
    optimizer.step()
    assert backend.options._timeout == datetime.timedelta(seconds=77)
    dist.group.WORLD.set_timeout(datetime.timedelta(seconds=9))
    optimizer.step()  # the hook removed itself: later steps change nothing
    assert backend.options._timeout == datetime.timedelta(seconds=9)


def test_the_restart_ledger_names_the_culprit_and_refuses_the_same_failure_twice(tmp_path, monkeypatch, capsys):
    """The main process's entry at each start, from the ranks' failure records (in-process)."""
    from dist_train.config import load_config
    from dist_train.faults import restarts

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # per agent: the ledger does not rely on it
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")

    def fail(rank: int, step: int, error: str) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setattr(restarts, "_completed_steps", lambda: step - 1)  # the record names the step in progress
        restarts.record_failure(cfg, error, announce=False)

    assert restarts._log_start(cfg, 2) is None  # the first start: an entry, no line
    assert capsys.readouterr().out == ""
    fail(0, 7, "RuntimeError: Connection reset by peer")  # rank 1 was killed: it left no record
    assert restarts._log_start(cfg, 2) is None
    assert "restart 1 (--max_restarts 3): attempt 1 failed at optimizer step 7: rank 1 left no error record" in capsys.readouterr().out
    fail(1, 3, "RuntimeError: boom")
    fail(0, 3, "RuntimeError: Connection reset by peer")  # later than rank 1's: rank 1 is the culprit
    assert restarts._log_start(cfg, 2) is None  # not attempt 1's failure
    assert "attempt 2 failed at optimizer step 3: rank 1 RuntimeError: boom; resuming (resume: auto)" in capsys.readouterr().out
    fail(1, 3, "RuntimeError: boom")
    fail(0, 3, "RuntimeError: Connection reset by peer")
    refusal = restarts._log_start(cfg, 2)
    assert refusal and refusal.startswith("attempts 2 and 3 both failed at optimizer step 3: rank 1 RuntimeError: boom. "), refusal
    assert capsys.readouterr().out.rstrip().endswith("; stopping")
    fail(0, 3, f"UserError: {refusal}")
    fail(1, 3, f"UserError: {refusal}")
    assert restarts._log_start(cfg, 2) == refusal  # sticky: every later attempt stops at once
    capsys.readouterr()
    ledger = json.loads((tmp_path / "diagnostics" / restarts.LEDGER).read_text())
    summaries = [(e["previous"] or {}).get("step") for e in ledger["attempts"]], [bool(e["refused"]) for e in ledger["attempts"]]
    assert summaries == ([None, 7, 3, 3, 3], [False, False, False, True, True])
    # Another job (another agent) starts a new history; no record of this one is read as its failure.
    monkeypatch.setattr(restarts, "_agent_started", lambda: 12345.0)
    assert restarts._log_start(cfg, 2) is None and capsys.readouterr().out == ""
    assert restarts._log_start(cfg, 2) is None
    assert "attempt 1 failed at an unknown step: ranks 0, 1 left no error record" in capsys.readouterr().out


_FORKING_HOLDER = """
import os, sys, time
from dist_train.checkpoint.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
read, write = os.pipe()
if os.fork() == 0:  # like a DataLoader worker, forked while the lock is held
    os.write(write, b"x")
    time.sleep(60)
    os._exit(0)
os.read(read, 1)
print("held", flush=True)
time.sleep(300)
"""


def test_the_run_lock_dies_with_its_holder_not_with_a_forked_child(tmp_path):
    """The main process holds output_dir's lock; a DataLoader worker forked from it must not keep it after
    a SIGKILL, or the restarted main process would find its own output_dir "in use by another run"."""
    from dist_train.checkpoint.run_lock import RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKING_HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        holder.kill()
        holder.wait()
        with RunLock(out):  # the forked child still runs
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
