"""The project's own sbatch scripts, submitted unmodified to a real SLURM.

By default the tests start a throw-away 2-node cluster on this machine (tests/slurm_sandbox/: Debian's
slurm packages, one network namespace per node; needs root) and stop it at the end. Environment:
  DIST_TRAIN_SLURM=sandbox (default)  the local cluster. Skipped, with the reason, only when its
      prerequisites are missing (not Linux, not root, neither apt-get nor preinstalled slurm); when
      they are present, a cluster that does not start fails the tests with the start script's output
  DIST_TRAIN_SLURM=external           submit to the cluster that `sbatch` on PATH reaches; then set
      DIST_TRAIN_SLURM_WORKDIR        a folder on a file system that every node sees
      DIST_TRAIN_SLURM_SBATCH_ARGS    extra sbatch flags (e.g. "--partition=debug --account=me")
      DIST_TRAIN_SETUP                how the job activates this Python environment (see slurm/)
      DIST_TRAIN_SLURM_JOB_TIMEOUT_S  how long a test waits for its job (default 240)
  DIST_TRAIN_SLURM=off                skip these tests

All jobs are submitted at once when the module starts, so the cluster runs them side by side; each
test waits for the job it asserts on. The three tests that kill a process of a running job (a rank, a rank to be
restarted, a node's launcher) do so from background threads started with the jobs, each as soon as its job has
trained enough, so that those jobs overlap the others instead of running one after another; each test then asserts
on what its thread saw. Jobs run on CPU (GPUS_PER_NODE=0) through the scripts' own
settings; the training config and overrides are the scripts' arguments.

Network rule: the sandbox keeps all traffic inside namespaces it made (and an `unreachable` route for
their subnet in the root namespace); every SLURM client runs through its wrappers in $SANDBOX/bin.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, SLOW_MODEL, Background, load_weights, read_metrics, write_seed_project

MODE = os.environ.get("DIST_TRAIN_SLURM", "sandbox")
SANDBOX_SCRIPTS = REPO / "tests" / "slurm_sandbox"
SANDBOX_DIR = Path(os.environ.get("DIST_TRAIN_SLURM_SANDBOX", "/tmp/dist_train-slurm-sandbox"))
# A stuck job fails its test instead of hanging the suite (raise it for a busy external cluster's queue).
JOB_TIMEOUT_S = float(os.environ.get("DIST_TRAIN_SLURM_JOB_TIMEOUT_S", 240))

# The preemption workload: 160 optimizer steps of >= 0.2 s (the model sleeps in forward, so the run
# lasts as long on any machine). `--signal=B:USR1@110` with `--time=2` makes SLURM signal at its
# first time-limit check after the start (checks run every 30 s), i.e. 0-30 s into the run, while
# the ~35 s training surely still runs (the batch shell repeats the signal until the trainer has
# its handler, so an early signal is not lost). One node with 2 processes and 2 nodes with one each
# train bit for bit alike (checked), so the single-node job is the uninterrupted twin of both.
TRAIN_OVERRIDES = ["epochs=10", "batch_size=8", "optimizer=sgd", "lr=0.05", "momentum=0.9", "seed=5", "log_every=4", "keep_last=2"]
PREEMPT_FLAGS = ["--time=2", "--signal=B:USR1@110"]
LAUNCHER_HANG_TIMEOUT_S = 60  # the mlauncher job's: every rank must end within it + 30 s of its node's launcher dying


def _sandbox_prerequisites_missing() -> str | None:
    if sys.platform != "linux":
        return "the SLURM sandbox needs Linux"
    if os.geteuid() != 0:
        return "the SLURM sandbox needs root (it installs slurm packages and creates network namespaces); set DIST_TRAIN_SLURM=external to use a real cluster"
    if not shutil.which("apt-get") and not (shutil.which("slurmctld") and shutil.which("ip")):
        return "the SLURM sandbox needs apt-get (Debian/Ubuntu) or preinstalled slurm packages and iproute2"
    return None


class Slurm:
    """Submits and watches jobs on one cluster; `env` holds the PATH of its client commands."""

    def __init__(self, env: dict, workdir: Path, extra_args: list[str], sandbox: bool):
        self.env, self.workdir, self.extra_args, self.sandbox = env, workdir, extra_args, sandbox

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def submit(self, script: str, name: str, args: list[str], sbatch_flags: list[str] = (), env: dict | None = None) -> Job:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        command = ["sbatch", "--parsable", f"--job-name={name}", *self.extra_args, *sbatch_flags, str(REPO / "slurm" / script), *args]
        result = subprocess.run(command, cwd=folder, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        job_id = result.stdout.strip().split(";")[0]
        return Job(self, job_id, folder / f"{name}-{job_id}.out", args)

    def job_fields(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))


class Job:
    def __init__(self, slurm: Slurm, job_id: str, log: Path, args: list[str] = ()):
        self.slurm, self.id, self.log, self.args = slurm, job_id, log, list(args)  # args: the script's
        self.raised_limit = False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def wait(self) -> dict:
        """Poll until the job has ended; returns its final `scontrol show job` fields."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            fields = self.slurm.job_fields(self.id)
            state = fields.get("JobState", "")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return fields
            time.sleep(1)
        self.slurm.run("scancel", self.id, check=False)
        raise AssertionError(f"job {self.id} did not end within {JOB_TIMEOUT_S} s; log:\n{self.log_text()[-5000:]}")


def _raise_time_limit_after_first_requeue(job: Job) -> None:
    """SLURM warns every run of a requeued job again (its warning flag is reset at each start). To get
    exactly one cycle, lift the limit after the first requeue, the way an admin would; a user of a real
    cluster may not, and then further cycles are allowed and counted. Runs in a thread: the requeue
    happens while other tests wait for their jobs."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        fields = job.slurm.job_fields(job.id)
        if int(fields.get("Restarts", "0") or 0) >= 1:
            result = job.slurm.run("scontrol", "update", f"JobId={job.id}", "TimeLimit=10", check=False)
            job.raised_limit = result.returncode == 0
            return
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ""):
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if MODE == "off":
        pytest.skip("DIST_TRAIN_SLURM=off")
    if MODE == "external":
        if not shutil.which("sbatch"):
            pytest.skip("DIST_TRAIN_SLURM=external but no sbatch on PATH")
        workdir = Path(os.environ.get("DIST_TRAIN_SLURM_WORKDIR") or tmp_path_factory.mktemp("slurm"))
        yield Slurm(dict(os.environ), workdir, shlex.split(os.environ.get("DIST_TRAIN_SLURM_SBATCH_ARGS", "")), sandbox=False)
        return
    if MODE != "sandbox":
        pytest.fail(f"DIST_TRAIN_SLURM={MODE!r}: use sandbox (the default), external or off")
    reason = _sandbox_prerequisites_missing()
    if reason:
        pytest.skip(reason)
    # From here on the sandbox can run on this machine: a cluster that does not come up is a failure
    # (with the reason), never a skip, so that CI cannot pass with every SLURM test skipped.
    # One pytest session at a time owns the sandbox: another session's teardown would stop it under us.
    SANDBOX_DIR.mkdir(parents=True, exist_ok=True)
    lock = open(SANDBOX_DIR / "pytest.lock", "w")
    deadline = time.monotonic() + 600
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                pytest.fail(f"another pytest session has held the SLURM sandbox ({SANDBOX_DIR / 'pytest.lock'}) for 600 s")
            time.sleep(1)
    if Path("/run/netns/slurm-head").exists() and not (SANDBOX_DIR / "state" / "mode").exists():
        lock.close()
        pytest.fail("another slurm sandbox (not this test's) is running on this machine; stop it first (stop-cluster.sh)")
    # 8 declared CPUs per node (the real cores are shared): room for all the module's jobs at once.
    env = {**os.environ, "SLURM_SANDBOX": str(SANDBOX_DIR), "SLURM_SANDBOX_ACCOUNTING": "0", "SLURM_SANDBOX_CPUS_PER_NODE": "8"}
    started = time.monotonic()
    try:
        start = subprocess.run(["bash", str(SANDBOX_SCRIPTS / "start-cluster.sh")], env=env, capture_output=True, text=True, timeout=300)
        failure = None if start.returncode == 0 else f"exit {start.returncode}"
        output = start.stdout + start.stderr
    except subprocess.TimeoutExpired as exc:
        failure = "no result within 300 s"
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "") for part in (exc.stdout, exc.stderr))
    if failure:
        subprocess.run(["bash", str(SANDBOX_SCRIPTS / "stop-cluster.sh"), "--purge"], env=env, capture_output=True, timeout=120)
        lock.close()
        pytest.fail(
            f"the SLURM sandbox did not start ({failure}); tests/slurm_sandbox/start-cluster.sh said:\n{output[-6000:]}", pytrace=False
        )
    print(f"\nslurm sandbox up in {time.monotonic() - started:.0f} s")
    env["PATH"] = f"{SANDBOX_DIR / 'bin'}:{env['PATH']}"  # every client goes through the namespace wrappers
    try:
        yield Slurm(env, tmp_path_factory.mktemp("slurm"), [], sandbox=True)
    finally:
        subprocess.run(["bash", str(SANDBOX_SCRIPTS / "stop-cluster.sh"), "--purge"], env=env, capture_output=True, timeout=120)
        lock.close()  # releases the flock


@pytest.fixture(scope="module")
def project(slurm) -> Path:
    folder = write_seed_project(slurm.workdir / "project", num_train=256, num_val=32, files={"slow_model.py": SLOW_MODEL})
    (folder / "run.yaml").write_text(
        textwrap.dedent(f"""
        model: {folder / "slow_model.py"}:SlowModel
        data: {folder / "dataloader.py"}:get_dataloader
        data_args: {{data_path: {folder / "data.pt"}}}
        progress: false
    """)
    )
    return folder


@pytest.fixture(scope="module")
def jobs(slurm, project):
    """Every job of this module, submitted together so that the cluster overlaps them."""
    cpu = {"GPUS_PER_NODE": "0", "DIST_TRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    config = ["--config", str(project / "run.yaml")]
    slow = ["model_args.delay_s=0.2", *TRAIN_OVERRIDES]
    submitted = {
        "single": slurm.submit(
            "train.sbatch", "single", [*config, *slow, f"output_dir={slurm.workdir / 'single' / 'out'}"], env={**cpu, "PROCS_PER_NODE": "2"}
        ),
        "preempt": slurm.submit(
            "train.sbatch",
            "preempt",
            [*config, *slow, f"output_dir={slurm.workdir / 'preempt' / 'out'}"],
            sbatch_flags=PREEMPT_FLAGS,
            env={**cpu, "PROCS_PER_NODE": "2"},
        ),
        "mpreempt": slurm.submit(
            "train_multinode.sbatch",
            "mpreempt",
            [*config, *slow, f"output_dir={slurm.workdir / 'mpreempt' / 'out'}"],
            sbatch_flags=[*PREEMPT_FLAGS, "--nodes=2"],
            env={**cpu, "PROCS_PER_NODE": "1"},
        ),
        "doctor2": slurm.submit(
            "train_multinode.sbatch", "doctor2", ["doctor", *config], sbatch_flags=["--nodes=2"], env={**cpu, "PROCS_PER_NODE": "1"}
        ),
        "multi": slurm.submit(
            "train_multinode.sbatch",
            "multi",
            [*config, "epochs=2", "batch_size=16", f"output_dir={slurm.workdir / 'multi' / 'out'}"],
            sbatch_flags=["--nodes=2"],
            env={**cpu, "PROCS_PER_NODE": "1", "DIST_TRAIN_SETUP": 'echo "setup ran on $(hostname)"'},
        ),
        # Runs (~10 min) until the test kills one of its ranks (or the teardown cancels it); no in-job restarts.
        "multikill": slurm.submit(
            "train_multinode.sbatch",
            "multikill",
            [*config, "model_args.delay_s=0.2", "epochs=300", "log_every=1", f"output_dir={slurm.workdir / 'multikill' / 'out'}"],
            sbatch_flags=["--nodes=2"],
            env={**cpu, "PROCS_PER_NODE": "1", "MAX_RESTARTS": "0"},
        ),
        # The single job's training on 2 nodes; a thread kills its rank on node2 and the agents restart it (MAX_RESTARTS: 3).
        "mrestart": slurm.submit(
            "train_multinode.sbatch",
            "mrestart",
            [*config, *slow, f"output_dir={slurm.workdir / 'mrestart' / 'out'}"],
            sbatch_flags=["--nodes=2"],
            env={**cpu, "PROCS_PER_NODE": "1"},
        ),
        # The same training; a thread SIGKILLs the launcher on node2, then resubmits it.
        "mlauncher": slurm.submit(
            "train_multinode.sbatch",
            "mlauncher",
            [*config, *slow, f"hang_timeout_s={LAUNCHER_HANG_TIMEOUT_S}", f"output_dir={slurm.workdir / 'mlauncher' / 'out'}"],
            sbatch_flags=["--nodes=2"],
            env={**cpu, "PROCS_PER_NODE": "1"},
        ),
    }
    for name in ("preempt", "mpreempt"):
        threading.Thread(target=_raise_time_limit_after_first_requeue, args=(submitted[name],), daemon=True).start()
    yield submitted
    for name in ("multikill", "mrestart", "mlauncher"):
        slurm.run("scancel", submitted[name].id, check=False)  # still running if its kill did not happen


@pytest.fixture(scope="module", autouse=True)
def kills(jobs, slurm):
    """The kills, each in its own thread started with the jobs (autouse: before the module's first test, not when the
    first test that asserts on one gets there), each as soon as its job has trained enough. Local sandbox only: they
    find the processes through /proc."""
    if not slurm.sandbox:
        return {}
    return {
        "multikill": Background(_kill_a_rank, jobs["multikill"], slurm),
        "mrestart": Background(_kill_a_rank_to_be_restarted, jobs["mrestart"], slurm),
        "mlauncher": Background(_kill_a_launcher_then_resubmit, jobs["mlauncher"], slurm),
    }


def _assert_completed(job: Job, fields: dict) -> None:
    assert fields.get("JobState") == "COMPLETED", (
        f"job {job.id}: {fields.get('JobState')} {fields.get('ExitCode')}\n{job.log_text()[-5000:]}"
    )


def test_single_node_job_completes_with_metrics_and_weights(jobs, slurm):
    job = jobs["single"]
    _assert_completed(job, job.wait())
    out = slurm.workdir / "single" / "out"
    records = [r for r in read_metrics(out) if "val_loss" in r]
    assert records[-1]["step"] == 160 and records[-1]["num_processes"] == 2
    assert (out / "model.safetensors").exists()
    assert f"job {job.id} restart 0 on node" in job.log_text()
    fields = job.slurm.job_fields(job.id)
    print(f"\nsingle-node job: {fields.get('StartTime')} -> {fields.get('EndTime')} ({fields.get('RunTime')})")


def test_two_node_job_is_one_distributed_job(jobs, slurm):
    doctor, multi = jobs["doctor2"], jobs["multi"]
    _assert_completed(doctor, doctor.wait())
    log = doctor.log_text()
    assert "world size 2 on 2 node(s); backend gloo" in log, log[-3000:]
    hosts = dict(re.findall(r"rank\s+(\d)\s+local rank\s+0/1\s+node (\S+)", log))
    assert hosts == {"0": "node1", "1": "node2"} or (not slurm.sandbox and len(set(hosts.values())) == 2), log[-3000:]
    assert "all_reduce across 2 ranks: ok" in log and "OK: the launch is consistent" in log

    _assert_completed(multi, multi.wait())
    records = [r for r in read_metrics(slurm.workdir / "multi" / "out") if "val_loss" in r]
    assert [r["num_processes"] for r in records] == [2, 2]
    assert records[-1]["step"] == 2 * 256 // (16 * 2)  # one job of 2 ranks, not two lone trainings
    assert multi.log_text().count("setup ran on") == 3  # DIST_TRAIN_SETUP: the batch shell, then each node's task
    assert re.search(r"node 0 \(\S+\) starts 1 processes", multi.log_text()) and re.search(
        r"node 1 \(\S+\) starts 1 processes", multi.log_text()
    )


def test_sandbox_holds_an_unreachable_route_for_its_subnet(slurm):
    """Network rule: while the namespaces exist, nothing the root namespace sends to their subnet leaves the machine."""
    if not slurm.sandbox:
        pytest.skip("a property of the local sandbox")
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^unreachable 10\.200\.0\.0/24\b", routes, re.MULTILINE), routes


def _assert_preempted_resumed_and_equal_to_the_uninterrupted_run(job: Job, jobs: dict, slurm: Slurm) -> str:
    """short limit -> USR1 -> checkpoint -> requeue -> resume -> COMPLETED, final weights == the single job's."""
    fields = job.wait()
    _assert_completed(job, fields)
    log = job.log_text()
    restarts = int(fields.get("Restarts", "0"))
    assert restarts == 1 if job.raised_limit else restarts >= 1, log[-5000:]
    assert "batch shell got USR1" in log and f"requeued SLURM job {job.id}" in log, log[-5000:]
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at optimizer step (\d+)", log)]
    assert len(resumed) == restarts and 0 < resumed[0] < 160, log[-5000:]
    usr1 = re.findall(r"batch shell got USR1 at (\d\d:\d\d:\d\d)", log)
    requeued = re.findall(r"requeued SLURM job", log)
    print(
        f"\n{job.log.stem}: submitted {fields.get('SubmitTime')}, USR1 at {usr1}, {len(requeued)} requeue(s), resumed at optimizer "
        f"step(s) {resumed}, last run {fields.get('StartTime')} -> {fields.get('EndTime')} ({fields.get('RunTime')})"
    )

    _assert_completed(jobs["single"], jobs["single"].wait())  # the uninterrupted twin
    reference, resumed_weights = load_weights(slurm.workdir / "single" / "out"), load_weights(job.log.parent / "out")
    assert reference.keys() == resumed_weights.keys()
    for key in reference:
        torch.testing.assert_close(resumed_weights[key], reference[key], rtol=0, atol=0)
    return log


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(jobs, slurm):
    _assert_preempted_resumed_and_equal_to_the_uninterrupted_run(jobs["preempt"], jobs, slurm)


def test_preempted_multinode_job_requeues_resumes_and_matches_an_uninterrupted_run(jobs, slurm):
    """The same through train_multinode.sbatch: USR1 to the batch shell reaches both nodes' trainers."""
    job = jobs["mpreempt"]
    log = _assert_preempted_resumed_and_equal_to_the_uninterrupted_run(job, jobs, slurm)
    runs = log.count(f"dist_train: job {job.id} restart ")
    assert (
        len(re.findall(r"node 0 \(\S+\) starts 1 processes", log)) == runs == len(re.findall(r"node 1 \(\S+\) starts 1 processes", log))
    ), log[-5000:]
    records = [r for r in read_metrics(job.log.parent / "out") if "val_loss" in r]
    assert {r["num_processes"] for r in records} == {2} and records[-1]["step"] == 160


def _job_process(job_id: str, rank: int) -> int | None:
    """The training process of `rank` in SLURM job `job_id` (this test's own job), found through /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and f"RANK={rank}".encode() in env and b"dist_train\0train" in cmdline:
            return int(entry.name)
    return None


def _kill_a_rank(job: Job, slurm: Slurm) -> dict:
    """Once the job trains: SIGKILL rank 1 (on node2); the job's fields once it has ended (within 60 s)."""
    metrics = slurm.workdir / "multikill" / "out" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and slurm.job_fields(job.id).get("JobState") in ("PENDING", "RUNNING"), job.log_text()[-3000:]
        time.sleep(0.5)
    pid = _job_process(job.id, rank=1)
    assert pid is not None, job.log_text()[-3000:]
    os.kill(pid, 9)
    deadline = time.monotonic() + 60  # the bound for "no hangs"
    while slurm.job_fields(job.id).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
        if time.monotonic() > deadline:
            slurm.run("scancel", job.id, check=False)
            raise AssertionError(f"job {job.id} still running 60 s after rank 1 died:\n{job.log_text()[-3000:]}")
        time.sleep(0.5)
    return slurm.job_fields(job.id)


def test_a_dead_rank_ends_the_multinode_job_naming_it(jobs, kills, slurm):
    """SIGKILL rank 1 (on node2): srun --kill-on-bad-exit stops node1's rank too; the log names rank 1."""
    if not slurm.sandbox:
        pytest.skip("kills a process through /proc: only on the local sandbox")
    job = jobs["multikill"]
    fields = kills["multikill"].result()
    assert fields.get("JobState") == "FAILED", fields
    log = job.log_text()
    assert re.search(r"rank\s*:\s*1 \(local_rank: 0\)", log) and "SIGKILL" in log, log[-3000:]


def _wait_for_step_20(job: Job, slurm: Slurm, out: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 20 for r in read_metrics(out))):
        assert time.monotonic() < deadline and slurm.job_fields(job.id).get("JobState") in ("PENDING", "RUNNING"), job.log_text()[-3000:]
        time.sleep(0.5)


def _kill_a_rank_to_be_restarted(job: Job, slurm: Slurm) -> None:
    """Once the job is past step 20 (the first epoch's checkpoint, step 16, written): SIGKILL rank 1, on node2."""
    _wait_for_step_20(job, slurm, slurm.workdir / "mrestart" / "out")
    pid = _job_process(job.id, rank=1)
    assert pid is not None, job.log_text()[-3000:]
    assert b"SLURM_NODEID=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"), "rank 1 is not on the second node"
    os.kill(pid, 9)


def test_a_rank_killed_on_the_second_node_is_restarted_and_the_job_matches_an_uninterrupted_run(jobs, kills, slurm):
    """SIGKILL rank 1 (node2) after the first epoch's checkpoint: both nodes' agents restart their ranks
    (c10d rendezvous), the run resumes from the checkpoint, the job completes with the single job's weights."""
    if not slurm.sandbox:
        pytest.skip("kills a process through /proc: only on the local sandbox")
    job, out = jobs["mrestart"], slurm.workdir / "mrestart" / "out"
    kills["mrestart"].result()
    _assert_completed(job, job.wait())
    log = job.log_text()
    assert "restart 1 (--max_restarts 3): attempt 1 failed at optimizer step" in log and "rank 1 left no error record" in log, log[-5000:]
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at optimizer step (\d+)", log)]
    assert len(resumed) == 1 and 16 <= resumed[0] < 160, log[-5000:]
    steps = [r["step"] for r in read_metrics(out) if "val_loss" not in r]
    assert steps == list(range(4, 161, 4)), steps  # metrics.jsonl continues: every logged step once
    _assert_completed(jobs["single"], jobs["single"].wait())
    reference, restarted = load_weights(slurm.workdir / "single" / "out"), load_weights(out)
    assert reference.keys() == restarted.keys()
    for key in reference:
        torch.testing.assert_close(restarted[key], reference[key], rtol=0, atol=0)
    fields = job.slurm.job_fields(job.id)
    print(f"\nmrestart: killed rank 1 on node2, resumed at optimizer step {resumed[0]}, {fields.get('RunTime')} in all")


def _launcher_process(job_id: str, node: int) -> int | None:
    """The `accelerate launch` process on node `node` of SLURM job `job_id`, found through /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job_id}".encode() in env
            and f"SLURM_NODEID={node}".encode() in env
            and b"\0-m\0accelerate.commands.launch\0" in cmdline
        ):
            return int(entry.name)
    return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_a_launcher_then_resubmit(job: Job, slurm: Slurm) -> dict:
    """Once the job is past step 20: SIGKILL the launcher on node2, watch its ranks stop (for up to hang_timeout_s +
    30 s), and once the job has ended, what it left; then the same job submitted again (the Job; not waited for)."""
    out = slurm.workdir / "mlauncher" / "out"
    _wait_for_step_20(job, slurm, out)
    ranks, launcher = [_job_process(job.id, rank) for rank in (0, 1)], _launcher_process(job.id, node=1)
    assert None not in ranks and launcher is not None, job.log_text()[-3000:]
    os.kill(launcher, 9)
    killed = time.monotonic()
    while any(map(_running, ranks)) and time.monotonic() - killed < LAUNCHER_HANG_TIMEOUT_S + 30:
        time.sleep(0.2)
    seen = {"launcher": launcher, "ranks": ranks, "ended_s": time.monotonic() - killed, "still_running": [r for r in ranks if _running(r)]}
    if seen["still_running"]:
        return {**seen, "log": job.log_text()}
    seen["fields"] = job.wait()
    seen["log"] = job.log_text()
    seen["saved"] = int(sorted((out / "checkpoints").glob("step_*"))[-1].name.split("_")[1])
    seen["final_weights_before_rerun"] = (out / "model.safetensors").exists()
    seen["rerun"] = slurm.submit(
        "train_multinode.sbatch",
        "mlauncher-rerun",
        job.args,
        sbatch_flags=["--nodes=2"],
        env={"GPUS_PER_NODE": "0", "DIST_TRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PROCS_PER_NODE": "1"},
    )
    return seen


def test_a_dead_launcher_on_the_second_node_stops_every_rank_and_the_resubmitted_job_resumes(jobs, kills, slurm):
    """SIGKILL the `accelerate launch` on node2 (its rank lives in a session of its own): the ranks of both
    nodes agree, save and stop within hang_timeout_s + 30 s, the log names rank 1's launcher; the job is
    resubmitted unchanged and resumes from that checkpoint, ending with the single job's weights."""
    if not slurm.sandbox:
        pytest.skip("kills a process through /proc: only on the local sandbox")
    out = slurm.workdir / "mlauncher" / "out"
    seen = kills["mlauncher"].result()
    launcher, ended_s, log = seen["launcher"], seen["ended_s"], seen["log"]
    fields = seen.get("fields", {})
    assert not seen["still_running"], f"ranks {seen['still_running']} still run {ended_s:.0f} s after:\n{log[-3000:]}"
    assert (
        f"dist_train: error: the launcher of rank 1 (pid {launcher} on node2) died; every rank stopped after saving a checkpoint" in log
    ), log[-5000:]
    saved = seen["saved"]
    assert 20 <= saved < 160 and not seen["final_weights_before_rerun"], saved

    rerun = seen["rerun"]
    _assert_completed(rerun, rerun.wait())
    assert re.search(rf"resumed from \S+ at optimizer step {saved}\b", rerun.log_text()), rerun.log_text()[-5000:]
    _assert_completed(jobs["single"], jobs["single"].wait())
    reference, resumed = load_weights(slurm.workdir / "single" / "out"), load_weights(out)
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0)
    print(
        f"\nmlauncher: killed node2's launcher at step >= 20; every rank ended {ended_s:.1f} s later ({fields.get('JobState')}), saved at step {saved}; the resubmitted job resumed and matched"
    )
