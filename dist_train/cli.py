"""`dist-train` / `python -m dist_train`: the command line.

    dist-train train [--config run.yaml] [key=value ...]   train (no config: the built-in digits task)
    dist-train plot RUN_DIR                                 RUN_DIR/curves.png from RUN_DIR/metrics.jsonl
    dist-train export RUN_DIR_OR_CHECKPOINT --out DIR       model.safetensors + dist_train_model.json for load_model
    dist-train doctor [--config run.yaml] [key=value ...]  check a launch (run it under the same launcher as train)
    dist-train evaluate RUN_DIR_OR_CHECKPOINT [--set NAME] [--out REPORT.json] [key=value ...]
    dist-train predict RUN_DIR_OR_CHECKPOINT --out DIR [--set NAME] [--shard-samples N] [key=value ...]

A user mistake (a `UserError`) prints one line naming the culprit and the fix, and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import describe_keys
from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-train", description="Your PyTorch training loop, from one CPU to a SLURM cluster.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a model",
        description="Train a model. With no --config, trains the built-in handwritten-digits task.",
        epilog="Config keys (YAML file keys and key=value overrides):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file of config keys")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override a config key; values are YAML scalars (lr=3e-4 cpu=true)"
    )
    plot = commands.add_parser(
        "plot",
        help="plot a run's curves",
        description="Write RUN_DIR/curves.png: train/val loss and lr against optimizer step (needs matplotlib).",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (it holds metrics.jsonl)")
    export = commands.add_parser(
        "export",
        help="export weights for inference",
        description="Write a run's final weights or a checkpoint's (model.safetensors, sharded when large) and the model's import string and model_args to DIR; load with dist_train.load_model(DIR, model=MyModel).",
    )
    export.add_argument(
        "source",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run's output_dir (its final model.safetensors, or its newest complete checkpoint when that is newer) or a checkpoint directory",
    )
    export.add_argument("--out", required=True, metavar="DIR", help="where to write the export")
    export.add_argument("--max-shard-size", default="5GB", help="split the weights into shards of at most this size (default 5GB)")
    export.add_argument(
        "--model",
        metavar="IMPORT_STRING",
        help="record this model (path/to/model.py:MyModel or package.module:MyModel) instead of config.yaml's, e.g. when its relative path does not resolve from here",
    )
    export.add_argument(
        "--weights",
        choices=("raw", "ema"),
        default="raw",
        help="the trained weights (raw, default) or their exponential moving average (ema: the run set ema_decay)",
    )
    doctor = commands.add_parser(
        "doctor",
        help="check a launch before training",
        description="Print the resolved launch (ranks, nodes, devices, backend, SLURM variables), run an all_reduce smoke test and exit non-zero naming any problem. Launch it exactly like `train`.",
    )
    doctor.add_argument("--config", help="YAML file of config keys (the one the training will use)")
    doctor.add_argument("--timeout_s", type=float, default=30.0, help="seconds the process group and the smoke test may take (default 30)")
    doctor.add_argument("overrides", nargs="*", metavar="key=value", help="the training's overrides")
    source_help = "a run's output_dir (its final weights, or its newest complete checkpoint when that is newer) or a checkpoint directory"
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate trained weights on a set",
        description="The loss and metrics of a run's final weights or a checkpoint on its validation set or a named eval set, on any world size (launch it like train), without training and without writing into the run. Prints a JSON report.",
    )
    evaluate.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=source_help)
    evaluate.add_argument("--set", default="val", metavar="NAME", help="val (default) or a name of the run's eval_sets")
    evaluate.add_argument("--out", metavar="REPORT.json", help="also write the JSON report to this file")
    evaluate.add_argument("--weights", choices=("raw", "ema"), default="raw", help="the trained weights (default) or their EMA (ema_decay)")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override a key of the run's config (batch_size=256, data_args.path=...)"
    )
    predict = commands.add_parser(
        "predict",
        help="write a model's outputs for every sample of a set",
        description="Each sample's outputs, once, with its global index, in DIR/part-NNNNNN.safetensors written by the ranks as they go, and DIR/manifest.json; the same files on any world size. Rerun after an interruption to continue.",
    )
    predict.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=source_help)
    predict.add_argument("--out", required=True, metavar="DIR", help="where the parts and manifest.json go")
    predict.add_argument("--set", default="val", metavar="NAME", help="val (default) or a name of the run's eval_sets")
    predict.add_argument("--shard-samples", type=int, default=4096, metavar="N", help="samples per part file (default 4096)")
    predict.add_argument("--weights", choices=("raw", "ema"), default="raw", help="the trained weights (default) or their EMA (ema_decay)")
    predict.add_argument("overrides", nargs="*", metavar="key=value", help="override a key of the run's config")
    return parser


def _evaluate(args) -> int:
    from .inference import run_evaluate

    run_evaluate(args.source, args.set, args.overrides, args.out, ema=args.weights == "ema")
    return 0


def _predict(args) -> int:
    from .inference import run_predict

    run_predict(args.source, args.out, args.set, args.overrides, args.shard_samples, ema=args.weights == "ema")
    return 0


def _doctor(args) -> int:
    from .config import load_config
    from .doctor import run_doctor

    return run_doctor(load_config(args.config, args.overrides), args.timeout_s)


def _train(args) -> int:
    from .config import load_config
    from .faults import record_failure
    from .loop import train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except BaseException as exc:
        # Under torchrun's agent: a record for the next attempt (faults/restarts.py) and, for a crash, a line
        # naming this rank and its optimizer step before the traceback (`main` words a UserError).
        record_failure(cfg, exc, announce=not isinstance(exc, UserError))
        raise
    # 0: finished, or preempted and requeued (the job goes on by itself); 128 + signal: stopped by
    # SIGTERM/SIGUSR1 after saving a checkpoint, not finished: rerun the same command to continue.
    code = result.get("exit_code", 0)
    if code:
        record_failure(cfg, f"stopped by {result.get('preempted')} after saving a checkpoint (exit {code})", announce=False, mid_step=False)
    return code


def _plot(args) -> int:
    from .components import plot_run

    print(plot_run(args.run_dir))
    return 0


def _export(args) -> int:
    from .export import export, parse_size

    export(args.source, args.out, parse_size(args.max_shard_size), model=args.model, ema=args.weights == "ema")  # prints what it exported
    return 0


COMMANDS = {"train": _train, "plot": _plot, "export": _export, "doctor": _doctor, "evaluate": _evaluate, "predict": _predict}


def run() -> None:
    """The process entry point (`dist-train`, `python -m dist_train`): `main`, then exit with its status.

    A process that was one rank of a job ends with `os._exit` once everything is flushed: with torch
    2.13's gloo, a finished rank's interpreter shutdown aborts now and then ("terminate called without
    an active exception", SIGABRT, seen in about 1 of 10 two-rank runs on CPU) after the process group
    was destroyed, which would turn a completed training into a failed job. Nothing is left to run at
    that point: the weights, metrics and checkpoints are written and fsynced, trackers finished. No
    `gc.collect()` first: collecting DDP's Reducer there frees the last reference to the destroyed gloo
    group, whose destructor holds the GIL while joining a worker thread that needs the GIL to free a
    finished all_gather's tensors, a deadlock seen once in a few hundred two-rank runs (py-spy: main
    thread in `~ProcessGroupGloo` under `gc_collect`, gloo's `runLoop` in `gil_scoped_acquire`).
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"dist-train: error: {exc}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun: its failure table shows the line too
            from .faults import tell_launcher

            tell_launcher(f"UserError: {exc}")
        return 2
