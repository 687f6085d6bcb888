"""`on_nonfinite`: what happens to an optimizer step whose loss or gradient is NaN or inf.

`stop` raises a UserError naming the step, the batch and the ranks; `skip` drops the update as if the
step's micro-batches had never been seen: no parameter moves, no optimizer state changes, and every
buffer (BatchNorm's running statistics, which the forward pass already updated with the bad batch) is
put back as it was before the step's first forward.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from ..accelerate_internals import PLAIN_BACKENDS
from ..config import Config
from ..errors import UserError
from ..state import TrainState


def grad_norm(accelerator: Accelerator, parameters: list, max_grad_norm: float | None) -> torch.Tensor:
    """The global gradient norm, clipped to `max_grad_norm` when set (Accelerate unscales fp16 first)."""
    if max_grad_norm is not None or accelerator.distributed_type not in PLAIN_BACKENDS:
        # (FSDP shards the gradients and DeepSpeed owns them: only Accelerate knows their global norm.)
        return accelerator.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm is not None else math.inf)
    # Nothing to clip: only the norm (clipping to inf would still multiply every gradient by 1).
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


class NonfiniteGuard:
    """Snapshots the model's buffers at the start of each optimizer step (only with `skip`), and
    decides at the step's end whether its update may be applied."""

    def __init__(self, cfg: Config, accelerator: Accelerator, model: torch.nn.Module):
        self.cfg, self.accelerator = cfg, accelerator
        self.skip = cfg.on_nonfinite == "skip"
        # The fp16 scaler finds and skips non-finite steps itself (Accelerate reports them as overflows).
        self.scaler_decides = cfg.mixed_precision == "fp16"
        self._buffers = [b for b in model.buffers()] if self.skip else []
        self._saved = [b.detach().clone() for b in self._buffers]
        self._step_started = False

    def before_forward(self) -> None:
        """Called before every micro-batch's forward; copies the buffers at the first one of a step."""
        if self._buffers and not self._step_started:
            torch._foreach_copy_(self._saved, [b.detach() for b in self._buffers])
        self._step_started = True

    def update_is_finite(self, norm: torch.Tensor, step_loss: torch.Tensor, state: TrainState, batch_index: int) -> bool:
        """At the end of an optimizer step: True to apply the update; False (skip) after restoring the buffers.

        One host read per optimizer step, kept on purpose: the update must be dropped (skip) or the run
        stopped (stop) before optimizer.step() applies it. The norm is identical on every rank after
        DDP's all-reduce, so all ranks take the same branch.
        """
        self._step_started = False
        if self.scaler_decides or bool(torch.isfinite(norm)):
            return True
        if not self.skip:
            raise self._error(step_loss, state, batch_index)
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved)
        return False

    def _error(self, step_loss: torch.Tensor, state: TrainState, batch_index: int) -> UserError:
        # All ranks get here together, so gathering which ranks saw a non-finite loss is a safe collective.
        bad = self.accelerator.gather((~torch.isfinite(step_loss)).reshape(1).int())
        ranks = [rank for rank, flag in enumerate(bad.tolist()) if flag] or "none (the loss was finite; a gradient was not)"
        return UserError(
            f"Non-finite loss or gradient at optimizer step {state.optimizer_step + 1} (epoch {state.epoch}, "
            f"batch {batch_index}) on rank(s) {ranks}. Existing checkpoints in {self.cfg.output_dir} are untouched. "
            "Lower lr, set max_grad_norm, or set on_nonfinite: skip to drop such updates."
        )
