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

The averages and the update count are registered for checkpointing, keyed as in the user's model, so a
resume continues bitwise and a checkpoint's EMA weights can be exported without the run.
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..config import Config


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
        if optimizer_step <= self.start_step:
            torch._foreach_copy_(self.weights, self._live)
            return
        if optimizer_step % self.every:
            return
        averaged = [(e, w) for e, w, a in zip(self.weights, self._live, self._averaged) if a]
        update = get_ema_multi_avg_fn(self.current_decay())
        update([e for e, _ in averaged], [w for _, w in averaged], None)
        for e, w, a in zip(self.weights, self._live, self._averaged):
            if not a:
                e.copy_(w)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The model holds the EMA weights inside the block (to evaluate or save them), its own weights after."""
        with torch.no_grad():
            kept = [t.detach().clone() for t in self._live]
            torch._foreach_copy_(self._live, self.weights)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, kept)

    # ---- checkpointing (registered with the Accelerator) ---------------------------------------------
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
