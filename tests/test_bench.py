"""The benchmark runs end to end and its outputs are well formed (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO


def _bench(*args: str, timeout: float = 240, module: str = "bench") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_smoke_run_writes_a_table_and_a_json_report(tmp_path):
    path = tmp_path / "report.json"
    result = _bench("--smoke", "--json", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(path.read_text())
    assert report["mode"] == "smoke" and report["threads"] == 1
    assert report["matmul_flops_per_s"] > 0 and report["machine"]["torch"] == torch.__version__
    assert [w["workload"] for w in report["workloads"]] == ["tiny_mlp", "mlp", "gpt"]
    for workload in report["workloads"]:
        assert set(workload["arms"]) == {"seed", "dist_train"}
        for arm in workload["arms"].values():
            step = arm["step_ms"]
            assert 0 < step["min"] <= step["median"] <= step["max"] and step["n"] >= 1
            assert arm["samples_per_s"] > 0 and arm["flops_per_s"] > 0 and arm["fraction_of_matmul_rate"] > 0
            assert ("tokens_per_s" in arm) == (workload["workload"] == "gpt")
        assert workload["ratio"]["median"] > 0 and workload["ratio"]["n"] == workload["pairs"]
        assert workload["ratio_of_best_windows"] > 0
    data = report["data_path"]
    assert data["default_samples_per_s"] > 0 and data["dist_train_samples_per_s"] > 0
    assert data["speedup"] == pytest.approx(data["dist_train_samples_per_s"] / data["default_samples_per_s"])
    scaling = report["scaling"]
    assert scaling["one_process_samples_per_s"] > 0 and scaling["two_process_samples_per_s"] > 0
    assert scaling["allreduce_ms"] > 0 and scaling["gradient_mb"] > 0 and scaling["concurrent_step_ms"] > 0
    assert scaling["solo_step_ms"] > 0 and scaling["concurrent_step_with_check_ms"] > 0 and "unexplained_ms" in scaling
    assert scaling["preemption_call_ms"] > 0 and scaling["preemption_check_one_process_us"] > 0 and "preemption_check_ms" in scaling

    table = result.stdout
    for name in ("tiny_mlp", "mlp", "gpt"):
        assert f"{name:<10} ratio       dist_train/seed throughput" in table
        assert f"{name:<10} dist_train" in table and f"{name:<10} seed" in table
    assert "data path" in table and "scaling" in table and "where the 2-process step goes" in table
    assert f"JSON report: {path}" in table


def test_both_arms_train_the_same_weights(monkeypatch):
    """The A/B compares two ways of running one training: same init, samples, order and AdamW settings."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import arms

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed, dist_train = {}, {}
        seed_windows = arms.seed_loop("tiny_mlp", steps=6, window=1, record=seed)
        dist_train_windows = arms.dist_train_loop("tiny_mlp", steps=6, window=1, record=dist_train)
    finally:
        torch.set_num_threads(threads)
    assert len(seed_windows) == len(dist_train_windows) == 5  # the first window is not timed
    assert seed["losses"] == pytest.approx(dist_train["losses"], rel=1e-5)
    assert seed["state_dict"].keys() == dist_train["state_dict"].keys()
    for name, weight in seed["state_dict"].items():
        # Fused and per-tensor AdamW round differently (~3e-8 here); a weight decay of 0.01 in one arm
        # and 0.0 in the other moves the weights by ~1e-5 in 6 steps.
        torch.testing.assert_close(dist_train["state_dict"][name], weight, rtol=0, atol=1e-6)


def test_gpu_default_batch_fills_about_60_percent_of_memory(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from bench.gpu import default_batch_size

    assert default_batch_size(79 * 2**30) == 40  # A100/H100 80 GB: ~44 GiB by bench.gpu.GIB_PER_SAMPLE
    assert default_batch_size(140 * 2**30) == 72  # H200
    assert default_batch_size(16 * 2**30) == 8  # never below 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_gpu_mode_without_a_gpu_says_so(tmp_path):
    result = _bench("--gpu", "--json", str(tmp_path / "gpu.json"), timeout=60)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_gpu_check_without_a_gpu_says_so():
    """bench/gpu_check.py is for a GPU machine; here it says so and exits 2 (its checks are imported, so they parse)."""
    result = _bench(timeout=60, module="bench.gpu_check")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stdout


def test_shard_hashing_benchmark_runs(tmp_path):
    """Per-rank hashing against the main process hashing everything (bench/RESULTS.md); no timing asserted."""
    result = _bench("--mib", "4", "--ranks", "1", "2", "--repeats", "1", "--dir", str(tmp_path), module="bench.shard_hashing")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hash: main" in result.stdout and len(result.stdout.strip().splitlines()) == 4


def test_async_checkpoint_benchmark_runs(tmp_path):
    """The stall benchmark (bench/RESULTS.md) end to end on a small model; no timing is asserted."""
    result = _bench("--mib", "4", "--saves", "2", "--steps", "4", "--dir", str(tmp_path), module="bench.async_checkpoint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "async_checkpoint, stall per checkpoint" in result.stdout and "hang watchdog: median step" in result.stdout


def test_fsdp_async_checkpoint_benchmark_runs(tmp_path):
    """The FSDP2 stall benchmark (bench/RESULTS.md) end to end: 2 gloo processes, a small model; no timing asserted."""
    args = ("--mib", "4", "--saves", "2", "--steps", "4", "--pairs", "1", "--dir", str(tmp_path))
    result = _bench(*args, module="bench.fsdp_async_checkpoint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FSDP2, 2 gloo processes on CPU" in result.stdout and "async = " in result.stdout
    assert "every stall (s, the slower rank's): synchronous 0." in result.stdout


def test_streaming_benchmark_runs():
    """dist_train against the hand-written loop over the same IterableDataset (bench/RESULTS.md); no timing asserted."""
    result = _bench("--steps", "6", "--window", "2", "--pairs", "1", "--stateful", module="bench.streaming")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "throughput dist_train / seed:" in result.stdout and "stream position: state_dict copy" in result.stdout


def test_evaluation_benchmark_runs_and_both_arms_agree(tmp_path):
    """`dist-train evaluate`/`predict` against a hand-written no_grad loop (bench/RESULTS.md); no timing asserted."""
    path = tmp_path / "report.json"
    result = _bench("--smoke", "--json", str(path), module="bench.evaluation")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report["same_result"] is True  # the same loss and accuracy from both arms
    for name in ("evaluate", "predict"):
        for clock in ("wall", "cpu"):
            assert report[name][clock]["hand_samples_per_s"] > 0 and report[name][clock]["dist_train_samples_per_s"] > 0
            assert f"{name:<9} {clock:<4} hand" in result.stdout
