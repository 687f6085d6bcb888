"""The benchmark runs end to end and its outputs are well formed (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


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
    assert scaling["solo_step_ms"] > 0 and "unexplained_ms" in scaling

    table = result.stdout
    for name in ("tiny_mlp", "mlp", "gpt"):
        assert f"{name:<10} ratio       dist_train/seed throughput" in table
        assert f"{name:<10} dist_train" in table and f"{name:<10} seed" in table
    assert "data path" in table and "scaling" in table and "where the 2-process step goes" in table
    assert f"JSON report: {path}" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_gpu_mode_without_a_gpu_says_so(tmp_path):
    result = _bench("--gpu", "--json", str(tmp_path / "gpu.json"), timeout=60)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "gpu.json").exists()
