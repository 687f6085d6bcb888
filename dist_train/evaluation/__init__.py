"""Evaluation: when to validate, the exact mean over every sample of a set on every world size, early stopping.

- `validation.py`: `Validator`, the policy (epoch ends, `eval_every`, the last step) and its records.
- `evaluate.py`: one pass over a set, the exact sample-weighted mean gathered from all ranks.
- `stopping.py`: early stopping's verdict; its counters live in TrainState.
- `metrics.py`: the `metrics` config entry: built-ins, the user's functions, torchmetrics Metrics.
- `sets.py`: the validation set and the named `eval_sets`, from the user's data code.
- `predict.py`: `dist-train predict`, every sample's outputs once, in parts written by the ranks as they go.
"""

from .evaluate import evaluate
from .metrics import MetricSet
from .predict import predict
from .sets import build_eval_sets, named_loader, prepare_eval
from .validation import Validator

__all__ = ["MetricSet", "Validator", "build_eval_sets", "evaluate", "named_loader", "predict", "prepare_eval"]
