"""Evaluation: when to validate, the exact mean over every sample of a set on every world size, early stopping.

- `validation.py`: `Validator`, the policy (epoch ends, `eval_every`, the last step) and its records.
- `evaluate.py`: one pass over a set, the exact sample-weighted mean gathered from all ranks.
- `stopping.py`: early stopping's verdict; its counters live in TrainState.
"""

from .validation import Validator

__all__ = ["Validator"]
