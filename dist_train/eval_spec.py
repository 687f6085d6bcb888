"""What the `metrics` and `eval_sets` config keys say, read without importing anything the user names.

Config checks these at load time (names, shapes, `monitor`); the evaluation wing resolves them into
metric objects and loaders when a run or `dist-train evaluate` starts. See docs/evaluation.md.

    metrics:                          # computed on every evaluation of every set
      - accuracy                      # built-ins: accuracy, topK_accuracy (top5_accuracy), mse, mae
      - {name: f1, metric: torchmetrics.classification:MulticlassF1Score, args: {num_classes: 10}}
      - {name: margin, metric: my_metrics.py:margin}      # a function (outputs, targets) -> per-sample values
    eval_sets:                        # evaluated beside the validation set, logged as NAME_loss, NAME_<metric>
      test: {}                        # get_dataloader(cfg, False, split="test")
      ood: {data: ood.py:get_ood, every: 500, metrics: [accuracy]}    # get_ood(cfg)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UserError

BUILTIN_METRICS = ("accuracy", "mse", "mae")
TOP_K = re.compile(r"top(\d+)_accuracy")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED_SETS = ("val", "train")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    builtin: str | None = None  # "accuracy", "mse", "mae", "top_k"
    k: int = 1  # top_k only
    import_string: str | None = None  # a torchmetrics Metric class, or a function
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSetSpec:
    name: str
    data: str | None  # import string of fn(cfg); None: the run's get_dataloader(cfg, False, split=split)
    split: str
    every: int | None  # optimizer steps; None: with every validation
    metrics: tuple[MetricSpec, ...] | None  # None: the run's `metrics`


def parse_metrics(entries: list, where: str = "metrics") -> tuple[MetricSpec, ...]:
    """The entries of a `metrics` list, checked; a UserError naming the entry and the fix."""
    specs = []
    for entry in entries:
        specs.append(_metric(entry, where))
    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{where}: the name {duplicate!r} is given twice; give each metric its own name.")
    return tuple(specs)


def _metric(entry, where: str) -> MetricSpec:
    if isinstance(entry, str):
        if ":" in entry:
            return MetricSpec(name=entry.rpartition(":")[2], import_string=entry)
        top_k = TOP_K.fullmatch(entry)
        if top_k and int(top_k[1]) >= 1:
            return MetricSpec(name=entry, builtin="top_k", k=int(top_k[1]))
        if entry in BUILTIN_METRICS:
            return MetricSpec(name=entry, builtin=entry)
        raise UserError(
            f"{where}: {entry!r} is no built-in metric (accuracy, topK_accuracy such as top5_accuracy, mse, mae) nor an "
            "import string; name your own as {name: NAME, metric: path/to/file.py:fn_or_MetricClass, args: {...}}."
        )
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"name", "metric", "args"})
        if unknown or "metric" not in entry:
            raise UserError(
                f"{where}: entry {entry!r} must be a built-in name or {{name: NAME, metric: IMPORT_STRING, args: {{...}}}}"
                + (f" (unknown key {unknown[0]!r})." if unknown else " (no 'metric').")
            )
        spec = _metric(entry["metric"], where) if isinstance(entry["metric"], str) else None
        if spec is None:
            raise UserError(f"{where}: 'metric' of {entry!r} must be a string.")
        name = entry.get("name", spec.name)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(f"{where}: metric name {name!r} must be a word of letters, digits and _ (it becomes part of log keys).")
        args = entry.get("args") or {}
        if not isinstance(args, dict):
            raise UserError(f"{where}: 'args' of metric {name!r} must be a mapping of keyword arguments, not {args!r}.")
        if spec.builtin and args:
            raise UserError(f"{where}: the built-in metric {spec.name!r} takes no args.")
        return MetricSpec(name=name, builtin=spec.builtin, k=spec.k, import_string=spec.import_string, args=args)
    raise UserError(f"{where}: entry {entry!r} must be a metric name or a mapping {{name, metric, args}}.")


def parse_eval_sets(mapping: dict) -> tuple[EvalSetSpec, ...]:
    """The `eval_sets` mapping, checked: name -> {} | import string | {data, split, every, metrics}."""
    sets = []
    for name, value in mapping.items():
        where = f"eval_sets.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_SETS:
            raise UserError(f"eval_sets: set name {name!r} must be a word of letters, digits and _, other than val and train.")
        if value is None:
            value = {}
        if isinstance(value, str):
            value = {"data": value}
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected {{}} (split={name!r} of your get_dataloader), an import string, or a mapping.")
        unknown = sorted(set(value) - {"data", "split", "every", "metrics"})
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; a set takes data, split, every and metrics.")
        data, split, every, metrics = value.get("data"), value.get("split", name), value.get("every"), value.get("metrics")
        if data is not None and (not isinstance(data, str) or ":" not in data):
            raise UserError(f"{where}: data {data!r} must be the import string of fn(cfg) (path/to/file.py:fn).")
        if not isinstance(split, str):
            raise UserError(f"{where}: split {split!r} must be a string.")
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise UserError(f"{where}: every {every!r} must be a number of optimizer steps >= 1 (or left out: with each validation).")
        if metrics is not None and not isinstance(metrics, list):
            raise UserError(f"{where}: metrics must be a list, like the top-level metrics key.")
        parsed = None if metrics is None else parse_metrics(metrics, f"{where}.metrics")
        sets.append(EvalSetSpec(name, data, split, every, parsed))
    return tuple(sets)


def monitorable(metrics: list, eval_sets: dict, classification: bool) -> list[str]:
    """The record keys `monitor` may name: those written at every validation."""
    names = ["val_loss"] + (["val_accuracy"] if classification else []) + ["train_loss"]
    names += [f"val_{m.name}" for m in parse_metrics(metrics)]
    for spec in parse_eval_sets(eval_sets):
        if spec.every is None:
            own = parse_metrics(metrics) if spec.metrics is None else spec.metrics
            names += [f"{spec.name}_loss"] + ([f"{spec.name}_accuracy"] if classification else [])
            names += [f"{spec.name}_{m.name}" for m in own]
    return list(dict.fromkeys(names))
