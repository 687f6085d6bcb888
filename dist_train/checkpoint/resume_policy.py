"""What a resumed run may change: every config key is either applied or refused before training.

The checkpoint holds the config of the run that wrote it. A key whose new value cannot continue that
run exactly (the optimizer's state would not fit, the data order or the best metric would mean
something else) is refused with one line naming the key and both values; every other change is
applied from the resumed step on and said once, so config.yaml never claims what the run ignores.
"""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..errors import UserError

# key -> why the checkpoint cannot continue with another value
REFUSED = {
    "optimizer": "the checkpoint's optimizer state belongs to the old optimizer",
    "seed": "the seed fixes the order of the epoch in progress and of the RNGs restored from the checkpoint",
    "monitor": "the best value kept for early stopping and keep_best was measured on the old metric",
    "monitor_mode": "the best value kept for early stopping and keep_best was ranked the other way",
    "overfit_batches": "it changes which samples make up the training set",
}
# Said on a change but not worth a line each: they only steer this invocation.
QUIET = {"resume", "progress", "plot", "output_dir"}


def check_changes(saved: dict, cfg: Config, checkpoint: str) -> list[str]:
    """Refuse (UserError) a change `cfg` cannot continue; return one line per applied change."""
    current = dataclasses.asdict(cfg)
    if (saved.get("ema_decay") is None) != (cfg.ema_decay is None):  # a checkpoint from before EMA has none
        have = "has no EMA weights to continue" if cfg.ema_decay is not None else "holds EMA weights this run would drop"
        raise UserError(
            f"ema_decay changes from {saved.get('ema_decay')!r} to {cfg.ema_decay!r} since checkpoint {checkpoint}, which {have}. "
            f"Resume with ema_decay: {saved.get('ema_decay')!r}, or start a new run (resume: never, another output_dir)."
        )
    changed = [key for key in current if key in saved and saved[key] != current[key]]
    for key in changed:
        fp16_switch = key == "mixed_precision" and "fp16" in (saved[key], current[key])
        if key in REFUSED or fp16_switch:
            why = REFUSED.get(key, "the fp16 loss scaler's state exists only on one side")
            raise UserError(
                f"{key} changes from {saved[key]!r} to {current[key]!r} since checkpoint {checkpoint}, but a resumed run "
                f"cannot take that ({why}). Resume with {key}: {saved[key]!r}, or start a new run (resume: never, another output_dir)."
            )
    return [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed if key not in QUIET]
