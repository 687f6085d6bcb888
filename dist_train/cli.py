"""`dist-train` / `python -m dist_train`: the command line.

    dist-train train [--config run.yaml] [key=value ...]   train (no config: the built-in digits task)

A user mistake (a `UserError`) prints one line naming the culprit and the fix, and exits with 2.
"""

from __future__ import annotations

import argparse
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
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key; values are YAML scalars (lr=3e-4 cpu=true)")
    return parser


def _train(args) -> int:
    from .config import load_config
    from .loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"dist-train: error: {exc}", file=sys.stderr)
        return 2
