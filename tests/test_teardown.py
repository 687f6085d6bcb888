"""Teardown on every exit: a run that fails inside the loop restores the caller's process as it was."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from dist_train import UserError, load_config, train
from dist_train.checkpoint.run_lock import RunLock

NAN_PROJECT = """
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)

def get_dataset(cfg, train):
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    x[20] = float("nan")  # the third batch of 8 is non-finite
    return TensorDataset(x, (x[:, 0] > 0).long())
"""


def test_a_failed_in_process_run_leaves_no_handler_lock_thread_or_open_file(tmp_path):
    (tmp_path / "nan.py").write_text(NAN_PROJECT)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    cfg = load_config(
        None,
        [
            f"model={tmp_path / 'nan.py'}:Model",
            f"data={tmp_path / 'nan.py'}:get_dataset",
            "batch_size=8",
            "progress=false",
            "plot=false",
            f"output_dir={tmp_path / 'run'}",
            "hang_timeout_s=60",
            "async_checkpoint=true",
            "checkpoint_every=1",
        ],
    )
    with pytest.raises(UserError, match="Non-finite loss or gradient"):
        train(cfg)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the SIGTERM/SIGUSR1 handlers are restored
    RunLock(tmp_path / "run").acquire().release()  # the output_dir lock was released
    deadline = time.monotonic() + 3
    while any(t.name.startswith("dist_train-") and t.is_alive() for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dist_train-") and t.is_alive()]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())  # the finished background saves are complete
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
