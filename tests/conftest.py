"""Fixtures shared by every test: a clean environment, Accelerate state and process group per test."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own tmp dir, with env vars and Accelerate's singletons restored afterwards."""
    saved_env = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()
