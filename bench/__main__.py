"""The benchmark: the seed's hand-written loop against dist_train, alternating A/B/A/B in one run.

    python -m bench --quick                 # < 2 minutes on 2 CPU cores: every workload, the data path, scaling
    python -m bench                         # more repeats and steps: the figures of bench/RESULTS.md
    python -m bench --gpu [--gpu-batch N]   # on a CUDA machine: bf16 GPT of ~124M parameters, MFU

Both arms run in this process with the same model, data, batch, seed and thread count (`--threads`,
1 by default, so the two arms do not fight over 2 cores). Ratios are dist_train's throughput over the
seed's, one per A/B pair; the table shows their median and range. Results also go to `--json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from . import arms, scaling
from .common import machine, matmul_flops_per_s, spread
from .workloads import CPU_WORKLOADS, WORKLOADS, train_flops_per_sample

# (steps per run, steps per timing window, A/B pairs) per workload; the first window of a run is dropped.
PLANS = {
    "full": {"tiny_mlp": (300, 50, 5), "mlp": (40, 8, 4), "gpt": (10, 2, 3)},
    "quick": {"tiny_mlp": (150, 25, 3), "mlp": (18, 4, 2), "gpt": (6, 2, 2)},
    "smoke": {"tiny_mlp": (12, 4, 1), "mlp": (6, 2, 1), "gpt": (4, 1, 1)},
}


def run_workload(name: str, plan: tuple, threads: int, peak_flops: float, log=print) -> dict:
    """Alternate seed / dist_train runs; per-pair throughput ratios; FLOP/s against the matmul rate."""
    steps, window, pairs = plan
    w = WORKLOADS[name]
    windows = {"seed": [], "dist_train": []}
    ratios = []
    for pair in range(pairs):
        medians = {}
        # Alternate which arm goes first so neither always runs on a warmer (or hotter) machine.
        for arm in ("seed", "dist_train") if pair % 2 == 0 else ("dist_train", "seed"):
            torch.set_num_threads(threads)
            gc.collect()  # each arm starts from the same collector state, not the other arm's garbage
            run = arms.seed_loop if arm == "seed" else arms.dist_train_loop
            times = run(name, steps, window)
            windows[arm] += times
            medians[arm] = statistics.median(times)
        ratios.append(medians["seed"] / medians["dist_train"])
        log(f"  {name} pair {pair + 1}/{pairs}: seed {medians['seed'] * 1e3:.3f} ms, dist_train {medians['dist_train'] * 1e3:.3f} ms")
    result = {"workload": name, "batch_size": w.batch_size, "steps_per_run": steps, "window_steps": window, "pairs": pairs, "arms": {}}
    flops_per_step = train_flops_per_sample(name) * w.batch_size
    for arm, times in windows.items():
        step_s = statistics.median(times)
        result["arms"][arm] = {
            "step_ms": spread([t * 1e3 for t in times]),
            "samples_per_s": w.batch_size / step_s,
            **({"tokens_per_s": w.batch_size * w.tokens_per_sample / step_s} if w.tokens_per_sample else {}),
            "flops_per_s": flops_per_step / step_s,
            "fraction_of_matmul_rate": flops_per_step / step_s / peak_flops,
        }
    result["ratio"] = spread(ratios)
    # Contention from other work only ever slows a window down, so the best windows are the least
    # disturbed view of each arm; their ratio is the second, noise-robust figure.
    result["ratio_of_best_windows"] = min(windows["seed"]) / min(windows["dist_train"])
    return result


def format_table(report: dict) -> str:
    lines = [
        f"{'workload':<10} {'arm':<11} {'step ms (median [min-max])':<28} {'samples/s':>10} {'tokens/s':>10} {'GFLOP/s':>8} {'of matmul':>9}",
    ]
    for r in report["workloads"]:
        for arm, a in r["arms"].items():
            s = a["step_ms"]
            tokens = f"{a['tokens_per_s']:.0f}" if "tokens_per_s" in a else "-"
            lines.append(
                f"{r['workload']:<10} {arm:<11} {s['median']:8.3f} [{s['min']:.3f}-{s['max']:.3f}]".ljust(51)
                + f" {a['samples_per_s']:>10.0f} {tokens:>10} {a['flops_per_s'] / 1e9:>8.2f} {a['fraction_of_matmul_rate']:>8.1%}"
            )
        q = r["ratio"]
        lines.append(
            f"{r['workload']:<10} {'ratio':<11} dist_train/seed throughput {q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}] over {q['n']} pairs; "
            f"best windows {r['ratio_of_best_windows']:.2f}x"
        )
    if "data_path" in report:
        d = report["data_path"]
        lines.append(
            f"data path  (tiny_mlp batch {d['batch_size']}): DataLoader(TensorDataset) {d['default_samples_per_s']:.0f} samples/s, "
            f"dist_train's prepared loader {d['dist_train_samples_per_s']:.0f} samples/s = {d['speedup']:.1f}x"
        )
    if "scaling" in report:
        s = report["scaling"]
        lines.append(
            f"scaling    (mlp, 1 thread/process): 1 process {s['one_process_samples_per_s']:.0f} samples/s, "
            f"2 processes {s['two_process_samples_per_s']:.0f} samples/s = {s['speedup']:.2f}x; "
            f"best windows {s['speedup_best_windows']:.2f}x ({s['one_process_best_step_ms']:.1f} ms vs {s['two_process_best_step_ms']:.1f} ms per step)"
        )
        if s.get("allreduce_ms") is not None:
            lines.append(
                f"           where the 2-process step goes ({s['two_process_step_ms']:.1f} ms vs {s['one_process_step_ms']:.1f} ms on 1): "
                f"compute {s['concurrent_step_ms']:.1f} ms with both processes busy ({s['solo_step_ms']:.1f} ms alone), "
                f"+ the preemption check's async all-reduce {s['preemption_check_ms']:+.2f} ms ({s['preemption_call_ms']:.3f} ms in the call; "
                f"{s['preemption_check_one_process_us']:.2f} us on 1 process, no collective), "
                f"gloo all-reduce of the {s['gradient_mb']:.1f} MB gradient {s['allreduce_ms']:.1f} ms, rest {s['unexplained_ms']:.1f} ms"
            )
    lines.append(
        f"matmul rate (fp32 1024^3, best of start and end): {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; 'of matmul' = achieved / this"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats and steps (< 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="a few steps of everything: checks the benchmark runs (tests)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU benchmark instead (CUDA, bf16, ~124M GPT)")
    parser.add_argument("--compile", action="store_true", help="with --gpu: torch.compile the model in both arms")
    parser.add_argument(
        "--gpu-batch", type=int, metavar="N", help="with --gpu: sequences per step (default: ~60%% of the GPU's memory, see bench/gpu.py)"
    )
    parser.add_argument("--workloads", nargs="+", choices=CPU_WORKLOADS, default=list(CPU_WORKLOADS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both arms (default 1)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2-process scaling run")
    parser.add_argument("--json", help="where to write the JSON report (default bench/results.json, bench/results_gpu.json with --gpu)")
    args = parser.parse_args(argv)

    if args.gpu:
        from . import gpu

        report = gpu.run(quick=args.quick or args.smoke, compile=args.compile, batch_size=args.gpu_batch)
        print(gpu.format_table(report))
    else:
        plans = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
        torch.set_num_threads(args.threads)
        # --smoke only checks that everything runs: one timed repeat of the matmul instead of five.
        matmul_repeats = 1 if args.smoke else 5
        peak = matmul_flops_per_s(repeats=matmul_repeats)
        print(f"matmul rate ({args.threads} thread(s), fp32 1024^3, at start): {peak / 1e9:.1f} GFLOP/s", flush=True)
        report = {
            "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
            "threads": args.threads,
            "machine": machine(),
            "matmul_flops_per_s": peak,
            "workloads": [],
        }
        # The data path first, in a fresh process: the per-sample path's many small objects make it the
        # most sensitive to the garbage collector's work on whatever the runs before it leave behind.
        gc.collect()
        report["data_path"] = arms.data_path_rates(batches=20 if args.smoke else 200)
        for name in args.workloads:
            report["workloads"].append(run_workload(name, plans[name], args.threads, peak, log=lambda m: print(m, flush=True)))
        torch.set_num_threads(args.threads)
        # Measured again at the end: other work on the machine can only slow a measurement down, so the
        # faster of the two is the better estimate of what this machine's cores can do.
        report["matmul_flops_per_s"] = peak = max(peak, matmul_flops_per_s(repeats=matmul_repeats))
        for workload in report["workloads"]:
            for arm in workload["arms"].values():
                arm["fraction_of_matmul_rate"] = arm["flops_per_s"] / peak
        if not args.no_scaling:
            report["scaling"] = scaling.run(
                steps=6 if args.smoke else 30 if args.quick else 60,
                window=2 if args.smoke else 5,
                pairs=2 if report["mode"] == "full" else 1,
                blocks=2 if args.smoke else 8,
            )
        print(format_table(report))
    path = Path(args.json or ("bench/results_gpu.json" if args.gpu else "bench/results.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"JSON report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
