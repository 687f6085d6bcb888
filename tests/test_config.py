"""Config: YAML + overrides, checked once, every mistake named with its fix."""

from __future__ import annotations

import dataclasses

import pytest

from dist_train.cli import main
from dist_train.config import Config, load_config
from dist_train.errors import UserError


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nepochs: 3\nmodel_args: {hidden: 64}\n")
    cfg = load_config(path, ["epochs=5", "lr=3e-4", "cpu=true", "model_args.dropout=0.5", "max_grad_norm=null"])
    assert cfg.epochs == 5 and cfg.cpu is True
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.model_args == {"hidden": 64, "dropout": 0.5}
    assert cfg.max_grad_norm is None
    assert cfg.batch_size == Config().batch_size


def test_int_is_accepted_for_float():
    assert load_config(None, ["lr=1"]).lr == 1.0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("epcohs=3", "Unknown config key 'epcohs'. Did you mean 'epochs'?"),
        ("batchsize=4", "Did you mean 'batch_size'?"),
        ("epochs=two", "Config key 'epochs' has value 'two' of type str; expected int."),
        ("epochs=true", "Config key 'epochs' has value True of type bool; expected int."),
        ("epochs=0", "Config key 'epochs' has value 0; expected a number >= 1."),
        ("lr=-1", "Config key 'lr' has value -1.0; expected a number >= 0."),
        ("optimizer=adagrad", "Config key 'optimizer' has value 'adagrad'; expected one of adam, adamw, sgd."),
        ("grad_accum_steps=0", "Config key 'grad_accum_steps' has value 0; expected a number >= 1."),
        ("lr_schedule=step", "expected one of constant, linear, cosine"),
        ("epochs", "Override 'epochs' is not of the form key=value"),
        ("model=null", "Config key 'model' may not be null; expected str."),
    ],
)
def test_bad_values_are_named(override, expected):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_combinations_checked_before_training():
    with pytest.raises(UserError, match=r"warmup_steps \(10\) is larger than max_steps \(5\)"):
        load_config(None, ["warmup_steps=10", "max_steps=5"])
    with pytest.raises(UserError, match="momentum=0.9 only applies to optimizer: sgd"):
        load_config(None, ["momentum=0.9"])


def test_yaml_file_mistakes(tmp_path):
    with pytest.raises(UserError, match="does not exist; check the --config path"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\nepochs: 2\n")
    with pytest.raises(UserError, match=r"is not valid YAML at line \d+, column \d+"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- lr\n- epochs\n")
    with pytest.raises(UserError, match="must be a mapping of key: value, not a list"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochz: 3\n")
    with pytest.raises(UserError, match="Unknown config key 'epochz'. Did you mean 'epochs'"):
        load_config(unknown)


def test_data_view_exposes_config_and_data_args():
    cfg = load_config(None, ["batch_size=7", "data_args={data_path: /x, val_fraction: 0.1}"])
    view = cfg.data_view()
    assert (view.batch_size, view.seed, view.num_workers, view.data_path, view.val_fraction) == (7, 0, 0, "/x", 0.1)
    with pytest.raises(UserError, match="data_args key 'seed' shadows the config key"):
        load_config(None, ["data_args={seed: 1}"]).data_view()


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["lr=0.5", "model_args.hidden=8"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert f"  {field.name} (default" in text, field.name
        assert field.metadata["help"] in text, field.name
