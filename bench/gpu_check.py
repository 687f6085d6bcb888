"""`python -m bench.gpu_check`: the GPU-only paths nobody has seen run, in minutes, as one table.

Each check is a real CLI run (the built-in digits task, or a tiny project written here) on the GPUs of
this machine, checked against a reference, not only for its exit status:

- fp16: `mixed_precision: fp16` trains (its loss scaler; skipped steps are counted, `overflow_skipped`).
- bf16: `mixed_precision: bf16` trains, and matches the fp32 run's final accuracy to 0.05.
- ddp: `multi_gpu.yaml` on every GPU (NCCL); the run's `num_processes` is the GPU count.
- fsdp2: `fsdp.yaml` (FSDP2, bf16) on every GPU, stopped at step 20 then resumed to 40 ≡ the straight run
  (bitwise), and `export` of its sharded checkpoint equal to its final `model.safetensors`.
- async: `async_checkpoint: true` (pinned-memory snapshots) ≡ the synchronous run, bitwise.
- flight recorder: 2 ranks, rank 1 asleep in its forward; after `hang_timeout_s` NCCL's flight recorder
  dumps into `output_dir/diagnostics/` (needs 2 GPUs; said and skipped with one).
- mfu: `bench.gpu.run(quick=True)`, the 124M GPT's MFU for the seed loop and dist_train.

Not yet run on a GPU (bench/RESULTS.md says when it is). `--out DIR` keeps the runs (default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch_configs"

SLEEPY_MODEL = textwrap.dedent("""
    import os, time
    import torch.nn as nn

    class Sleepy(nn.Module):
        '''The digits MLP; rank 1 sleeps in its 5th training forward, so rank 0 waits in a collective.'''

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if os.environ.get("RANK") == "1" and self.calls == 5:
                    time.sleep(600)
            return self.net(x)
""")


def _train(out: Path, *overrides: str, config: str | None = None, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    launch = (
        []
        if config is None
        else ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), "--num_processes", str(nproc)]
    )
    command = [sys.executable, *launch, "-m", "dist_train", "train", f"output_dir={out}", "progress=false", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def _last_val(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ok(result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {(result.stderr.strip().splitlines() or [''])[-1][:200]}")


def check_fp16(root: Path, gpus: int) -> str:
    _ok(_train(root / "fp16", "mixed_precision=fp16", "max_steps=60"))
    last = _last_val(root / "fp16")
    return f"val_accuracy {last['val_accuracy']:.3f}, overflow_skipped {last.get('overflow_skipped', 0)}"


def check_bf16(root: Path, gpus: int) -> str:
    _ok(_train(root / "bf16", "mixed_precision=bf16", "max_steps=60"))
    _ok(_train(root / "fp32", "max_steps=60"))
    bf16, fp32 = _last_val(root / "bf16")["val_accuracy"], _last_val(root / "fp32")["val_accuracy"]
    assert abs(bf16 - fp32) <= 0.05, (bf16, fp32)
    return f"val_accuracy bf16 {bf16:.3f} vs fp32 {fp32:.3f}"


def check_ddp(root: Path, gpus: int) -> str:
    _ok(_train(root / "ddp", "max_steps=60", config="multi_gpu.yaml", nproc=gpus))
    last = _last_val(root / "ddp")
    assert last["num_processes"] == gpus, last
    return f"{gpus} GPU(s), val_accuracy {last['val_accuracy']:.3f}"


def check_fsdp2(root: Path, gpus: int) -> str:
    common = ("mixed_precision=bf16", "checkpoint_every=10", "keep_last=null")
    _ok(_train(root / "fsdp_straight", *common, "max_steps=40", config="fsdp.yaml", nproc=gpus))
    _ok(_train(root / "fsdp_resumed", *common, "max_steps=20", config="fsdp.yaml", nproc=gpus))
    _ok(_train(root / "fsdp_resumed", *common, "max_steps=40", "resume=auto", config="fsdp.yaml", nproc=gpus))
    straight = _weights(root / "fsdp_straight" / "model.safetensors")
    assert _same(_weights(root / "fsdp_resumed" / "model.safetensors"), straight), "resumed FSDP2 run differs"
    checkpoint = root / "fsdp_straight" / "checkpoints" / "step_00000040"
    assert (checkpoint / "pytorch_model_fsdp_0" / "__0_0.distcp").is_file(), "no sharded checkpoint"
    subprocess.run(
        [sys.executable, "-m", "dist_train", "export", str(checkpoint), "--out", str(root / "fsdp_export")], check=True, cwd=REPO
    )
    assert _same(_weights(root / "fsdp_export" / "model.safetensors"), straight), "export differs from the final weights"
    return f"{gpus} GPU(s): resume bitwise, export = final weights"


def check_async(root: Path, gpus: int) -> str:
    common = ("checkpoint_every=5", "max_steps=40")
    _ok(_train(root / "sync", *common))
    start = time.perf_counter()
    _ok(_train(root / "async", *common, "async_checkpoint=true"))
    assert _same(_weights(root / "async" / "model.safetensors"), _weights(root / "sync" / "model.safetensors"))
    return f"= sync run bitwise ({time.perf_counter() - start:.1f} s)"


def check_flight_recorder(root: Path, gpus: int) -> str:
    if gpus < 2:
        return "skipped: needs 2 GPUs (NCCL refuses two ranks on one GPU)"
    (root / "sleepy").mkdir(exist_ok=True)
    (root / "sleepy" / "sleepy.py").write_text(SLEEPY_MODEL)
    result = _train(
        root / "hang", f"model={root / 'sleepy' / 'sleepy.py'}:Sleepy", "hang_timeout_s=30", config="multi_gpu.yaml", nproc=2, timeout=300
    )
    assert result.returncode != 0, "the hang was not detected"
    dumps = sorted((root / "hang" / "diagnostics").glob("nccl_trace_rank_*"))
    assert dumps, f"no flight-recorder dump in {root / 'hang' / 'diagnostics'}"
    return f"{len(dumps)} dump(s), {sum(p.stat().st_size for p in dumps)} bytes"


def check_mfu(root: Path, gpus: int) -> str:
    from . import gpu

    report = gpu.run(quick=True)
    arms = report["arms"]
    return f"MFU seed {arms['seed']['mfu']:.1%}, dist_train {arms['dist_train']['mfu']:.1%} (batch {report['batch_size']})"


CHECKS = {
    "fp16": check_fp16,
    "bf16": check_bf16,
    "ddp": check_ddp,
    "fsdp2": check_fsdp2,
    "async": check_async,
    "flight recorder": check_flight_recorder,
    "mfu": check_mfu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m bench.gpu_check needs a CUDA GPU; none is visible (torch.cuda.is_available() is False).")
        return 2
    gpus = torch.cuda.device_count()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        root.mkdir(parents=True, exist_ok=True)
        for name in args.only or CHECKS:
            start = time.perf_counter()
            try:
                status, detail = "ok", CHECKS[name](root, gpus)
            except Exception as exc:  # a check's failure is a row of the table, the others still run
                status, detail, failed = "FAIL", f"{type(exc).__name__}: {exc}"[:160], failed + 1
            rows.append((name, status, f"{time.perf_counter() - start:.0f}", detail))
            print(f"{name}: {status} ({rows[-1][2]} s) {detail}", flush=True)
    print(f"\n{torch.cuda.get_device_name()} x {gpus}, torch {torch.__version__}")
    print(f"{'check':<16} {'status':<6} {'s':>5}  detail")
    for name, status, seconds, detail in rows:
        print(f"{name:<16} {status:<6} {seconds:>5}  {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
