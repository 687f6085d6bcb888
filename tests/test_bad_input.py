"""Every user mistake: exit status 2 and one line naming the culprit and the fix, never a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

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
