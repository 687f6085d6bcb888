"""The core promise: the seed's loop runs unchanged on 1 and N processes, and N ranks ≡ 1 rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (
    assert_weights_equal,
    import_file,
    load_weights,
    read_metrics,
    run_cli,
    seed_project_args,
    val_records,
    write_seed_project,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_seed_project(tmp_path_factory.mktemp("seed"), num_train=256, num_val=101)


def _user_model_keys(project: Path) -> list[str]:
    module = import_file(project / "model.py", "user_model")
    return sorted(module.MyModel().state_dict())


def test_default_task_reaches_its_accuracy(tmp_path):
    result = run_cli([f"output_dir={tmp_path / 'digits'}", "progress=false"])
    final = val_records(tmp_path / "digits")[-1]
    assert final["val_accuracy"] >= 0.95, final
    assert final["val_samples"] == 359 and final["num_processes"] == 1
    assert "outputs in" in result.stdout
    assert (tmp_path / "digits" / "config.yaml").exists()


# One run per world size at the same global batch of 16, shared by the tests below.
COMMON = ("epochs=2", "optimizer=sgd", "lr=0.1", "momentum=0.9", "seed=3")


@pytest.fixture(scope="module")
def one(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run_cli(seed_project_args(project, out, "batch_size=16", *COMMON), nproc=1)
    return out


@pytest.fixture(scope="module")
def two(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    run_cli(seed_project_args(project, out, "batch_size=8", *COMMON), nproc=2)
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_seed_layout_trains_through_the_cli(project, request, nproc):
    out = request.getfixturevalue({1: "one", 2: "two"}[nproc])  # batch 16 on 1 process, 8 per process on 2
    records = val_records(out)
    assert [r["epoch"] for r in records] == [0, 1]
    steps_per_epoch = 256 // 16
    assert [r["step"] for r in records] == [steps_per_epoch, 2 * steps_per_epoch]
    for record in records:
        assert record["val_samples"] == 101
        assert record["num_processes"] == nproc  # never N lone trainings
        assert {"train_loss", "val_loss", "val_accuracy"} <= record.keys()
    assert sorted(load_weights(out)) == _user_model_keys(project)  # unwrapped: no module. prefixes
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] == 16 // nproc and saved["data_args"] == {"data_path": str(project / "data.pt")}


def test_two_ranks_match_one_rank_at_the_same_global_batch(project, one, two):
    """2 gloo processes x batch 8 ≡ 1 process x batch 16: same sample order, same parameters."""
    one_out, two_out = one, two
    one, two = load_weights(one_out), load_weights(two_out)
    initial = load_weights_of_untrained(project)
    assert any(not torch.equal(one[k], initial[k]) for k in one), "training changed nothing"
    assert_weights_equal(two, one, exact=False)
    assert [r["step"] for r in val_records(one_out)] == [r["step"] for r in val_records(two_out)]


def load_weights_of_untrained(project: Path) -> dict:
    module = import_file(project / "model.py", "user_model_init")
    torch.manual_seed(3)
    return module.MyModel().state_dict()


def test_gathered_val_loss_is_the_exact_mean(project, one, two):
    """101 validation samples over 2 ranks x batch 8 (padded by Accelerate), and on one process: each run's last
    validation is the mean over all 101 samples computed here, in one pass, from that run's final weights (the ones
    it validated: the last validation is at the last step)."""
    data = torch.load(project / "data.pt", weights_only=True)
    module = import_file(project / "model.py", "user_model_ref")
    for out, nproc in ((one, 1), (two, 2)):
        last = val_records(out)[-1]
        assert last["val_samples"] == 101 and last["num_processes"] == nproc
        assert last["step"] == max(r["step"] for r in read_metrics(out))
        model = module.MyModel()
        model.load_state_dict(load_weights(out))
        with torch.no_grad():
            logits = model(data["val_x"])
        reference = torch.nn.functional.cross_entropy(logits, data["val_y"]).item()
        assert abs(last["val_loss"] - reference) <= 1e-6 * reference, nproc
        assert last["val_accuracy"] == pytest.approx((logits.argmax(dim=1) == data["val_y"]).sum().item() / 101, abs=1e-12), nproc


SEQUENCE_PROJECT = '''
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

class TokenTagger(nn.Module):
    """Per-token logits (batch, tokens, classes), as a language model returns them."""

    def __init__(self, vocab=12, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, ids):
        return self.head(self.embed(ids))

def get_dataset(cfg, train):
    g = torch.Generator().manual_seed(0 if train else 1)
    ids = torch.randint(0, 12, (32 if train else 10, 3), generator=g)
    return TensorDataset(ids, ids % 3)
'''


@pytest.mark.parametrize("nproc", [1, 2])
def test_per_token_loss_is_averaged_per_sample_exactly(tmp_path, nproc):
    """10 validation sequences of 3 tokens, batch 4: every sample counted once, each its tokens' mean."""
    (tmp_path / "seq.py").write_text(SEQUENCE_PROJECT)
    out = tmp_path / "run"
    run_cli(
        [
            f"model={tmp_path / 'seq.py'}:TokenTagger",
            f"data={tmp_path / 'seq.py'}:get_dataset",
            "epochs=1",
            "batch_size=4",
            f"output_dir={out}",
            "progress=false",
            "plot=false",
            "resume=never",
        ],
        nproc=nproc,
    )
    final = val_records(out)[-1]
    assert final["val_samples"] == 10
    module = import_file(tmp_path / "seq.py", "seq_ref")
    model = module.TokenTagger()
    model.load_state_dict(load_weights(out))
    ids, tags = module.get_dataset(None, train=False).tensors
    with torch.no_grad():
        logits = model(ids)
        reference = torch.nn.functional.cross_entropy(logits.movedim(-1, 1), tags).item()  # equal tokens per sample
        accuracy = (logits.argmax(-1) == tags).float().mean().item()
    assert abs(final["val_loss"] - reference) <= 1e-6 * reference
    assert abs(final["val_accuracy"] - accuracy) <= 1e-6  # float32 per-sample fractions (k/3)


def test_two_projects_in_one_process_each_import_their_own_siblings(tmp_path):
    """`train` twice in one process (a notebook, a sweep) on two projects whose files share names: the
    second project's `from dataset import ...` must get its own dataset.py, not the first one's cached."""
    from dist_train.plugins import resolve

    for value in (1, 2):
        folder = tmp_path / f"project{value}"
        folder.mkdir()
        (folder / "dataset.py").write_text(f"VALUE = {value}\n")
        (folder / "dataloader.py").write_text("from dataset import VALUE\n\ndef get_value():\n    return VALUE\n")
    assert resolve(f"{tmp_path / 'project1' / 'dataloader.py'}:get_value", "data")() == 1
    assert resolve(f"{tmp_path / 'project2' / 'dataloader.py'}:get_value", "data")() == 2
    assert resolve(f"{tmp_path / 'project1' / 'dataloader.py'}:get_value", "data")() == 1  # cached by path: unchanged
    # A user file named like an installed module does not evict that module from this process.
    import json

    (tmp_path / "project2" / "json.py").write_text("")
    resolve(f"{tmp_path / 'project2' / 'dataloader.py'}:get_value", "data")
    assert sys.modules["json"] is json
