"""The one typed run configuration: loaded from YAML, overridden from the command line, checked once.

Every key is a field of `Config` with its type, default and a help text; `--help` and the README's
config reference are generated from the same fields. `load_config` is the only way in: it rejects
unknown keys (naming the closest valid one), wrong types and out-of-range values, each as a
`UserError` that names the key, the value and what is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError
from .eval_spec import monitorable

DEFAULT_MODEL = "dist_train.examples.digits:DigitsMLP"
DEFAULT_DATA = "dist_train.examples.digits:get_dataloader"


def _opt(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None):
    """A config field: its default, a help text and the range of values it accepts."""
    factory = {"default_factory": (lambda d=default: type(d)(d))} if isinstance(default, (dict, list)) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "minimum": minimum}, **factory)


@dataclass
class Config:
    """A training run. Field order is the order of the README's reference and of `--help`."""

    # --- what to train -------------------------------------------------------------------------
    model: str = _opt(
        DEFAULT_MODEL, "Import string (`path/to/model.py:MyModel` or `pkg.module:MyModel`) of a callable returning an nn.Module."
    )
    model_args: dict = _opt({}, "Keyword arguments passed to `model`.")
    data: str = _opt(
        DEFAULT_DATA, "Import string of `get_dataloader(cfg, train) -> DataLoader` (or `-> Dataset`, then dist_train builds the loaders)."
    )
    data_args: dict = _opt({}, "Extra attributes of the `cfg` handed to `data` (e.g. `data_path`).")
    loss: str = _opt(
        "cross_entropy",
        "`cross_entropy`, `mse`, `model` (the loss the model returns, e.g. a transformers model given `labels`), or the import string of `(outputs, targets) -> loss`.",
    )

    # --- optimisation --------------------------------------------------------------------------
    optimizer: str = _opt("adamw", "Optimizer.", choices=("adam", "adamw", "sgd"))
    lr: float = _opt(1e-3, "Peak learning rate.", minimum=0.0)
    weight_decay: float = _opt(0.0, "Weight decay.", minimum=0.0)
    momentum: float = _opt(0.0, "Momentum (sgd only).", minimum=0.0)
    epochs: int = _opt(20, "Passes over the training set.", minimum=1)
    batch_size: int = _opt(32, "Samples per process per micro-batch (global batch = batch_size x processes x grad_accum_steps).", minimum=1)
    grad_accum_steps: int = _opt(1, "Micro-batches accumulated into one optimizer step.", minimum=1)
    max_grad_norm: Optional[float] = _opt(
        None, "Clip the global gradient norm to this value on each optimizer step (null: no clipping).", minimum=0.0
    )
    lr_schedule: str = _opt(
        "constant", "Learning-rate schedule after warmup, per optimizer step.", choices=("constant", "linear", "cosine")
    )
    warmup_steps: int = _opt(0, "Optimizer steps of linear warmup from 0 to `lr`.", minimum=0)
    max_steps: Optional[int] = _opt(None, "Stop after this many optimizer steps (overrides `epochs`).", minimum=1)
    mixed_precision: str = _opt("no", "Autocast precision through the Accelerator (fp16 needs a GPU).", choices=("no", "fp16", "bf16"))
    ema_decay: Optional[float] = _opt(
        None,
        "Keep an exponential moving average of the weights with this decay per update (e.g. 0.999), validated beside them (`val_loss_ema`) and saved as model_ema.safetensors (null: off).",
        minimum=0.0,
    )
    ema_warmup: bool = _opt(False, "Warm the EMA up: decay after n updates = min(ema_decay, (1 + n) / (10 + n)).")
    ema_start_step: int = _opt(0, "Up to this optimizer step the EMA is a copy of the weights.", minimum=0)
    ema_every: int = _opt(1, "Update the EMA every N optimizer steps.", minimum=1)

    # --- validation and stopping ---------------------------------------------------------------
    eval_every: Optional[int] = _opt(None, "Also validate every N optimizer steps (always at each epoch end).", minimum=1)
    early_stopping_patience: Optional[int] = _opt(
        None, "Stop after this many validations without improvement of `monitor` (null: never).", minimum=1
    )
    metrics: list = _opt(
        [],
        "Metrics of every evaluation, over exactly the set's samples on any world size: `accuracy`, `topK_accuracy` (e.g. `top5_accuracy`), `mse`, `mae`, or `{name, metric: IMPORT_STRING, args}` naming a torchmetrics Metric or a function `(outputs, targets) -> per-sample values` (docs/evaluation.md). Logged as `val_NAME`.",
    )
    eval_sets: dict = _opt(
        {},
        "Evaluation sets besides validation, name -> `{}` (your `get_dataloader(cfg, False, split=NAME)`), an import string of `fn(cfg)`, or `{data, split, every, metrics}`; logged as `NAME_loss`, `NAME_<metric>` (docs/evaluation.md).",
    )
    monitor: str = _opt(
        "val_loss",
        "Metric watched by early stopping and `keep_best`: any key every validation logs (`val_loss`, `val_<metric>`, `<set>_<metric>`).",
    )
    monitor_mode: str = _opt("min", "Whether a smaller or larger `monitor` is better.", choices=("min", "max"))

    # --- machine and run -----------------------------------------------------------------------
    seed: int = _opt(0, "Seed for model init, data order and every RNG.", minimum=0)
    num_workers: int = _opt(0, "DataLoader worker processes (per process).", minimum=0)
    output_dir: str = _opt("runs/default", "Where config.yaml, metrics.jsonl, checkpoints and model.safetensors go.")
    cpu: bool = _opt(False, "Force CPU even when a GPU is present.")
    collective_timeout_s: int = _opt(
        1800,
        "Seconds a collective may wait for other ranks before the job fails (longer than hang_timeout_s, which says where it hangs).",
        minimum=1,
    )
    startup_timeout_s: int = _opt(
        600,
        "Seconds the ranks may take to form the process group, at launch and after an in-job restart (--max_restarts), and the limit of every collective until the first optimizer step; then collective_timeout_s applies (the shorter of the two applies until then).",
        minimum=1,
    )
    hang_timeout_s: Optional[int] = _opt(
        900,
        "A rank without progress for this long writes every rank's stacks to output_dir/diagnostics/ and stops the job, naming the rank that is behind (null: off). Longer than the slowest step, validation and checkpoint save.",
        minimum=1,
    )
    find_unused_parameters: bool = _opt(
        False,
        "Let DDP allow parameters that get no gradient in some steps (slower; needed for models with unused or conditionally used parameters).",
    )

    # --- logging -------------------------------------------------------------------------------
    log_every: int = _opt(10, "Log training metrics every N optimizer steps.", minimum=1)
    log_with: list = _opt([], "Extra trackers besides metrics.jsonl: any of tensorboard, wandb, mlflow, trackio.")
    progress: bool = _opt(True, "Show a progress bar (main process, interactive terminals only).")
    plot: bool = _opt(
        True, "Draw output_dir/curves.png (loss and learning rate) at the end of the run, when matplotlib is installed (~0.6 s)."
    )
    flops_per_sample: Optional[float] = _opt(
        None,
        "Training FLOPs (forward + backward) of one sample, for the logged TFLOP/s and MFU (null: counted on the first micro-batch with torch's FlopCounterMode; not under `compile`).",
        minimum=0.0,
    )
    peak_tflops: Optional[float] = _opt(
        None,
        "Dense peak TFLOP/s of one device at the run's precision, for MFU (null: from dist_train's table of GPUs; unknown devices and CPUs get no MFU).",
        minimum=0.0,
    )

    # --- checkpoints ---------------------------------------------------------------------------
    checkpoint_every: Optional[int] = _opt(None, "Save a checkpoint every N optimizer steps (null: only at epoch ends).", minimum=1)
    checkpoint_epochs: bool = _opt(True, "Save a checkpoint at the end of each epoch.")
    keep_last: Optional[int] = _opt(None, "Keep only the newest K checkpoints (null: keep all).", minimum=1)
    async_checkpoint: bool = _opt(
        False,
        "Write checkpoints in the background from an in-memory snapshot taken at the step boundary (one extra host copy of the model and optimizer state; under FSDP2 each rank copies and writes its own shards; not with FSDP1/DeepSpeed).",
    )
    keep_best: bool = _opt(False, "Also keep the checkpoint with the best `monitor`, never pruned.")
    resume: str = _opt("auto", "`auto` (newest complete checkpoint in output_dir, if any), `never`, or a checkpoint path.")

    # --- debugging -----------------------------------------------------------------------------
    fast_dev_run: int = _opt(
        0,
        "Run N train and N val batches through the whole loop once, no checkpoints (0: off). Resolved before the run into max_steps, log_every, limit_val_batches and checkpoints (see config.yaml).",
        minimum=0,
    )
    limit_val_batches: Optional[int] = _opt(None, "Validate on at most N batches per process (null: the whole validation set).", minimum=1)
    checkpoints: bool = _opt(
        True,
        "Write checkpoints and the final weights, and resume from checkpoints (false: the run leaves no weights behind and resumes nothing).",
    )
    overfit_batches: int = _opt(
        0, "Train and validate on the same first N global batches of the training set, in order (0: off).", minimum=0
    )
    detect_anomaly: bool = _opt(False, "Turn on autograd anomaly detection (slow).")
    on_nonfinite: str = _opt("stop", "On a NaN/inf training loss: stop with an error, or skip the update.", choices=("stop", "skip"))
    compile: bool = _opt(False, "torch.compile the model through Accelerate's dynamo settings.")
    profile_steps: Optional[list] = _opt(
        None, "`[start, end]`: write a torch.profiler trace of these optimizer steps to output_dir/profile/."
    )
    auto_batch_size: bool = _opt(False, "Probe one training step first; on out-of-memory on any rank, all halve `batch_size` and retry.")

    def data_view(self) -> types.SimpleNamespace:
        """The `cfg` given to the user's `get_dataloader`: every config key plus every `data_args` key."""
        clash = sorted(set(self.data_args) & {f.name for f in dataclasses.fields(self)})
        if clash:
            raise UserError(f"data_args key {clash[0]!r} shadows the config key of the same name; rename it in data_args.")
        return types.SimpleNamespace(**dataclasses.asdict(self), **self.data_args)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)  # once: resolving them per key took ~1 ms each


def _key_docs():
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else ""
        yield f.name, default, f.metadata["help"] + choices


def describe_keys() -> str:
    """One line per key, for `--help`."""
    return "\n".join(f"  {name} (default {default!r}): {doc}" for name, default, doc in _key_docs())


def reference_table() -> str:
    """The README's config reference, a Markdown table (a test keeps the README equal to it)."""
    rows = ["| Key | Default | Meaning |", "|---|---|---|"]
    rows += [
        f"| `{name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {doc.replace('|', '/')} |"
        for name, default, doc in _key_docs()
    ]
    return "\n".join(rows)


# Names users bring from other trainers (HF Trainer, Lightning, torchtitan, Accelerate examples): spelling
# similarity cannot find these (`learning_rate` looks nothing like `lr`).
_FOREIGN_KEYS = {
    "learning_rate": "lr",
    "optimizer.lr": "lr",
    "base_lr": "lr",
    "optim": "optimizer",
    "optimizer.name": "optimizer",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "max_epochs": "epochs",
    "n_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "bs": "batch_size",
    "micro_batch_size": "batch_size",
    "local_batch_size": "batch_size",
    "training.local_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "accumulate_grad_batches": "grad_accum_steps",
    "gradient_clip_val": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "training.max_norm": "max_grad_norm",
    "max_norm": "max_grad_norm",
    "lr_scheduler": "lr_schedule",
    "lr_scheduler_type": "lr_schedule",
    "scheduler": "lr_schedule",
    "warmup": "warmup_steps",
    "num_warmup_steps": "warmup_steps",
    "warmup_ratio": "warmup_steps",
    "lr_scheduler.warmup_steps": "warmup_steps",
    "max_train_steps": "max_steps",
    "training.steps": "max_steps",
    "steps": "max_steps",
    "precision": "mixed_precision",
    "fp16": "mixed_precision",
    "bf16": "mixed_precision",
    "eval_steps": "eval_every",
    "val_check_interval": "eval_every",
    "eval_interval": "eval_every",
    "patience": "early_stopping_patience",
    "early_stopping": "early_stopping_patience",
    "metric_for_best_model": "monitor",
    "greater_is_better": "monitor_mode",
    "mode": "monitor_mode",
    "dataloader_num_workers": "num_workers",
    "output": "output_dir",
    "output_path": "output_dir",
    "default_root_dir": "output_dir",
    "dump_folder": "output_dir",
    "job.dump_folder": "output_dir",
    "logging_dir": "output_dir",
    "no_cuda": "cpu",
    "use_cpu": "cpu",
    "ddp_timeout": "collective_timeout_s",
    "timeout": "collective_timeout_s",
    "ddp_find_unused_parameters": "find_unused_parameters",
    "logging_steps": "log_every",
    "log_every_n_steps": "log_every",
    "log_freq": "log_every",
    "metrics.log_freq": "log_every",
    "report_to": "log_with",
    "logger": "log_with",
    "disable_tqdm": "progress",
    "enable_progress_bar": "progress",
    "save_steps": "checkpoint_every",
    "checkpoint.interval": "checkpoint_every",
    "every_n_train_steps": "checkpoint_every",
    "save_total_limit": "keep_last",
    "checkpoint.keep_latest_k": "keep_last",
    "resume_from_checkpoint": "resume",
    "ckpt_path": "resume",
    "torch_compile": "compile",
    "auto_find_batch_size": "auto_batch_size",
}


def _closest(key: str) -> str:
    """' Did you mean …?' for an unknown key, or '' when no valid key is a plausible guess."""
    norm = key.strip().lower().replace("-", "_")
    match = norm if norm in FIELDS else _FOREIGN_KEYS.get(norm)
    if match is None:
        close = difflib.get_close_matches(norm, FIELDS, n=1, cutoff=0.6)
        match = close[0] if close else None
    if match is None:
        return ""
    choices = FIELDS[match].metadata["choices"]
    return f" Did you mean {match!r}" + (f" (one of {', '.join(choices)})?" if choices else "?")


def _check_value(name: str, value: Any) -> Any:
    """Return `value` converted to the field's type, or raise a UserError naming key, value and expectation."""
    f = FIELDS[name]
    hint = _HINTS[name]
    optional = typing.get_origin(hint) is typing.Union
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"Config key {name!r} may not be null; expected {base.__name__}.")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; users mean the number.
        with contextlib.suppress(ValueError):
            value = float(value)
    if base is str and isinstance(value, bool) and "no" in (f.metadata["choices"] or ()):
        # YAML 1.1 reads `mixed_precision=no` (as Accelerate's own CLI spells it) as false; the user means "no".
        value = "no" if not value else value
    if base is list and name in ("log_with", "metrics") and isinstance(value, str):
        value = [value]
    # bool is an int subclass, so `epochs: true` must be caught explicitly.
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"Config key {name!r} has value {value!r} of type {type(value).__name__}; expected {base.__name__}.")
    if base is dict:
        for key, item in value.items():
            # YAML reads `{path:/data}` (no space after the colon) as one key `path:/data` with no value.
            if item is None and isinstance(key, str) and ":" in key:
                head, _, rest = key.partition(":")
                raise UserError(
                    f"Config key {name!r} has the key {key!r} with no value: YAML needs a space after the colon; write {{{head}: {rest}}}."
                )
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise UserError(f"Config key {name!r} has value {value!r}; expected one of {', '.join(f.metadata['choices'])}.")
    if base is float and not math.isfinite(value):
        raise UserError(f"Config key {name!r} has value {value!r}; expected a finite number.")
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise UserError(f"Config key {name!r} has value {value!r}; expected a number >= {minimum:g}.")
    return value


def _check_combinations(cfg: Config) -> None:
    """Rules that involve more than one key: caught here, before any training starts."""
    if cfg.max_steps is not None and cfg.warmup_steps > cfg.max_steps:
        raise UserError(f"warmup_steps ({cfg.warmup_steps}) is larger than max_steps ({cfg.max_steps}); lower warmup_steps.")
    if cfg.profile_steps is not None:
        ok = len(cfg.profile_steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.profile_steps)
        if not ok or not 0 <= cfg.profile_steps[0] < cfg.profile_steps[1]:
            raise UserError(f"profile_steps {cfg.profile_steps!r} must be [start, end] with 0 <= start < end (optimizer steps).")
    known_trackers = ("tensorboard", "wandb", "mlflow", "trackio")
    for tracker in cfg.log_with:
        if tracker not in known_trackers:
            raise UserError(f"log_with entry {tracker!r} is not a tracker; expected any of {', '.join(known_trackers)}.")
    if cfg.momentum and cfg.optimizer != "sgd":
        raise UserError(f"momentum={cfg.momentum} only applies to optimizer: sgd (got optimizer: {cfg.optimizer}).")
    if cfg.ema_decay is not None and not cfg.ema_decay < 1:
        raise UserError(f"ema_decay {cfg.ema_decay} must be below 1 (1 would never move from the initial weights); e.g. 0.999.")
    if cfg.monitor.removesuffix("_ema") == "val_accuracy" and cfg.loss == "mse":
        raise UserError("monitor: 'val_accuracy' is never logged with loss: mse (not a classification); monitor val_loss.")
    # val_accuracy (and NAME_accuracy): classification only, checked again at the first validation.
    names = monitorable(cfg.metrics, cfg.eval_sets, classification=cfg.loss != "mse")
    if cfg.ema_decay is not None:  # every evaluated value has its twin for the EMA weights
        names += [f"{name}_ema" for name in names if name != "train_loss"]
    if cfg.monitor not in names:
        hint = " (the _ema metrics need ema_decay)" if cfg.monitor.endswith("_ema") and cfg.ema_decay is None else ""
        raise UserError(f"monitor: {cfg.monitor!r} is never logged by validation{hint}; choose one of: {', '.join(names)}.")
    if cfg.hang_timeout_s is not None and cfg.hang_timeout_s >= cfg.collective_timeout_s:
        raise UserError(
            f"hang_timeout_s ({cfg.hang_timeout_s}) must be shorter than collective_timeout_s ({cfg.collective_timeout_s}): "
            "otherwise a stuck collective fails first, without saying which rank is behind. Lower hang_timeout_s."
        )
    if cfg.fast_dev_run and cfg.overfit_batches:
        raise UserError("fast_dev_run and overfit_batches are both set; use one debug mode at a time.")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise UserError(f"resume: {cfg.resume!r} is neither 'auto', 'never' nor an existing checkpoint directory.")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"Override {item!r} is not of the form key=value (e.g. lr=3e-4).")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise UserError(f"Override {item!r}: the value is not a YAML scalar ({exc.problem}).") from None
    return key.strip(), value


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"Config file {str(path)!r} does not exist; check the --config path.") from None
    except OSError as exc:
        raise UserError(f"Config file {str(path)!r} cannot be read: {exc.strerror}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"Config file {str(path)!r} is not valid YAML{at}: {getattr(exc, 'problem', exc)}.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"Config file {str(path)!r} must be a mapping of key: value, not a {type(raw).__name__}.")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), **values: Any) -> Config:
    """Build the run's Config: defaults < YAML file < `values` < `key=value` overrides; checked once.

    Dotted overrides reach into dict keys: `model_args.hidden=128`.
    """
    raw = _read_yaml(Path(path)) if path is not None else {}
    raw.update(values)
    for item in overrides:
        key, value = _parse_override(item)
        head, _, sub = key.partition(".")
        if sub and head in ("model_args", "data_args"):
            raw[head] = {**(raw.get(head) or {}), sub: value}
        else:
            raw[key] = value
    checked = {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise UserError(f"Unknown config key {key!r}.{_closest(str(key))} Run `dist-train train --help` for every key.")
        checked[key] = _check_value(key, value)
    cfg = Config(**checked)
    _check_combinations(cfg)
    return cfg


def resolve_modes(cfg: Config) -> Config:
    """The debug modes as the ordinary settings they stand for, decided here once (config.yaml records them).

    `fast_dev_run: N`: N training batches (whole optimizer steps) and N validation batches per process,
    a record every step, no checkpoints and no final weights; warmup is cut to the run so the smoke test
    of a real config stays valid.
    """
    if not cfg.fast_dev_run:
        return cfg
    steps = math.ceil(cfg.fast_dev_run / cfg.grad_accum_steps)
    return dataclasses.replace(
        cfg,
        max_steps=steps,
        log_every=1,
        eval_every=None,
        limit_val_batches=cfg.fast_dev_run,
        checkpoints=False,
        warmup_steps=min(cfg.warmup_steps, steps),
    )
