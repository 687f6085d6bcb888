"""Parameters that get no gradient, found before DDP fails on them with its own riddle.

DDP (without `find_unused_parameters`) waits for a gradient of every parameter; one that the forward
pass never used makes the *next* step fail with "Expected to have finished reduction in the prior
iteration ...". After the first backward this check looks for parameters left without a gradient on
any rank and, if there are some, stops every rank with one line naming them and the fix.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from ..config import Config
from ..errors import UserError


class UnusedParameterCheck:
    def __init__(self, cfg: Config, accelerator: Accelerator, model: torch.nn.Module):
        ddp = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        self.pending = ddp and not cfg.find_unused_parameters
        self.accelerator = accelerator
        self.named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad] if self.pending else []

    def after_backward(self) -> None:
        """Called after every backward; does its work (one small all-gather) only after the first."""
        if not self.pending:
            return
        self.pending = False
        unused = [name for name, p in self.named if p.grad is None]
        per_rank = gather_object([unused])
        names = sorted({name for names in per_rank for name in names})
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise UserError(
                f"model: {len(names)} parameter(s) got no gradient in the first training step ({shown}); DDP cannot "
                "train a model with unused parameters by default. Set find_unused_parameters: true, or remove them "
                "from the model (or set requires_grad=False on them)."
            )
