"""In-job restarts under torchrun's elastic agent: `accelerate launch --max_restarts N`.

When a rank dies (a crash, SIGKILL, the OOM killer) the agent stops the other ranks and starts all of
them again, up to N times; `resume: auto` continues from the newest complete checkpoint. The agent is
torch's, not ours. What dist_train adds:

- **Per-attempt store keys** (`process_group_kwargs`). Under the static rendezvous (accelerate's
  default) the agent makes one TCPStore for its whole life and the workers use it
  (`TORCHELASTIC_USE_AGENT_STORE=True`; torch 2.13's `_create_c10d_store` adds no per-attempt prefix,
  assuming a new store per attempt). The process group keeps each rank's gloo address there under
  fixed keys, so a restarted rank can read the address of a dead rank of the previous attempt.
  Depending on the (random) ports, the group then forms, fails at once ("Connection refused"), or
  both ranks wait for the other to connect until the process-group timeout (collective_timeout_s,
  times gloo's retries): the hang seen in the first trials. The process group is therefore made
  through `dist-train-attempt://`, torch's env:// rendezvous with the attempt in every key. The
  attempt is each rank's own count of its starts, kept in that store: every rank starts once per
  attempt, so the count is the same on all of them (the agents' TORCHELASTIC_RESTART_COUNT is not:
  an agent restarting for another node's failure does not count it).
- **A start-up timeout.** The process group is made with `startup_timeout_s` (or
  `collective_timeout_s` if shorter): a group that cannot form fails within it. After the first
  optimizer step the group's timeout becomes `collective_timeout_s`.
- **A failure ledger.** A rank that fails writes `output_dir/diagnostics/failure-rank{R}.json` (its
  optimizer step and error; a killed rank writes nothing, which names it too). At every start the main
  process adds an entry to `diagnostics/restart.json`; at a restart it sums the previous attempt up
  there and in one line. When two attempts in a row failed at the same optimizer step on the same
  rank(s), the run stops instead of training the same steps again (the agent ends the job once its
  restarts are used up).

Multi-node jobs need the c10d rendezvous with `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`
(slurm/train_multinode.sbatch): every node's agent then restarts together, and each round gets a
fresh store on a fresh port (no per-attempt keys needed).

Torch internals touched (checked against torch 2.13): `register_rendezvous_handler` and
`ProcessGroup.set_timeout` (public, little documented). Accelerate's registered objects (the TrainState,
read for the failing step) come through accelerate_internals.py's `registered_objects`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..accelerate_internals import registered_objects
from ..config import Config
from ..errors import UserError
from ..state import TrainState

__all__ = ["process_group_kwargs", "begin", "record_failure", "tell_launcher"]

_SCHEME = "dist-train-attempt"
LEDGER = "restart.json"
_SILENT = (
    "left no error record (killed by a signal such as SIGKILL or the OOM killer, or stopped by the hang watchdog; "
    "the launcher's log has its exit code)"
)

_run: weakref.ref | None = None  # this process's Accelerator, for the step a failure happened at


def _under_agent() -> bool:
    """Started by torchrun's elastic agent (every rank of a job alike)."""
    return "TORCHELASTIC_RESTART_COUNT" in os.environ


# ---- forming the process group ------------------------------------------------------------------
def _attempt_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs):
    """env:// with every key under `dist_train/attempt_N/`: an attempt never reads an older one's keys."""
    from torch.distributed.rendezvous import rendezvous

    query = urlparse(url).query  # rank and world_size, when the caller passed them
    store, rank, world_size = next(rendezvous("env://" + (f"?{query}" if query else ""), timeout=timeout))
    attempt = store.add(f"dist_train/starts/rank{rank}", 1)  # this rank's starts so far: the same on every rank
    yield dist.PrefixStore(f"dist_train/attempt_{attempt}/", store), rank, world_size
    raise RuntimeError(f"{_SCHEME}:// cannot re-rendezvous; the elastic agent restarts the process instead")


def startup_timeout_s(cfg: Config) -> int:
    return min(cfg.startup_timeout_s, cfg.collective_timeout_s)


def process_group_kwargs(cfg: Config) -> InitProcessGroupKwargs:
    """How the Accelerator makes the process group: with the start-up timeout, and with per-attempt
    keys wherever the store outlives an attempt (the workers share the agent's store)."""
    init_method = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from torch.distributed.rendezvous import register_rendezvous_handler

        with contextlib.suppress(RuntimeError):  # already registered by an earlier run in this process
            register_rendezvous_handler(_SCHEME, _attempt_rendezvous)
        init_method = f"{_SCHEME}://"
    return InitProcessGroupKwargs(init_method=init_method, timeout=timedelta(seconds=startup_timeout_s(cfg)))


class _TimeoutAfterFirstStep:
    """Sets the default process group's timeout to collective_timeout_s after the first optimizer step
    (a global optimizer hook that removes itself: the loop stays as it is)."""

    def __init__(self, seconds: int):
        self.timeout = timedelta(seconds=seconds)
        self.handle = register_optimizer_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs) -> None:
        self.handle.remove()
        if dist.is_available() and dist.is_initialized():
            dist.group.WORLD.set_timeout(self.timeout)


def begin(cfg: Config, accelerator, handler: InitProcessGroupKwargs) -> None:
    """Called once the Accelerator exists (all ranks): the timeout switch, and under the elastic agent the
    restart ledger, which may stop this attempt (a UserError on every rank)."""
    global _run
    _run = weakref.ref(accelerator)
    if accelerator.num_processes == 1:
        return
    # Groups made from now on (the preemption flag's side group on GPUs) get the run's collective timeout.
    handler.timeout = timedelta(seconds=cfg.collective_timeout_s)
    if startup_timeout_s(cfg) != cfg.collective_timeout_s:
        _TimeoutAfterFirstStep(cfg.collective_timeout_s)
    if not _under_agent():
        return
    refusal = _log_start(cfg, accelerator.num_processes) if accelerator.is_main_process else None
    refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UserError(refusal)


# ---- the failure ledger ---------------------------------------------------------------------------
def _diagnostics(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "diagnostics"


def _completed_steps() -> int | None:
    """The optimizer steps completed, from the run's registered TrainState (None before the loop made it)."""
    accelerator = _run() if _run is not None else None
    for obj in registered_objects(accelerator):
        if isinstance(obj, TrainState):
            return obj.optimizer_step
    return None


def record_failure(cfg: Config, error: BaseException | str, announce: bool = True, mid_step: bool = True) -> None:
    """This rank is leaving because of `error`, in the middle of an optimizer step (`mid_step`) or after
    one: leave a record for the next attempt and, with `announce`, say so in one line naming the rank and
    the step. Only under the elastic agent in a multi-process job; best effort (never raises)."""
    if not _under_agent() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if isinstance(error, BaseException):
        lines = str(error).strip().splitlines()
        error = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    rank, step = int(os.environ.get("RANK", "0")), _completed_steps()
    if step is not None and mid_step:
        step += 1  # the step in progress, as the hang watchdog counts
    if announce:
        where = f"at optimizer step {step}" if step is not None else "during start-up"
        print(f"dist_train: rank {rank} failed {where}: {error}", file=sys.stderr, flush=True)
    record = {"rank": rank, "host": socket.gethostname(), "step": step, "error": error, "time": time.time()}
    with contextlib.suppress(OSError):
        folder = _diagnostics(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".failure-rank{rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / f"failure-rank{rank}.json")


def tell_launcher(message: str) -> None:
    """Show `message` in torchrun's failure table (its "traceback" line, instead of "To enable traceback
    see ...") through the error file the agent reads. For a UserError, which all ranks raise alike, so
    whichever rank the table calls the root cause carries it; not for crashes, whose error files would
    compete with the culprit's for "first observed failure" (the agent's timestamps are whole seconds)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def _agent_started() -> float:
    """When the main process's elastic agent (its parent) started: the same for every attempt of a job."""
    import psutil

    try:
        return psutil.Process(os.getppid()).create_time()
    except psutil.Error:
        return 0.0


def summarize(records: list[dict], world_size: int) -> dict:
    """One attempt's failure: the step, the rank(s) that failed first, and why.

    A rank that left no record was killed (no Python ran); otherwise the first record is the culprit
    (the others then lost it in a collective). The step is the furthest any rank reached."""
    silent = sorted(set(range(world_size)) - {r["rank"] for r in records})
    steps = [r["step"] for r in records if r.get("step") is not None]
    if silent:
        ranks, error = silent, _SILENT
    else:
        first = min(records, key=lambda r: r["time"])
        ranks, error = [first["rank"]], first["error"]
    step = max(steps) if steps else None
    where = f"at optimizer step {step}" if step is not None else "during start-up" if records else "at an unknown step"
    return {"step": step, "where": where, "ranks": ranks, "error": error}


def describe(summary: dict) -> str:
    ranks = ", ".join(map(str, summary["ranks"]))
    return f"{summary['where']}: rank{'s' if len(summary['ranks']) > 1 else ''} {ranks} {summary['error']}"


def _same(a: dict | None, b: dict | None) -> bool:
    """The same optimizer step (known) and the same failing rank(s)."""
    return a is not None and b is not None and a["step"] is not None and (a["step"], a["ranks"]) == (b["step"], b["ranks"])


def _log_start(cfg: Config, world_size: int) -> str | None:
    """Main process, at every start under the agent: an entry in `restart.json`; at a restart (an entry of
    this job exists) one line about the previous attempt's failure. Returns the refusal message when the
    run keeps failing at the same step, else None."""
    folder, agent, now = _diagnostics(cfg), _agent_started(), time.time()
    ledger = {"agent_started": agent, "attempts": []}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((folder / LEDGER).read_text())
        if saved.get("agent_started") == agent:  # this job's history (another job starts a new one)
            ledger = saved
    entries = ledger["attempts"]
    entry = {
        "attempt": len(entries) + 1,
        "started": now,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "previous": None,
        "refused": None,
    }
    if entries:
        records = []
        for path in folder.glob("failure-rank*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads(path.read_text())
                if record["time"] >= entries[-1]["started"]:  # written during the previous attempt
                    records.append(record)
        previous = entry["previous"] = summarize(records, world_size)
        refusal = entries[-1]["refused"]
        if refusal is None and _same(entries[-1]["previous"], previous):
            refusal = (
                f"attempts {len(entries) - 1} and {len(entries)} both failed {describe(previous)}. A restart from "
                "the same checkpoint would fail there again, so this run stops (the launcher ends the job once its "
                "--max_restarts are used up). Fix the cause, then rerun: resume: auto continues from the newest "
                f"checkpoint. History: {folder / LEDGER}"
            )
        entry["refused"] = refusal
        print(
            f"dist_train: restart {len(entries)} (--max_restarts {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}): "
            f"attempt {len(entries)} failed {describe(previous)}; {'stopping' if refusal else f'resuming (resume: {cfg.resume})'}",
            flush=True,
        )
    entries.append(entry)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{LEDGER}.tmp"
        tmp.write_text(json.dumps(ledger, indent=1))
        os.replace(tmp, folder / LEDGER)
    return entry["refused"]
