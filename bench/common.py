"""Measurements both benchmark modes share: the matmul rate, a spread summary, the machine."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def matmul_flops_per_s(size: int = 1024, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """This machine's dense matmul rate (best of `repeats`) at the current thread count: MFU's denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": torch.multiprocessing.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        model_names = [
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        info["cpu"] = model_names[0] if model_names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
