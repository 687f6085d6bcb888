"""`python -m bench --gpu`: the seed's loop against dist_train on one CUDA GPU, bf16, a 124M GPT.

Model FLOPs utilisation (MFU) is the model's training FLOPs per second (6 x weights per token plus
attention, as PaLM counts them; `workloads.train_flops_per_sample`) over the bf16 matmul rate measured
on the same GPU (an 8192^3 matmul), not over the datasheet peak. Both arms use SDPA attention (flash
in bf16) and AdamW (`--compile`: both arms torch.compile the model); the seed moves each batch with `.to(device)` under `torch.autocast(bfloat16)`;
dist_train runs `mixed_precision: bf16` with its fused AdamW and pinned, non-blocking batches.
"""

from __future__ import annotations

import statistics

import torch

from . import arms
from .common import machine, matmul_flops_per_s, spread
from .workloads import WORKLOADS, train_flops_per_sample

WORKLOAD = "gpt124m"


def run(quick: bool = False, compile: bool = False) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench --gpu needs a CUDA GPU; none is visible (torch.cuda.is_available() is False).")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_flops_per_s(size=8192, repeats=5, device="cuda", dtype=torch.bfloat16)
    steps, window, pairs = (12, 4, 1) if quick else (40, 10, 2)
    w = WORKLOADS[WORKLOAD]
    flops_per_step = train_flops_per_sample(WORKLOAD) * w.batch_size
    windows = {"seed": [], "dist_train": []}
    peak_memory = {"seed": 0.0, "dist_train": 0.0}
    ratios = []
    for pair in range(pairs):
        medians = {}
        for arm in (("seed", "dist_train") if pair % 2 == 0 else ("dist_train", "seed")):
            run_arm = arms.seed_loop if arm == "seed" else arms.dist_train_loop
            torch.cuda.reset_peak_memory_stats()
            times = run_arm(WORKLOAD, steps, window, device="cuda", bf16=True, compile=compile)
            windows[arm] += times
            medians[arm] = statistics.median(times)
            peak_memory[arm] = max(peak_memory[arm], torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.empty_cache()
        ratios.append(medians["seed"] / medians["dist_train"])
        print(f"  {WORKLOAD} pair {pair + 1}/{pairs}: seed {medians['seed'] * 1e3:.1f} ms, dist_train {medians['dist_train'] * 1e3:.1f} ms", flush=True)
    report = {"mode": "gpu-quick" if quick else "gpu", "compile": compile, "machine": machine(), "bf16_matmul_flops_per_s": peak,
              "workload": WORKLOAD, "batch_size": w.batch_size, "context": w.context, "arms": {}, "ratio": spread(ratios)}
    for arm, times in windows.items():
        step_s = statistics.median(times)
        report["arms"][arm] = {
            "step_ms": spread([t * 1e3 for t in times]),
            "tokens_per_s": w.batch_size * w.context / step_s,
            "mfu": flops_per_step / step_s / peak,
            "peak_memory_gb": peak_memory[arm],
        }
    return report


def format_table(report: dict) -> str:
    lines = [f"GPU: {report['machine'].get('gpu')}, bf16 matmul {report['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (measured)",
             f"{'arm':<11} {'step ms':>9} {'tokens/s':>10} {'MFU':>6}"]
    for arm, a in report["arms"].items():
        lines.append(f"{arm:<11} {a['step_ms']['median']:9.1f} {a['tokens_per_s']:10.0f} {a['mfu']:6.1%}")
    q = report["ratio"]
    lines.append(f"ratio dist_train/seed throughput {q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}]")
    return "\n".join(lines)
