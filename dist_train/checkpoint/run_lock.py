"""One run at a time per output_dir: an exclusive `flock` on `output_dir/.dist_train.lock`.

Two runs on one output_dir would mix silently (the second `resume: auto`s the first's checkpoints
while the first still writes them), so the main process of a run holds this lock for the whole run:

    with RunLock(cfg.output_dir):
        ...  # train

The kernel drops a `flock` when its process dies, so a crashed or SIGKILLed run never leaves a stale
lock; the file itself stays and is reused. After acquiring, the holder writes its pid, host and start
time into the file; a refused run reads them back for its message. That content is informational only:
the decision is the kernel's lock alone.

Limits: on NFS, `flock` is emulated with POSIX locks by Linux >= 2.6.12 clients (visible across hosts),
but some other clients and mounts (e.g. `local_lock=flock`) keep it local to one host, where two hosts
could still share an output_dir. A file system without lock support gets a warning and no lock.
A process forked while the lock is held (a DataLoader worker) closes its copy of the file at once
(`os.register_at_fork`), so the lock dies with the process that took it, not with its last child: after
a SIGKILL the restarted run (`--max_restarts`) can take it while orphaned workers still wind down.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".dist_train.lock"

# Errors of a file system that cannot lock at all (as opposed to a lock held by someone else).
_NO_LOCK_SUPPORT = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)

_held: set[int] = set()  # this process's lock fds; a forked child closes its copies (_close_in_child)
_fork_hook = False


def _close_in_child() -> None:
    # Close, never LOCK_UN: the child shares the parent's open file, so unlocking would free the parent's lock.
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


def _hold(fd: int) -> None:
    global _fork_hook
    if not _fork_hook:
        os.register_at_fork(after_in_child=_close_in_child)
        _fork_hook = True
    _held.add(fd)


class RunLock:
    """An exclusive, non-blocking lock on one output_dir; `acquire` raises a UserError if another run holds it.

    Reusable: `release` then `acquire` again works, in the same process. Held per object (per open file),
    so two RunLocks on one output_dir exclude each other even within one process.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # No O_TRUNC: opening must not erase the holder's details before we know we hold the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"output_dir {str(self.output_dir)!r} cannot be written ({exc.strerror}); choose another output_dir.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"output_dir {str(self.output_dir)!r} is in use by another run ({holder}); "
                "wait for it to finish, or choose another output_dir."
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCK_SUPPORT:
                raise
            print(
                f"dist_train: warning: the file system of output_dir {str(self.output_dir)!r} does not support locks "
                f"({exc.strerror}); a second run on the same output_dir will not be stopped.",
                file=sys.stderr,
                flush=True,
            )
            return self
        self._fd = fd
        _hold(fd)
        info = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # The file is left in place: deleting it would let a waiting run lock the old, unlinked file
        # while a third run creates and locks a new one.
        _held.discard(self._fd)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The holder's details for the message; whatever the file holds (empty, partly written) is not trusted."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(info['pid'])} on host {info['hostname']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
