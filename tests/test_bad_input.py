"""Every user mistake: exit status 2 and one line naming the culprit and the fix, never a traceback."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from dist_train.cli import main
from helpers import run_cli, seed_project_args, write_seed_project


def _run(capsys, *args: str) -> str:
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dist-train: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_seed_project(tmp_path_factory.mktemp("seed"), num_train=32, num_val=8)


def _args(project: Path, tmp_path: Path, *extra: str) -> list[str]:
    return seed_project_args(project, tmp_path / "out", "epochs=1", *extra)


def test_missing_file_module_attribute(capsys, project, tmp_path):
    err = _run(capsys, *_args(project, tmp_path, "model=nowhere/model.py:MyModel"))
    assert "model: file 'nowhere/model.py' in 'nowhere/model.py:MyModel' does not exist" in err
    err = _run(capsys, *_args(project, tmp_path, "model=no_such_pkg.models:MyModel"))
    assert "model: module 'no_such_pkg.models' in 'no_such_pkg.models:MyModel' cannot be found" in err
    err = _run(capsys, *_args(project, tmp_path, f"model={project / 'model.py'}:YourModel"))
    assert "has no attribute 'YourModel' (it has: MyModel" in err
    err = _run(capsys, *_args(project, tmp_path, "data=dist_train.examples.digits"))
    assert "data: 'dist_train.examples.digits' is not an import string" in err


def test_model_factory_must_return_a_module(capsys, project, tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text("def make(**kwargs):\n    return {'not': 'a model'}\n")
    err = _run(capsys, *_args(project, tmp_path, f"model={factory}:make"))
    assert f"model: '{factory}:make' returned a dict, not a torch.nn.Module" in err
    err = _run(capsys, *_args(project, tmp_path, "model_args={depth: 3}"))
    assert "model: '" in err and "cannot take model_args {'depth': 3}: got an unexpected keyword argument 'depth'. Fix model_args." in err
    # A TypeError raised inside the user's own code is theirs: not blamed on model_args.
    buggy = tmp_path / "buggy.py"
    buggy.write_text("import torch.nn as nn\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n        len(3)\n")
    with pytest.raises(TypeError, match="has no len"):
        main(["train", *_args(project, tmp_path, f"model={buggy}:M")])


def test_loader_must_yield_inputs_and_targets(capsys, project, tmp_path):
    data = tmp_path / "bad_data.py"
    data.write_text(
        textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader

        def get_dataloader(cfg, train):
            return DataLoader([torch.zeros(16) for _ in range(8)], batch_size=cfg.batch_size)

        def not_a_loader(cfg, train):
            return 42

        def empty(cfg, train):
            return DataLoader([], batch_size=4)
    """)
    )
    err = _run(capsys, *_args(project, tmp_path, f"data={data}:get_dataloader"))
    assert "yielded a Tensor; each batch must be (inputs, targets)" in err
    err = _run(capsys, *_args(project, tmp_path, f"data={data}:not_a_loader"))
    assert "returned a int for train=True; it must return a torch DataLoader or a Dataset" in err
    err = _run(capsys, *_args(project, tmp_path, f"data={data}:empty"))
    assert "the training dataset from" in err and "is empty" in err


def test_unwritable_output_dir(capsys, project, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = _run(capsys, *seed_project_args(project, blocker / "run", "epochs=1"))
    assert f"output_dir '{blocker / 'run'}' cannot be written (Not a directory); choose another output_dir" in err
    assert blocker.read_text() == "not a directory"


def test_real_process_prints_no_traceback(tmp_path):
    result = run_cli(["--config", str(tmp_path / "missing.yaml")], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"Config file '{tmp_path / 'missing.yaml'}' does not exist; check the --config path." in result.stderr


def test_a_dict_batch_for_a_one_tensor_model_and_mismatched_loss_shapes_are_one_line(capsys, project, tmp_path):
    """Issue 19: Python's `unexpected keyword argument` and a reshape error deep in the loss were the messages."""
    data = tmp_path / "dict_data.py"
    data.write_text(
        textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader

        def get_dataloader(cfg, train):
            rows = [{"input_ids": torch.arange(16), "attention_mask": torch.ones(16), "labels": torch.tensor(1)} for _ in range(8)]
            return DataLoader(rows, batch_size=cfg.batch_size)
    """)
    )
    err = _run(capsys, *_args(project, tmp_path, f"data={data}:get_dataloader"))
    assert "model: MyModel.forward requires 'x', and the batch is a dict of 'input_ids', 'attention_mask'" in err
    assert "yield (inputs, targets) for a model that takes one tensor" in err
    # The seed model's 4 logits per sample against one class label per sample, under mse.
    err = _run(capsys, *_args(project, tmp_path, "loss=mse", "batch_size=8", "monitor=val_loss"))
    assert "loss: mse between the model's outputs of shape [8, 4] and targets of shape [8]: it needs one target per output" in err


@pytest.mark.parametrize(
    "outputs, targets, expected",
    [
        ((8,), (8,), "outputs of shape [8] and targets of shape [8]"),
        ((8, 4), (6,), "outputs of shape [8, 4] and targets of shape [6]"),
        ((8, 5, 4), (8, 3), "outputs of shape [8, 5, 4] and targets of shape [8, 3]"),
    ],
)
def test_cross_entropy_names_both_shapes(outputs, targets, expected):
    from dist_train.components import Loss
    from dist_train.errors import UserError

    with pytest.raises(UserError, match=re.escape(f"loss: cross_entropy between the model's {expected}")):
        Loss("cross_entropy")(torch.zeros(outputs), torch.zeros(targets, dtype=torch.long))
    with pytest.raises(UserError, match=re.escape("Make the targets integers (.long())")):
        Loss("cross_entropy")(torch.zeros(8, 4), torch.zeros(8))
    # What it takes: class indices (per sample or per token) and class probabilities.
    assert Loss("cross_entropy")(torch.zeros(8, 5, 4), torch.zeros(8, 5, dtype=torch.long)).shape == ()
    assert Loss("cross_entropy")(torch.zeros(8, 4), torch.full((8, 4), 0.25)).shape == ()
