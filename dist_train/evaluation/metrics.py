"""The `metrics` config entry made real: built-ins, the user's functions, torchmetrics Metrics.

Every metric is updated by `evaluate.py` with the *real* rows of each batch only (never the duplicates
Accelerate pads the last round with), in each rank's process; the ranks' parts are added once, at the
end. So the value is the metric over exactly the set's samples, on any world size.

- Built-ins and functions keep two float64 sums, a numerator and a denominator, added over the ranks
  by one `reduce` together with the loss: the metric is their ratio.
  - `accuracy`, `topK_accuracy`: per sample, the fraction of its predictions (one, or one per token)
    that are right (K: the target is among the K largest logits); mean over samples.
  - `mse`, `mae`: per sample, the mean squared / absolute error over its elements, in float64; mean over samples.
  - a function `fn(outputs, targets, **args)` returning one value per sample (first dimension = batch;
    more dimensions are averaged per sample): mean over samples; or a pair `(numerator, denominator)`,
    each summed over the set (e.g. correct tokens, tokens): their ratio.
- A torchmetrics `Metric` (the class by import string, built with `args`): `update(logits, targets)`
  on the real rows, `compute()` syncs its states across ranks by their own `dist_reduce_fx`. A value
  with several elements (a per-class recall) is logged as `NAME_0`, `NAME_1`, ...
"""

from __future__ import annotations

import warnings

import torch

from ..components import logits_of
from ..errors import UserError
from ..eval_spec import MetricSpec
from ..plugins import check_call, resolve


def _accuracy(outputs, targets) -> torch.Tensor:
    logits = _classification_logits(outputs, targets, "accuracy")
    return (logits.argmax(dim=-1) == targets).double().reshape(len(targets), -1).mean(dim=1)


def _top_k(k: int):
    def top_k_accuracy(outputs, targets) -> torch.Tensor:
        logits = _classification_logits(outputs, targets, f"top{k}_accuracy")
        if k > logits.shape[-1]:
            raise UserError(f"metrics: top{k}_accuracy needs at least {k} classes; the model returns {logits.shape[-1]}.")
        hits = (logits.topk(k, dim=-1).indices == targets.unsqueeze(-1)).any(dim=-1)
        return hits.double().reshape(len(targets), -1).mean(dim=1)

    return top_k_accuracy


def _classification_logits(outputs, targets, name: str) -> torch.Tensor:
    logits = logits_of(outputs)
    if targets is None or targets.is_floating_point() or logits.shape[:-1] != targets.shape:
        shape = None if targets is None else list(targets.shape)
        raise UserError(
            f"metrics: {name} needs class logits (batch, ..., classes) and integer targets (batch, ...); got outputs "
            f"{list(logits.shape)} and targets {shape}. Use mse/mae for regression."
        )
    return logits


def _error(power: int):
    def error(outputs, targets) -> torch.Tensor:
        values = logits_of(outputs).double()
        diff = (values - targets.double().view_as(values)).abs() ** power
        return diff.reshape(len(diff), -1).mean(dim=1)

    return error


_BUILTINS = {"accuracy": _accuracy, "mse": _error(2), "mae": _error(1)}


class _SumMetric:
    """A built-in or a user function: float64 numerator and denominator sums."""

    def __init__(self, spec: MetricSpec, fn):
        self.name, self.fn, self.args = spec.name, fn, spec.args
        self.user = spec.builtin is None

    def update(self, outputs, targets, sums: torch.Tensor) -> None:
        value = self.fn(outputs, targets, **self.args)
        count = len(targets) if targets is not None else None
        if isinstance(value, (tuple, list)) and len(value) == 2:
            sums[0] += torch.as_tensor(value[0]).to(sums).sum()
            sums[1] += torch.as_tensor(value[1]).to(sums).sum()
            return
        if not isinstance(value, torch.Tensor) or not value.ndim or (count is not None and value.shape[0] != count):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(
                f"metrics: {self.name!r} returned {got} for a batch of {count}; a metric function returns one value per "
                "sample (first dimension = batch) or a pair (numerator, denominator) summed over the set."
            )
        sums[0] += value.detach().to(sums).reshape(value.shape[0], -1).mean(dim=1).sum()
        sums[1] += value.shape[0]


class _TorchMetric:
    def __init__(self, spec: MetricSpec, cls):
        check_call(cls, spec.args, f"metrics: {spec.import_string!r} cannot take args {spec.args!r}", "Fix its args.")
        self.name, self.metric = spec.name, cls(**spec.args)

    def update(self, outputs, targets, sums: torch.Tensor) -> None:
        self.metric.update(logits_of(outputs), targets)


def _is_torchmetric(obj) -> bool:
    if not isinstance(obj, type):
        return False
    names = {f"{c.__module__}.{c.__qualname__}" for c in obj.__mro__}
    return "torchmetrics.metric.Metric" in names


def build_metric(spec: MetricSpec):
    if spec.builtin == "top_k":
        return _SumMetric(spec, _top_k(spec.k))
    if spec.builtin:
        return _SumMetric(spec, _BUILTINS[spec.builtin])
    try:
        target = resolve(spec.import_string, f"metrics ({spec.name})")
    except UserError as exc:
        if spec.import_string.startswith("torchmetrics"):
            try:
                import torchmetrics  # noqa: F401
            except ImportError:
                raise UserError(
                    f"metrics: {spec.name!r} names {spec.import_string!r} but torchmetrics is not installed; "
                    "pip install 'dist-train[metrics]' (or torchmetrics)."
                ) from None
        raise exc
    if _is_torchmetric(target):
        return _TorchMetric(spec, target)
    if isinstance(target, type) or not callable(target):
        raise UserError(
            f"metrics: {spec.import_string!r} is a {type(target).__name__}; name a torchmetrics Metric class or a function "
            "(outputs, targets, **args) -> per-sample values."
        )
    check_call(
        target, spec.args, f"metrics: {spec.import_string!r} cannot be called as fn(outputs, targets, **args)", "Fix its args.", None, None
    )
    return _SumMetric(spec, target)


class MetricSet:
    """The metrics of one evaluation set; `reset` before a pass, `update` with real rows, `result` after."""

    def __init__(self, specs: tuple[MetricSpec, ...], device: torch.device):
        self.metrics = [build_metric(spec) for spec in specs]
        self.device = device
        for metric in self.metrics:
            if isinstance(metric, _TorchMetric):
                metric.metric.to(device)
        self.sums = torch.zeros(len(self.metrics), 2, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.sums.zero_()
        for metric in self.metrics:
            if isinstance(metric, _TorchMetric):
                metric.metric.reset()

    def update(self, outputs, targets) -> None:
        for metric, sums in zip(self.metrics, self.sums):
            metric.update(outputs, targets, sums)

    def result(self, sums: torch.Tensor, prefix: str) -> dict:
        """The values, from `sums` (this set's sums added over the ranks) and the torchmetrics' own sync."""
        values = {}
        for metric, (numerator, denominator) in zip(self.metrics, sums.tolist()):
            if isinstance(metric, _TorchMetric):
                with warnings.catch_warnings():  # a rank with no real row never updated: its states are the defaults
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    value = metric.metric.compute()
                values.update(_flatten(f"{prefix}_{metric.name}", value))
            else:
                values[f"{prefix}_{metric.name}"] = numerator / denominator if denominator else float("nan")
        return values


def _flatten(key: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flatten(f"{key}_{name}", item).items()}
    tensor = torch.as_tensor(value).detach().double().cpu()
    if tensor.numel() == 1:
        return {key: tensor.item()}
    return {f"{key}_{i}": v for i, v in enumerate(tensor.reshape(-1).tolist())}
