"""RunLock: one run per output_dir, held by a real process and dropped by the kernel when it dies."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dist_train.checkpoint import run_lock
from dist_train.checkpoint.run_lock import LOCK_NAME, RunLock
from dist_train.errors import UserError
from helpers import REPO

HOLD = "import sys, time; from dist_train.checkpoint.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)"


@pytest.fixture
def holder(tmp_path):
    """A second process that holds the lock on tmp_path/run until the test kills it."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc, out
    finally:
        proc.kill()
        proc.wait()


def test_a_held_lock_refuses_a_second_run_naming_the_holder(holder):
    proc, out = holder
    with pytest.raises(UserError) as info:
        RunLock(out).acquire()
    message = str(info.value)
    assert message.startswith(f"output_dir {str(out)!r} is in use by another run (pid {proc.pid} on host {socket.gethostname()}, started ")
    assert message.endswith(" UTC); wait for it to finish, or choose another output_dir.")
    assert "\n" not in message


def test_a_killed_holder_leaves_no_stale_lock(holder):
    proc, out = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_NAME).exists()  # the file stays; only the kernel's lock is gone
    start = time.monotonic()
    with RunLock(out) as lock:
        assert time.monotonic() - start < 1.0
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
    assert lock._fd is None


def test_release_then_acquire_again_in_one_process(tmp_path):
    out = tmp_path / "not" / "yet" / "there"  # parents are created
    lock = RunLock(out)
    for _ in range(2):
        lock.acquire()
        with pytest.raises(UserError, match="is in use by another run"):
            RunLock(out).acquire()  # another open file, as a second run in this process would have
        lock.release()
    with RunLock(out), RunLock(tmp_path / "other"):  # and a fresh object after release; other dirs are independent
        pass


def test_unreadable_holder_details_are_not_trusted(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")
    with open(tmp_path / LOCK_NAME) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a holder that has not written its details yet
        with pytest.raises(UserError, match=r"in use by another run \(holder unknown\)"):
            RunLock(tmp_path).acquire()


def test_a_file_system_without_locks_warns_and_proceeds(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with RunLock(tmp_path / "nfs"):
        pass
    assert "does not support locks" in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"output_dir '.*file/run' cannot be written \(.*\); choose another output_dir"):
        RunLock(tmp_path / "file" / "run").acquire()
