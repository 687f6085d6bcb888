"""Fixtures shared by every test: a clean environment, Accelerate state and process group per test."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, tmp_path_factory, monkeypatch):
    """Each test runs in its own tmp dir, with env vars, sys.path, the user modules it imported and
    Accelerate's singletons restored afterwards."""
    saved_env = dict(os.environ)
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    # Seed projects of different tests share module names (`dataset`, `model`): an in-process run must
    # import its own project's siblings, not the previous test's cached ones.
    sys.path[:] = saved_path
    test_files = str(tmp_path_factory.getbasetemp())
    for name in set(sys.modules) - saved_modules:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(test_files):
            del sys.modules[name]
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()
