"""How well the hardware is used: FLOPs per sample, achieved TFLOP/s, MFU, memory, the time spent waiting for data.

FLOPs are counted once, on the first micro-batch this process trains, by wrapping its forward, loss
and backward in torch's `FlopCounterMode` (a dispatch mode that only counts: the numbers, the RNG and
BatchNorm's statistics are those of an uncounted step, so exactness is untouched). Counting one real
step rather than a dry run on a copy costs no memory and needs no sample input. The count is what the
matmul-like operators do (mm, conv, attention), the convention of MFU. Under `torch.compile` the
compiled graph hides its operators from the mode, so only a given `flops_per_sample` is used there.

MFU is the achieved FLOP/s per device over the device's dense peak at the run's precision. The peaks
are a table of data-sheet values that the user can override (`peak_tflops`); a device or precision
not in it gets no MFU, never a guess: a neighbour's peak is how a trainer reports 152% MFU. CPUs have
no MFU (their peak depends on the SKU, clock and vector units in use).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..data import batch_size_of

# Dense (no sparsity) tensor-core peaks in TFLOP/s per device at bf16/fp16, from NVIDIA's data sheets.
# Patterns are matched against `torch.cuda.get_device_name()` in order, most specific first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH200\b", {"bf16": 989.4, "fp16": 989.4}),
    (r"\bH100 NVL\b", {"bf16": 835.0, "fp16": 835.0}),
    (r"\bH100 PCIe\b", {"bf16": 756.0, "fp16": 756.0}),
    (r"\bH100 (SXM|80GB HBM3)", {"bf16": 989.4, "fp16": 989.4}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0}),
    (r"\bL40S\b", {"bf16": 362.05, "fp16": 362.05}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0}),
    (r"\bV100\b", {"fp16": 125.0}),
)


def _cpu_attention(query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's table counts the GPU attention kernels but not the CPU one `scaled_dot_product_attention` runs
# here (checked with torch 2.13), which would leave attention out of a CPU count; the same formulas apply.
_CPU_ATTENTION = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward),
    )
    if hasattr(torch.ops.aten, name)
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak for this device and precision (`bf16`, `fp16`, `no`); None when unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(precision)
    return None


class Throughput:
    """The hardware fields of a log record. The loop wraps each micro-batch in `count(batch_size)`; only
    the first is counted. `fields(samples, seconds, world)` turns an interval into the record's figures."""

    def __init__(self, device: torch.device, precision: str, flops_per_sample: float | None, peak: float | None, compiled: bool):
        self.device = device
        self.flops_per_sample = flops_per_sample
        self._to_count = flops_per_sample is None and not compiled
        if peak is None and device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(device), precision)
        self.peak_tflops = peak  # per device

    @contextlib.contextmanager
    def count(self, inputs):
        """Count the forward and backward of the micro-batch `inputs` once (the first one); a no-op afterwards."""
        if not self._to_count:
            yield
            return
        self._to_count = False
        counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
        with counter:
            yield
        batch_size = batch_size_of(inputs, None)
        if batch_size:
            self.flops_per_sample = counter.get_total_flops() / batch_size

    def fields(self, samples: int, seconds: float, world: int) -> dict:
        """TFLOP/s (global and per device) and MFU over an interval of `samples` trained by all `world` ranks."""
        if not self.flops_per_sample or seconds <= 0:
            return {}
        global_tflops = self.flops_per_sample * samples / seconds / 1e12
        record = {
            "flops_per_sample": self.flops_per_sample,
            "tflops_per_s": global_tflops,
            "tflops_per_s_per_device": global_tflops / world,
        }
        if self.peak_tflops:
            record["mfu"] = global_tflops / world / self.peak_tflops
        return record


def memory_fields(device: torch.device) -> dict:
    """Peak memory of this process: CUDA's allocated and reserved on a GPU, the resident set size on a CPU."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}  # Linux reports KiB
