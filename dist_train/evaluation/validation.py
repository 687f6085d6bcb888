"""The validation policy: when to evaluate which set, and early stopping's verdict, agreed by all ranks.

The loop calls `after_step` once per optimizer step; this component decides whether a validation is
due: at every epoch end, every `eval_every` steps, and at the run's last step (so the final weights
always have a validation record). The named `eval_sets` are evaluated with it, into the same record,
or, those with their own `every`, every that many steps and at the last step, in a record of their own.
"""

from __future__ import annotations

from accelerate import Accelerator

from ..components import Loss, MetricsLogger
from ..config import Config
from ..state import TrainState
from .evaluate import evaluate
from .sets import build_eval_sets, validation_set
from .stopping import EarlyStopping


class Validator:
    def __init__(
        self, cfg: Config, accelerator: Accelerator, model, val_loader, loss_fn: Loss, metrics: MetricsLogger, watchdog=None, ema=None
    ):
        self.cfg, self.accelerator, self.watchdog, self.ema = cfg, accelerator, watchdog, ema
        self.model, self.val_loader, self.loss_fn, self.metrics = model, val_loader, loss_fn, metrics
        self.early_stopping = EarlyStopping(cfg)
        self.max_batches = cfg.limit_val_batches
        self.sets = [validation_set(cfg, accelerator, val_loader), *build_eval_sets(cfg, accelerator)]
        self.last: dict = {}  # the newest validation record

    def should_stop(self, state: TrainState) -> bool:
        """Early stopping's verdict, from the counters in `state` (a resumed run that had stopped stays stopped)."""
        return self.early_stopping.should_stop(state)

    def after_step(self, state: TrainState, *, epoch_ended: bool, last_step: bool) -> bool:
        """Validate if due at this optimizer step; return True when early stopping says to stop (all ranks agree)."""
        step, every = state.optimizer_step, self.cfg.eval_every
        validate = epoch_ended or last_step or bool(every and step % every == 0)
        due = [s for s in self.sets if (validate if s.every is None else last_step or step % s.every == 0)]
        if not due:
            return False
        on_batch = (lambda: self.watchdog.at("validation")) if self.watchdog else None
        values = {}
        with self.metrics.untimed():
            for eval_set in due:
                args = (self.model, eval_set.loader, self.loss_fn, self.accelerator, eval_set.source, self.max_batches, on_batch)
                values.update(evaluate(*args, eval_set.metrics, eval_set.name))
                if self.ema is not None:  # the EMA weights on the same set: val_loss_ema, val_accuracy_ema, ...
                    with self.ema.applied():
                        averaged = evaluate(*args, eval_set.metrics, eval_set.name)
                    values.update({f"{key}_ema": value for key, value in averaged.items() if not key.endswith("_samples")})
        if not validate:  # only sets with their own interval
            self.metrics.write({"epoch": state.epoch, "step": step, **values, "num_processes": self.accelerator.num_processes})
            return False
        self.last = self.metrics.log_eval(state, values)
        self.early_stopping.update(state, self.last)
        if self.early_stopping.should_stop(state):
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()
