"""Faults in the job: what stops a run from outside or from within, turned into a checkpoint and a clear exit.

- `preemption.py`: SIGTERM/SIGUSR1 and time limits → agree at a step boundary, checkpoint, requeue.
- `launcher.py`: the launcher died → the same path as SIGTERM (no orphaned ranks training on).
- `watchdog.py`: a rank that makes no progress is named, with every rank's stack.
- `restarts.py`: in-job restarts under torchrun's elastic agent, the restart ledger.
- `stragglers.py`: which rank is slow, in the logs.
"""

from .launcher import LauncherWatch
from .preemption import Preemption
from .restarts import begin as begin_attempt
from .restarts import process_group_kwargs, record_failure, tell_launcher
from .stragglers import StragglerMonitor
from .watchdog import HangWatchdog, clear_stale, enable_flight_recorder

__all__ = [
    "HangWatchdog",
    "LauncherWatch",
    "Preemption",
    "StragglerMonitor",
    "begin_attempt",
    "clear_stale",
    "enable_flight_recorder",
    "process_group_kwargs",
    "record_failure",
    "tell_launcher",
]
