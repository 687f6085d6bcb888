"""LeanOptimizer (dist_train/accelerate_internals.py) steps exactly as Accelerate's optimizer wrapper, minus its per-step lookups."""

from __future__ import annotations

import copy

import accelerate.optimizer
import pytest
import torch
from accelerate import Accelerator

from dist_train.accelerate_internals import LeanOptimizer


def test_same_updates_as_accelerate_under_accumulation(monkeypatch):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model_a = torch.nn.Linear(4, 3)
    model_b = copy.deepcopy(model_a)
    initial = model_a.weight.detach().clone()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=0.1, fused=True)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=0.1, fused=True)
    model_a, opt_a, model_b, opt_b = accelerator.prepare(model_a, opt_a, model_b, opt_b)
    lean = LeanOptimizer(opt_b)
    assert lean.stepped is opt_b.optimizer  # no scaler, one process: the torch optimizer is stepped directly

    def lookup_per_step():
        raise AssertionError("LeanOptimizer must not look packages up per step")

    data = torch.randn(6, 2, 4)
    for micro_step, inputs in enumerate(data):
        with accelerator.accumulate(model_a, model_b):  # one accumulation counter for both
            for model in (model_a, model_b):
                accelerator.backward(model(inputs).square().mean())
            opt_a.step()
            opt_a.zero_grad(set_to_none=True)
            monkeypatch.setattr(accelerate.optimizer, "is_lomo_available", lookup_per_step)
            lean.step()
            lean.zero_grad(set_to_none=True)
            monkeypatch.undo()
        # Between accumulation boundaries both keep the gradients; at a boundary both step and clear them.
        assert accelerator.sync_gradients == (micro_step % 2 == 1)
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(a, b)
            assert (a.grad is None) == (b.grad is None) == accelerator.sync_gradients
    assert not torch.equal(model_a.weight, initial)  # it trained


def test_fused_optimizer_only_where_it_is_exact():
    from accelerate.utils import DistributedType

    from dist_train.components.optim import can_fuse

    dense = torch.nn.Linear(4, 2)
    assert can_fuse(dense, "no", DistributedType.NO) and can_fuse(dense, "bf16", DistributedType.MULTI_GPU)
    assert not can_fuse(dense, "fp16", DistributedType.NO)  # Accelerate must still see the scaler's skipped steps
    assert not can_fuse(dense, "no", DistributedType.FSDP) and not can_fuse(dense, "no", DistributedType.DEEPSPEED)
    assert not can_fuse(torch.nn.Embedding(10, 4, sparse=True), "no", DistributedType.NO)  # fused kernels refuse sparse grads


def test_the_installed_accelerate_is_one_the_internals_were_checked_against():
    """Fails loudly on an untested Accelerate: dist_train/accelerate_internals.py must be rechecked first."""
    import accelerate

    from dist_train.accelerate_internals import TESTED_ACCELERATE, check_version

    check_version()  # the installed one (pyproject.toml pins the same range)
    with pytest.raises(RuntimeError, match="checked against Accelerate 1.15.x, not 1.16.0"):
        check_version("1.16.0")
    assert accelerate.__version__.rsplit(".", 1)[0] in TESTED_ACCELERATE
