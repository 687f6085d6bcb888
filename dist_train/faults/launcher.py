"""When the launcher dies, its workers stop: no orphaned ranks training on, holding the run and the devices.

torchrun's elastic agent (what `accelerate launch` runs for 2+ processes, and slurm/ on every node)
starts each worker in a session of its own (`start_new_session`). So `kill -9 -PGID` of the launcher's
group, the OOM killer choosing the launcher, or a container runtime ending its main process leaves the
workers running: training on, writing checkpoints, holding the run lock (a rerun is refused) and the
devices. Whether an orphan stops by itself depends on what it happens to do next, not on a design. Neither the agent nor Accelerate watch the
launcher from the worker's side: torch.multiprocessing.spawn gives its children PR_SET_PDEATHSIG
(through a private helper), torchrun's agent does not; pytorch#76287 is this class of problem. So:

- A worker started by the agent notes its parent, the agent, when training starts (`LauncherWatch`).
- `died()` is true once `os.getppid()` differs: the kernel gives an orphan a new parent (init, or a
  subreaper) the moment the launcher's process ends. `Preemption.requested` asks at every optimizer
  step boundary and takes the SIGTERM path: the ranks agree (on every node, since the flag is agreed
  by all ranks), save a checkpoint, release the run lock and exit 129 (128 + SIGHUP, the signal whose
  meaning is "your controlling process died"), one line naming the ranks whose launcher died.
- Its output may have died with the launcher's group (`accelerate launch ... | tee log`, a closed
  terminal): a write there fails (EPIPE, EIO), which would turn the way out into a crash. So an
  orphaned rank points such a stdout/stderr at /dev/null first (`silence_dead_outputs`); the restart
  ledger's `diagnostics/failure-rank{R}.json` still records why it stopped, under the agent.

Why not PR_SET_PDEATHSIG: it fires when the *thread* that started the worker ends, not its process
(a false alarm should the agent ever start workers from a thread that it later ends); it needs a signal
number that neither the user's code nor the launcher uses, with a handler in place before the launcher
can die; and the checkpoint it would ask for waits for the step boundary all the same. A thread polling
`os.getppid()` would notice sooner within a long step, and could not act sooner either. One `getppid`
system call per step is nothing beside the step's own flag all-reduce.

Not covered: a launcher that dies before the worker notes its parent (its first seconds: the worker
then usually fails at once, joining the agent's store); `accelerate launch` of one process, which
runs no agent and leaves the worker in the launcher's own process group (`kill -PGID` reaches it).
A process started without a launcher (`python -m dist_train`) has nothing to watch: it trains on
whatever happens to the shell that started it (`nohup`, a closed terminal).
"""

from __future__ import annotations

import os
import select

__all__ = ["LauncherWatch"]


def _under_agent() -> bool:
    """Started by torchrun's elastic agent (the variable it sets for every worker, at every attempt)."""
    return "TORCHELASTIC_RESTART_COUNT" in os.environ


class LauncherWatch:
    """The process that launched this one (None without a launcher), and whether it has died since."""

    def __init__(self):
        self.pid: int | None = os.getppid() if _under_agent() else None

    def died(self) -> bool:
        return self.pid is not None and os.getppid() != self.pid


def silence_dead_outputs() -> None:
    """Point stdout and stderr at /dev/null where nobody can read them any more: a pipe without readers
    (POLLERR), a hung-up terminal (POLLHUP), a closed descriptor (POLLNVAL)."""
    for fd in (1, 2):
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0)):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
