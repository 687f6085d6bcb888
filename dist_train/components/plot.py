"""Training curves: `dist-train plot RUN_DIR` writes `RUN_DIR/curves.png` from `RUN_DIR/metrics.jsonl`.

Two panels sharing the x axis (optimizer steps): the training loss (the mean over each logging
interval) and the validation loss on top, the learning rate below. matplotlib is an optional extra
(`pip install dist-train[plot]`); the loop draws the curves at the end of every run when it is installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import UserError


def _read_records(metrics_path: Path) -> list[dict]:
    if not metrics_path.is_file():
        raise UserError(f"plot: {str(metrics_path)!r} does not exist; give the output_dir of a run.")
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str, where: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` from the records that carry `where`, skipping missing and non-finite values."""
    points = [(r["step"], r[key]) for r in records if where in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path) -> Path:
    """Draw the curves of the run in `run_dir` into `run_dir/curves.png`; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("plot: matplotlib is not installed; `pip install dist-train[plot]` (or matplotlib).") from None
    run_dir = Path(run_dir)
    records = _read_records(run_dir / "metrics.jsonl")
    # Log records carry `lr`; validation records carry `val_loss` (and the train loss since the previous validation).
    train_steps, train_loss = _series(records, "train_loss", "lr")
    val_steps, val_loss = _series(records, "val_loss", "val_loss")
    lr_steps, lr = _series(records, "lr", "lr")
    if not train_steps and not val_steps:
        raise UserError(f"plot: {str(run_dir / 'metrics.jsonl')!r} has no loss records yet; nothing to plot.")

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=(2, 1), constrained_layout=True)
    if train_steps:
        ax_loss.plot(train_steps, train_loss, label="train loss (mean per log interval)", color="tab:blue", linewidth=1.2)
    if val_steps:
        ax_loss.plot(val_steps, val_loss, label="validation loss", color="tab:orange", marker="o", markersize=4, linewidth=1.5)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{run_dir.resolve().name}: loss and learning rate")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend()
    if lr_steps:
        ax_lr.plot(lr_steps, lr, color="tab:green", linewidth=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(True, alpha=0.3)
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_if_available(run_dir: str | Path) -> Path | None:
    """The end-of-run plot: drawn when matplotlib is installed, silently skipped otherwise."""
    try:
        import matplotlib  # noqa: F401 - only whether it is installed
    except ImportError:
        return None
    try:
        return plot_run(run_dir)
    except UserError:  # e.g. a run too short to have logged anything
        return None
    except Exception as exc:
        print(f"dist_train: warning: could not draw {Path(run_dir) / 'curves.png'}: {exc}", file=sys.stderr)
        return None
