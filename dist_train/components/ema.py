"""EMA weights: an exponential moving average of the trained weights, the ones most vision and diffusion
models ship.

After each optimizer step that changed the weights, `ema <- decay * ema + (1 - decay) * weights`, with
torch's own update (`torch.optim.swa_utils.get_ema_multi_avg_fn`, a foreach lerp). The update is
elementwise, so under FSDP2 each rank averages the shards it holds and nothing is gathered, where
`AveragedModel` deep-copies the whole module. Floating-point buffers (BatchNorm's statistics) are
averaged like the parameters, other buffers copied, as `AveragedModel(use_buffers=True)` does.

- `ema_start_step`: up to this optimizer step the EMA is a copy of the weights (the first steps of a run
  are mostly the initialisation's noise).
- `ema_warmup`: the decay after n updates is min(decay, (1 + n) / (10 + n)), TensorFlow's
  `ExponentialMovingAverage(num_updates=...)` and timm's rule, for the same reason.
- `ema_every`: update every N optimizer steps (cheaper on a large model; the decay is per update).

The averages and the update count go into every checkpoint, keyed as in the user's model, so a resume
continues bitwise and a checkpoint's EMA weights can be exported without the run: registered with the
Accelerator (`custom_checkpoint_N.pkl`, loaded with weights_only) where the weights are whole on every
rank; under FSDP2, where each rank holds shards, each rank writes its own through
torch.distributed.checkpoint (`ema_fsdp/`, beside the model's shards, in Accelerate's save/load hooks),
so nothing is gathered and a resume on another world size reshards them as it does the model.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..config import Config

SHARDED_FOLDER = "ema_fsdp"  # in a checkpoint: the EMA's shards (torch.distributed.checkpoint), under FSDP2


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's own part: a DTensor's local shard (DTensor has no sharding rule for every foreach op; the
    update is elementwise, so the shards are all there is to it), a plain tensor as it is."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, keyed as in the user's model (the prepared model unwrapped)."""
    module = getattr(model, "module", model)
    module = getattr(module, "_orig_mod", module)
    return [*module.named_parameters(), *module.named_buffers()]


class EMA:
    """The EMA of `model`'s weights. `after_step` is called once per optimizer step on every rank."""

    def __init__(self, cfg: Config, model: torch.nn.Module):
        self.decay, self.warmup = cfg.ema_decay, cfg.ema_warmup
        self.start_step, self.every = cfg.ema_start_step, cfg.ema_every
        named = _named_tensors(model)
        self.names = [name for name, _ in named]
        self._live = [tensor for _, tensor in named]
        self._averaged = [t.is_floating_point() for t in self._live]
        # FSDP2 keeps the root module's gathered parameters between forwards without a backward (validation);
        # swapping the shards underneath must drop them, or the next forward would use the other weights.
        self._fsdp_units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        with torch.no_grad():
            self.weights = [t.detach().clone() for t in self._live]
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def after_step(self, optimizer_step: int, stepped: bool) -> None:
        """Follow the weights after optimizer step `optimizer_step`; `stepped`: whether it changed them (not
        skipped as non-finite or by the fp16 scaler)."""
        if not stepped:
            return
        weights, live = _local(self.weights), _local(self._live)
        if optimizer_step <= self.start_step:
            torch._foreach_copy_(weights, live)
            return
        if optimizer_step % self.every:
            return
        averaged = [(e, w) for e, w, a in zip(weights, live, self._averaged) if a]
        update = get_ema_multi_avg_fn(self.current_decay())
        update([e for e, _ in averaged], [w for _, w in averaged], None)
        for e, w, a in zip(weights, live, self._averaged):
            if not a:
                e.copy_(w)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The model holds the EMA weights inside the block (to evaluate or save them), its own weights after."""
        live = _local(self._live)
        with torch.no_grad():
            kept = [t.detach().clone() for t in live]
            torch._foreach_copy_(live, _local(self.weights))
        self._reshard()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, kept)
            self._reshard()

    def _reshard(self) -> None:
        for unit in self._fsdp_units:
            unit.reshard()

    # ---- checkpointing ----------------------------------------------------------------------------------
    def attach(self, accelerator, checkpointer) -> None:
        """Into every checkpoint, and out of the one a resume loads."""
        if any(isinstance(t, DTensor) for t in self.weights):
            checkpointer.add_sharded(SHARDED_FOLDER, self._sharded_state, self._after_load)
        else:
            accelerator.register_for_checkpointing(self)  # after TrainState: its file index stays 0

    def _sharded_state(self) -> dict:
        return {"ema": dict(zip(self.names, self.weights)), "ema_updates": torch.tensor(self.updates)}

    def _after_load(self, state: dict) -> None:
        self.updates = int(state["ema_updates"])  # the weights were loaded in place

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": dict(zip(self.names, self.weights))}

    def load_state_dict(self, state: dict) -> None:
        saved = state["weights"]
        if list(saved) != self.names:
            missing = sorted(set(self.names) - set(saved)) or sorted(set(saved) - set(self.names))
            raise ValueError(f"EMA weights in the checkpoint do not match the model (first differing key: {missing[:1]})")
        with torch.no_grad():
            for mine, name in zip(self.weights, self.names):
                mine.copy_(saved[name])
        self.updates = int(state["updates"])
