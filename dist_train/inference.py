"""`dist-train evaluate` and `dist-train predict`: a trained model on a set, without training.

    dist-train evaluate runs/default                          # the run's final weights on its validation set
    dist-train evaluate runs/default/checkpoints/step_00000300 --set test --out report.json
    accelerate launch --config_file launch_configs/cpu.yaml -m dist_train evaluate runs/default
    dist-train predict runs/default --set test --out preds/   # part-*.safetensors + manifest.json

The weights are the ones `dist-train export` would take (`export.choose_weights`: a checkpoint as it is,
verified against its manifest; for a run, its final weights or a newer complete checkpoint), read from
safetensors, never unpickled. The model, loss, data, metrics and sets come from the config.yaml beside
them; `key=value` overrides change them (e.g. `batch_size=256`, `data_args.path=...`). Nothing is
written into the run: no lock, no log, no checkpoint. Any world size and launcher: the model is not
wrapped for training (no DDP), each rank evaluates its share of the set, and the sums are added once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import IterableDataset

from . import evaluation  # evaluation.evaluate / .predict: the functions, not the modules of those names
from .components import Loss
from .config import Config, load_config
from .data import eval_loader, split_if_stream
from .errors import UserError
from .eval_spec import parse_eval_sets, parse_metrics
from .evaluation import MetricSet, build_eval_sets, named_loader, prepare_eval
from .export import choose_weights, load_weights
from .faults import process_group_kwargs
from .plugins import build_model, check_call, resolve


def _open(source: str, overrides: list[str], command: str, ema: bool) -> tuple[Config, Path, str, int | None]:
    folder, what, step = choose_weights(Path(source), ema=ema, command=command)
    config = folder / "config.yaml"
    if not config.is_file():
        raise UserError(f"{folder} has no config.yaml (model, data, loss); evaluate a run's output_dir or one of its checkpoints.")
    # resume and output_dir name the run's own paths: they are not used here.
    return load_config(config, overrides, resume="never"), folder, what, step


def _accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available() and not cfg.cpu
    if cfg.mixed_precision == "fp16" and not cuda:
        raise UserError("mixed_precision: fp16 needs a CUDA GPU; override mixed_precision=no (or bf16) to run on CPU.")
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.mixed_precision,
        dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=cuda),
        kwargs_handlers=[process_group_kwargs(cfg)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise UserError(
            f"Launched as {launched} processes (WORLD_SIZE) but Accelerate formed a job of {accelerator.num_processes}; "
            "launch with a multi-process config (launch_configs/cpu.yaml on CPU, multi_gpu.yaml on GPUs)."
        )
    set_seed(cfg.seed)  # a sampler or a stream drawing from the global RNG draws the run's order, the same on every rank
    return accelerator


def _model(cfg: Config, folder: Path, accelerator: Accelerator, ema: bool):
    model = build_model(cfg.model, cfg.model_args)
    load_weights(model, folder, ema=ema)
    return model.to(accelerator.device).eval()


def _set_names(cfg: Config) -> list[str]:
    return ["val", *(s.name for s in parse_eval_sets(cfg.eval_sets))]


def _check_set(cfg: Config, name: str) -> None:
    if name not in _set_names(cfg):
        raise UserError(
            f"--set {name!r} is not a set of this run; choose one of: {', '.join(_set_names(cfg))} (eval_sets in its config.yaml)."
        )


def _validation_loader(cfg: Config, world_size: int):
    get_data = resolve(cfg.data, "data")
    view = cfg.data_view()
    check_call(
        get_data, {}, f"data: {cfg.data!r} cannot be called as get_dataloader(cfg, train)", "It must take (cfg, train).", view, False
    )
    return split_if_stream(eval_loader(get_data(view, False), cfg, "validation"), cfg, world_size, "validation")


def run_evaluate(source: str, set_name: str = "val", overrides: list[str] = (), report_path: str | None = None, ema: bool = False) -> dict:
    """The loss and metrics of the weights `source` names (their EMA with `ema`) on one set; printed as JSON by the main process."""
    cfg, folder, what, step = _open(source, overrides, "evaluate", ema)
    _check_set(cfg, set_name)
    accelerator = _accelerator(cfg)
    model = _model(cfg, folder, accelerator, ema)
    if set_name == "val":
        loader, data_spec = prepare_eval(accelerator, _validation_loader(cfg, accelerator.num_processes)), cfg.data
        metrics = MetricSet(parse_metrics(cfg.metrics), accelerator.device)
    else:
        (eval_set,) = build_eval_sets(cfg, accelerator, only=set_name)
        loader, metrics, data_spec = eval_set.loader, eval_set.metrics, eval_set.source
    with accelerator.autocast():
        values = evaluation.evaluate(model, loader, Loss(cfg.loss), accelerator, data_spec, metrics=metrics, prefix=set_name)
    report = {
        "source": str(folder.resolve()),
        "weights": what,
        "optimizer_step": step,
        "set": set_name,
        "num_processes": accelerator.num_processes,
        "metrics": values,
    }
    if accelerator.is_main_process:
        text = json.dumps(report, indent=1)
        print(text, flush=True)
        if report_path:
            Path(report_path).write_text(text + "\n")
    accelerator.end_training()
    return report


def run_predict(
    source: str, out: str, set_name: str = "val", overrides: list[str] = (), shard_samples: int = 4096, ema: bool = False
) -> dict:
    """Every sample's outputs on one set, written to `out` as parts and a manifest (evaluation/predict.py)."""
    if shard_samples < 1:
        raise UserError(f"--shard-samples {shard_samples} must be at least 1.")
    cfg, folder, what, step = _open(source, overrides, "predict", ema)
    _check_set(cfg, set_name)
    accelerator = _accelerator(cfg)
    model = _model(cfg, folder, accelerator, ema)
    if set_name == "val":
        loader, data_spec = _validation_loader(cfg, accelerator.num_processes), cfg.data
    else:
        (spec,) = [s for s in parse_eval_sets(cfg.eval_sets) if s.name == set_name]
        loader, data_spec = named_loader(cfg, spec, accelerator.num_processes)
    if getattr(loader, "per_rank", False) and not isinstance(loader.dataset, IterableDataset):
        raise UserError(f"predict: the {set_name} loader from {data_spec!r} has a batch_sampler; give it a batch_size to predict.")
    if getattr(loader, "per_rank", False):
        raise UserError(
            f"predict: the {set_name} stream from {data_spec!r} is split per rank, so a sample's global index depends on "
            "the world size; yield the whole stream on every rank (dist_train reads it on each), or predict on 1 process."
        )
    plan = {
        "source": str(folder.resolve()),
        "optimizer_step": step,
        "set": set_name,
        "shard_samples": shard_samples,
        "batch_size": cfg.batch_size,
    }
    manifest = evaluation.predict(model, loader, accelerator, Path(out), data_spec, Loss(cfg.loss).model_computes, shard_samples, plan)
    if accelerator.is_main_process:
        print(f"dist_train: wrote the outputs of {what} for {manifest['num_samples']} samples of set {set_name!r} to {out}", flush=True)
    accelerator.end_training()
    return manifest
