"""Evaluation sets: the validation set and the named ones of `eval_sets`, each with its metrics and interval.

The contract with the user's data code (docs/evaluation.md): the seed's `get_dataloader(cfg, train)`
stays as it is and gives the validation set (`train=False`). A named set comes either from the same
function, called as `get_dataloader(cfg, False, split=NAME)` (so that function takes `split=None`), or
from its own import string, called as `fn(cfg)`. Each returns a DataLoader or a Dataset, like the seed's.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader

from ..config import Config
from ..data import eval_loader, prepare_loaders, split_if_stream
from ..errors import UserError
from ..eval_spec import EvalSetSpec, parse_eval_sets, parse_metrics
from ..plugins import check_call, resolve
from .metrics import MetricSet


@dataclass
class EvalSet:
    name: str  # the prefix of its log keys: val, or an eval_sets name
    loader: object  # prepared for this world size
    metrics: MetricSet
    every: int | None  # optimizer steps; None: with every validation
    source: str  # the import string it came from, for messages


def named_loader(cfg: Config, spec: EvalSetSpec, world_size: int):
    """The (unprepared) loader of one named set, from the user's data code."""
    view = cfg.data_view()
    what = f"eval set {spec.name!r}"
    if spec.data is not None:
        fn = resolve(spec.data, f"eval_sets.{spec.name}")
        check_call(fn, {}, f"eval_sets.{spec.name}: {spec.data!r} cannot be called as fn(cfg)", "It must take (cfg).", view)
        obj, source = fn(view), spec.data
    else:
        fn = resolve(cfg.data, "data")
        check_call(
            fn,
            {"split": spec.split},
            f"eval_sets.{spec.name}: {cfg.data!r} cannot be called as get_dataloader(cfg, False, split={spec.split!r})",
            "Give it a split=None parameter (None: the training or validation set as before), or give the set its own data: import string.",
            view,
            False,
        )
        obj, source = fn(view, False, split=spec.split), cfg.data
    if obj is None:
        raise UserError(f"eval_sets.{spec.name}: {source!r} returned None for split={spec.split!r}; return a DataLoader or a Dataset.")
    return split_if_stream(eval_loader(obj, cfg, what), cfg, world_size, what), source


def prepare_eval(accelerator: Accelerator, loader):
    """`loader` sharded for this world size as `accelerator.prepare` would, but not registered with the
    Accelerator: its checkpoints keep holding the training and validation loaders' states only."""
    if getattr(loader, "per_rank", False):
        return prepare_loaders(accelerator, loader)[0]
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        even_batches=True,
        non_blocking=accelerator.non_blocking,
    )


def build_eval_sets(cfg: Config, accelerator: Accelerator, only: str | None = None) -> list[EvalSet]:
    """The named sets of `cfg.eval_sets` (or just `only`), prepared, with their metrics."""
    specs = parse_eval_sets(cfg.eval_sets)
    if only is not None:
        specs = tuple(s for s in specs if s.name == only)
    sets = []
    for spec in specs:
        loader, source = named_loader(cfg, spec, accelerator.num_processes)
        metrics = MetricSet(parse_metrics(cfg.metrics) if spec.metrics is None else spec.metrics, accelerator.device)
        sets.append(EvalSet(spec.name, prepare_eval(accelerator, loader), metrics, spec.every, source))
    return sets


def validation_set(cfg: Config, accelerator: Accelerator, loader) -> EvalSet:
    """The validation set (already prepared with the model) with the run's metrics."""
    return EvalSet("val", loader, MetricSet(parse_metrics(cfg.metrics), accelerator.device), None, cfg.data)
