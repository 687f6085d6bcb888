"""`python -m bench --gpu`: the seed's loop against dist_train on one CUDA GPU, bf16, a 124M GPT.

Model FLOPs utilisation (MFU) is the model's training FLOPs per second (6 x weights per token plus
attention, as PaLM counts them; `workloads.train_flops_per_sample`) over the bf16 matmul rate measured
on the same GPU (an 8192^3 matmul), not over the datasheet peak. Both arms use SDPA attention (flash
in bf16) and AdamW (`--compile`: both arms torch.compile the model); the seed moves each batch with
`.to(device)` under `torch.autocast(bfloat16)`; dist_train runs `mixed_precision: bf16` with its fused
AdamW and pinned, non-blocking batches. Both arms are timed by the same clock (`arms.StepClock`: a
`torch.cuda.synchronize()` and a time stamp after every window's last optimizer step).

The batch (`--gpu-batch`, sequences of 1024 tokens) defaults to what fits in ~60% of the GPU's memory
by `GIB_PER_SAMPLE`: 40 on an 80 GB GPU (79 GiB), 72 on an H200 (~140 GiB). Not yet run on a GPU: no
GPU was lent to the sessions that wrote it (bench/RESULTS.md).
"""

from __future__ import annotations

import gc
import statistics

import torch

from . import arms
from .common import machine, matmul_flops_per_s, spread
from .workloads import WORKLOADS, train_flops_per_sample

WORKLOAD = "gpt124m"
# Peak memory per 1024-token sequence of the 124M GPT, forward + backward under bf16 autocast, fp32 loss
# on the logits (50304-wide, so ~half of it): 1.1 GiB, measured on CPU (peak RSS growth from batch 1 to 2).
# Weights, gradients and AdamW's moments add ~2 GiB on top.
GIB_PER_SAMPLE = 1.1


def default_batch_size(total_memory_bytes: int) -> int:
    """A multiple of 8 that needs ~60% of the GPU's memory by GIB_PER_SAMPLE (room for the allocator's slack)."""
    return max(8, int(0.6 * total_memory_bytes / 2**30 / GIB_PER_SAMPLE) // 8 * 8)


def _free_gpu_memory() -> None:
    """Between arms: the previous arm's model, optimizer and cached blocks must not count against the next."""
    torch._dynamo.reset()  # compiled graphs hold their model; a no-op without --compile
    gc.collect()  # the Accelerator, model and optimizer of an in-process `train` live in reference cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run(quick: bool = False, compile: bool = False, batch_size: int | None = None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench --gpu needs a CUDA GPU; none is visible (torch.cuda.is_available() is False).")
    peak = matmul_flops_per_s(size=8192, repeats=5, device="cuda", dtype=torch.bfloat16)
    batch_size = batch_size or default_batch_size(torch.cuda.get_device_properties(0).total_memory)
    steps, window, pairs = (12, 4, 1) if quick else (40, 10, 2)
    w = WORKLOADS[WORKLOAD]
    flops_per_step = train_flops_per_sample(WORKLOAD) * batch_size
    print(
        f"GPU {torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s; {WORKLOAD} at batch {batch_size} x {w.context} tokens",
        flush=True,
    )
    windows = {"seed": [], "dist_train": []}
    peak_memory = {"seed": 0.0, "dist_train": 0.0}
    ratios = []
    for pair in range(pairs):
        medians = {}
        for arm in ("seed", "dist_train") if pair % 2 == 0 else ("dist_train", "seed"):
            run_arm = arms.seed_loop if arm == "seed" else arms.dist_train_loop
            _free_gpu_memory()
            try:
                times = run_arm(WORKLOAD, steps, window, device="cuda", bf16=True, compile=compile, batch_size=batch_size)
            except torch.cuda.OutOfMemoryError:
                raise SystemExit(
                    f"python -m bench --gpu: the {arm} arm ran out of GPU memory at batch {batch_size}; "
                    f"rerun with a smaller --gpu-batch (e.g. {max(1, batch_size // 2)})."
                ) from None
            windows[arm] += times
            medians[arm] = statistics.median(times)
            peak_memory[arm] = max(peak_memory[arm], torch.cuda.max_memory_allocated() / 2**30)
        ratios.append(medians["seed"] / medians["dist_train"])
        print(
            f"  {WORKLOAD} pair {pair + 1}/{pairs}: seed {medians['seed'] * 1e3:.1f} ms, dist_train {medians['dist_train'] * 1e3:.1f} ms",
            flush=True,
        )
    report = {
        "mode": "gpu-quick" if quick else "gpu",
        "compile": compile,
        "machine": machine(),
        "bf16_matmul_flops_per_s": peak,
        "workload": WORKLOAD,
        "batch_size": batch_size,
        "context": w.context,
        "steps_per_run": steps,
        "window_steps": window,
        "pairs": pairs,
        "arms": {},
        "ratio": spread(ratios),
    }
    for arm, times in windows.items():
        step_s = statistics.median(times)
        report["arms"][arm] = {
            "step_ms": spread([t * 1e3 for t in times]),
            "tokens_per_s": batch_size * w.context / step_s,
            "mfu": flops_per_step / step_s / peak,
            "peak_memory_gb": peak_memory[arm],
        }
    return report


def format_table(report: dict) -> str:
    lines = [
        f"GPU: {report['machine'].get('gpu')}, bf16 matmul {report['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (measured); "
        f"{report['workload']}, batch {report['batch_size']} x {report['context']} tokens, compile {report['compile']}",
        f"{'arm':<11} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}",
    ]
    for arm, a in report["arms"].items():
        lines.append(f"{arm:<11} {a['step_ms']['median']:9.1f} {a['tokens_per_s']:10.0f} {a['mfu']:6.1%} {a['peak_memory_gb']:9.1f}")
    q = report["ratio"]
    lines.append(f"ratio dist_train/seed throughput {q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}] over {q['n']} pairs")
    return "\n".join(lines)
