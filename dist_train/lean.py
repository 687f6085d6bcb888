"""Accelerate's optimizer semantics for the loop's `step()` and `zero_grad()`, minus its per-step overhead.

`AcceleratedOptimizer.step()` looks up the `lomo_optim` package on disk twice per call (an uncached
`importlib.util.find_spec`: ~0.18 ms on a 2-core CPU box, more than the whole forward pass of a small
MLP) and `zero_grad()` inspects the torch optimizer's signature every call. Where the wrapper adds
nothing else — no fp16 loss scaler, no XLA, no DeepSpeed/Megatron engine — both forward to the torch
optimizer, and only on gradient-sync steps; `LeanOptimizer` does exactly that and nothing more.
Everywhere else it calls Accelerate's wrapper, so fp16 overflow skips and the other back ends keep
their behaviour. The prepared `AcceleratedOptimizer` stays registered with the Accelerator, so
`save_state`/`load_state` and `optimizer_step_was_skipped` work on it as before.
"""

from __future__ import annotations

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

# Back ends whose AcceleratedOptimizer.step is `if sync_gradients: optimizer.step()` when there is no scaler.
PLAIN_BACKENDS = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}


class LeanOptimizer:
    def __init__(self, accelerated: AcceleratedOptimizer):
        self.accelerated = accelerated
        self._gradient_state = accelerated.gradient_state
        self._direct = accelerated.scaler is None and accelerated.accelerator_state.distributed_type in PLAIN_BACKENDS
        # The object whose `step` runs: an LR scheduler must wrap this one to see the steps.
        self.stepped: torch.optim.Optimizer = accelerated.optimizer if self._direct else accelerated

    def step(self) -> None:
        """The optimizer step on gradient-sync steps; a no-op between accumulation boundaries."""
        if not self._direct:
            self.accelerated.step()
        elif self._gradient_state.sync_gradients:
            self.stepped.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._direct:
            self.accelerated.zero_grad(set_to_none=set_to_none)
        elif self._gradient_state.sync_gradients:
            self.stepped.zero_grad(set_to_none=set_to_none)


def can_fuse(model: torch.nn.Module, mixed_precision: str, distributed_type: DistributedType) -> bool:
    """Whether dist_train's built-in optimizer may be torch's fused one (much faster on CPU; see bench/).

    Not under fp16: GradScaler hands fused optimizers its found-inf flag and always calls their step,
    so Accelerate would no longer see skipped steps. Not under FSDP/DeepSpeed, which manage the
    optimizer's parameters themselves. Not with sparse embedding gradients, which fused kernels refuse.
    """
    sparse = any(getattr(module, "sparse", False) is True for module in model.modules())
    return mixed_precision != "fp16" and distributed_type in PLAIN_BACKENDS and not sparse
