"""The hardware figures of every log record: FLOPs counted against the analytic count, MFU only where the
peak is known, tokens without padding, and the same figures per device and globally on N ranks."""

from __future__ import annotations

import pytest
import torch

from bench.workloads import WORKLOADS, build_model, lm_loss, make_tensors, train_flops_per_sample
from dist_train.components.throughput import Throughput, peak_tflops
from dist_train.data.batches import real_tokens
from helpers import read_metrics, run_cli, seed_project_args, train_in_process, write_seed_project


def counted_flops_per_sample(model, inputs, loss) -> float:
    meter = Throughput(torch.device("cpu"), "no", flops_per_sample=None, peak=None, compiled=False)
    with meter.count(inputs):
        loss(model(inputs)).backward()
    return meter.flops_per_sample


def test_the_gpt_flop_count_matches_its_analytic_count():
    """6 x weights x tokens plus attention's QK^T and AV (bench/workloads.py), within 2%."""
    torch.manual_seed(0)
    model = build_model("gpt")
    inputs, targets = make_tensors("gpt", 2)
    counted = counted_flops_per_sample(model, inputs, lambda logits: lm_loss(logits, targets).mean())
    analytic = train_flops_per_sample("gpt")
    print(f"\ngpt {WORKLOADS['gpt']}: counted {counted:.4g} FLOPs/sample, analytic {analytic:.4g} ({counted / analytic - 1:+.2%})")
    assert counted == pytest.approx(analytic, rel=0.02)


def test_the_mlp_count_is_exact():
    """A 16-32-4 MLP: forward 2M, weight gradients 2M, input gradients 2(M - M1) (the input needs none)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    macs, first = 16 * 32 + 32 * 4, 16 * 32
    assert counted_flops_per_sample(model, torch.randn(8, 16), lambda out: out.square().mean()) == 6 * macs - 2 * first


def test_only_the_first_micro_batch_is_counted_and_a_given_value_wins():
    meter = Throughput(torch.device("cpu"), "no", flops_per_sample=None, peak=None, compiled=False)
    model = torch.nn.Linear(4, 4)
    with meter.count(torch.randn(2, 4)):
        model(torch.randn(2, 4)).sum().backward()
    with meter.count(torch.randn(2, 4)):  # a second, larger step must not change the figure
        model(torch.randn(2, 64, 4)).sum().backward()
    assert meter.flops_per_sample == 6 * 16 - 2 * 16
    given = Throughput(torch.device("cpu"), "no", flops_per_sample=123.0, peak=None, compiled=False)
    with given.count(torch.randn(2, 4)):
        model(torch.randn(2, 4)).sum().backward()
    assert given.flops_per_sample == 123.0
    compiled = Throughput(torch.device("cpu"), "no", flops_per_sample=None, peak=None, compiled=True)
    with compiled.count(torch.randn(2, 4)):
        model(torch.randn(2, 4)).sum().backward()
    assert compiled.fields(100, 1.0, 1) == {}  # no count under compile: no figure rather than a wrong one


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA L40S", "bf16", 362.05),  # not the L4's 121, whose name it contains
        ("NVIDIA L4", "bf16", 121.0),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 on a V100
        ("NVIDIA H100 80GB HBM3", "no", None),  # fp32: no entry, no MFU
        ("NVIDIA GeForce RTX 4090", "bf16", None),  # unknown: no MFU, never a neighbour's peak
    ],
)
def test_the_peak_table_never_guesses(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_tokens_leave_out_padding():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    assert int(real_tokens({"input_ids": ids, "attention_mask": mask})) == 5
    assert real_tokens({"input_ids": ids}) == 8
    assert real_tokens(ids) == 8
    assert real_tokens(torch.randn(2, 4)) is None


def test_log_records_carry_flops_and_mfu_only_with_a_peak(tmp_path):
    project = write_seed_project(tmp_path / "project")
    macs, first = 16 * 32 + 32 * 4, 16 * 32
    train_in_process(seed_project_args(project, tmp_path / "plain", "epochs=1", "batch_size=16", "log_every=4"))
    train_in_process(seed_project_args(project, tmp_path / "peak", "epochs=1", "batch_size=16", "log_every=4", "peak_tflops=1e-6"))
    plain = [r for r in read_metrics(tmp_path / "plain") if "lr" in r]
    peak = [r for r in read_metrics(tmp_path / "peak") if "lr" in r]
    assert plain and peak
    for r in plain:
        assert r["flops_per_sample"] == 6 * macs - 2 * first
        assert r["tflops_per_s"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12, rel=1e-9)
        assert "mfu" not in r  # a CPU has no table entry
        assert 0 <= r["data_wait_share"] <= 1 and r["peak_memory_mb"] > 0
    for r in peak:
        assert r["mfu"] == pytest.approx(r["tflops_per_s_per_device"] / 1e-6, rel=1e-9)


def test_two_ranks_with_accumulation_report_per_device_and_global_figures(tmp_path):
    project = write_seed_project(tmp_path / "project")
    out = tmp_path / "two"
    run_cli(seed_project_args(project, out, "epochs=1", "batch_size=8", "grad_accum_steps=2", "log_every=2"), nproc=2)
    records = [r for r in read_metrics(out) if "lr" in r]
    assert records
    for r in records:
        assert r["flops_per_sample"] == 6 * (16 * 32 + 32 * 4) - 2 * 16 * 32  # per sample: the same on any world size
        assert r["samples_per_s"] == pytest.approx(2 * r["samples_per_s_per_device"], rel=1e-9)
        assert r["tflops_per_s"] == pytest.approx(2 * r["tflops_per_s_per_device"], rel=1e-9)
        assert r["tflops_per_s"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12, rel=1e-9)
        # 2 steps x 2 micro-batches x 8 samples x 2 ranks per record, over the interval's time
        assert r["samples_per_s"] * r["step_time_s"] * 2 == pytest.approx(2 * 2 * 8 * 2, rel=1e-6)


PADDED_PROJECT = """
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

LENGTHS = [3, 8, 5, 1, 8, 2, 7, 4] * 6  # real tokens of each of 48 samples, padded to 8


class Padded(Dataset):
    def __len__(self):
        return len(LENGTHS)

    def __getitem__(self, i):
        ids = torch.zeros(8, dtype=torch.long)
        ids[: LENGTHS[i]] = torch.arange(1, LENGTHS[i] + 1)
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor(i % 3)}


class BagModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(16, 8, mode="sum")
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, per_sample_weights=attention_mask.float()))


def get_dataloader(cfg, train):
    return DataLoader(Padded(), batch_size=cfg.batch_size, shuffle=train)
"""


def test_tokens_per_second_leave_out_the_padding_of_a_padded_batch(tmp_path):
    """48 padded samples of 8 token slots, 4.75 real tokens each on average: one record per epoch (all of it)."""
    (tmp_path / "padded.py").write_text(PADDED_PROJECT)
    spec = tmp_path / "padded.py"
    train_in_process(
        [
            f"model={spec}:BagModel",
            f"data={spec}:get_dataloader",
            "batch_size=6",
            "epochs=1",
            "log_every=8",
            f"output_dir={tmp_path / 'out'}",
            "progress=false",
            "plot=false",
        ]
    )
    (record,) = [r for r in read_metrics(tmp_path / "out") if "lr" in r]
    assert record["tokens_per_s"] / record["samples_per_s"] == pytest.approx(sum([3, 8, 5, 1, 8, 2, 7, 4]) / 8, rel=1e-9)
