"""The per-step cost of EMA weights and of the hardware fields of a log record, on dist_train's real loop.

    python -m bench.ema [--pairs 5] [--json out.json]

- EMA: `ema_decay: 0.999` against none, A/B alternating in this process (the same model, data and seed;
  1 thread), on the tiny MLP and the MLP of bench/workloads.py; the ratio is the step time with EMA over
  the step time without, per pair (target: <= 1.05).
- Log fields: what `components/throughput.py` adds to each training record (TFLOP/s, MFU, memory),
  timed directly, against a step of the tiny MLP, and the whole record's cost at `log_every: 1` against
  `log_every` = one window.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import timeit

import torch

from dist_train.components.throughput import Throughput, memory_fields

from . import arms

PLANS = {"tiny_mlp": (300, 50), "mlp": (40, 8)}  # steps per run, steps per timing window (the first is dropped)


def ab(workload: str, pairs: int, extra_b: dict, extra_a: dict | None = None) -> dict:
    """Median step time of arm A (extra_a) and arm B (extra_b), alternating; B/A ratio per pair."""
    steps, window = PLANS[workload]
    ratios, times = [], {"a": [], "b": []}
    for pair in range(pairs):
        medians = {}
        for arm in ("a", "b") if pair % 2 == 0 else ("b", "a"):
            torch.set_num_threads(1)
            gc.collect()
            extra = extra_b if arm == "b" else (extra_a or {})
            window_times = arms.dist_train_loop(workload, steps, window, extra=extra)
            times[arm] += window_times
            medians[arm] = statistics.median(window_times)
        ratios.append(medians["b"] / medians["a"])
    return {
        "workload": workload,
        "a_step_ms": statistics.median(times["a"]) * 1e3,
        "b_step_ms": statistics.median(times["b"]) * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }


def fields_us() -> float:
    """Microseconds to compute a record's hardware fields (CPU: no MFU table entry, RSS)."""
    meter = Throughput(torch.device("cpu"), "no", flops_per_sample=1e6, peak=1.0, compiled=False)
    number = 2000
    return timeit.timeit(lambda: (meter.fields(512, 0.1, 1), memory_fields(torch.device("cpu"))), number=number) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"ema": [], "log_every_1": None, "fields_us": fields_us()}
    for workload in PLANS:
        result = ab(workload, args.pairs, {"ema_decay": 0.999})
        results["ema"].append(result)
        print(
            f"EMA on {workload}: {result['a_step_ms']:.3f} ms -> {result['b_step_ms']:.3f} ms per step, ratio {result['ratio_median']:.3f}"
        )
    window = PLANS["tiny_mlp"][1]
    result = ab("tiny_mlp", args.pairs, {"log_every": 1}, {"log_every": window})
    results["log_every_1"] = result
    print(
        f"tiny_mlp log_every=1 vs {window}: {result['a_step_ms']:.3f} ms -> {result['b_step_ms']:.3f} ms, ratio {result['ratio_median']:.3f}"
    )
    print(f"hardware fields of one record: {results['fields_us']:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
