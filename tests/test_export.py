"""Export and load_model: tied weights, a model path that must resolve, which weights of a run, no foreign code.

One real `dist-train train` of a small language model whose head is its embedding's Parameter, trained
from its own folder with a relative `model=tied.py:TiedLM` as a user would; every test exports it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train import UserError, load_model
from dist_train.cli import main
from dist_train.export import export
from helpers import load_weights, run_cli

TIED_PROJECT = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from torch.utils.data import TensorDataset

    class TiedLM(nn.Module):
        """Next-token logits with the usual tied head: `head.weight` is `embed.weight`."""

        def __init__(self, vocab=11, dim=8):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.mix = nn.Linear(dim, dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.embed(ids))))

    def get_dataset(cfg, train):
        g = torch.Generator().manual_seed(0 if train else 1)
        ids = torch.randint(0, 11, (32 if train else 8, 5), generator=g)
        return TensorDataset(ids, (ids + 1) % 11)
''')


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """The project folder; its run is `run/`: 16 steps, checkpoints every 5 (and at the last step), final weights at 16."""
    folder = tmp_path_factory.mktemp("tied")
    (folder / "tied.py").write_text(TIED_PROJECT)
    with contextlib.chdir(folder):  # relative import strings and output_dir, as written by hand
        run_cli(
            [
                "model=tied.py:TiedLM",
                "data=tied.py:get_dataset",
                "epochs=2",
                "batch_size=4",
                "checkpoint_every=5",
                "checkpoint_epochs=false",
                "output_dir=run",
                "progress=false",
                "plot=false",
                "resume=never",
            ]
        )
    return folder


def _module(folder: Path):
    spec = importlib.util.spec_from_file_location("tied_reference", folder / "tied.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _val_ids(module) -> torch.Tensor:
    return module.get_dataset(None, train=False).tensors[0]


def test_tied_weights_round_trip_through_export_and_load_model(tied, tmp_path, monkeypatch):
    module = _module(tied)
    trained = load_weights(tied / "run")
    assert "head.weight" not in trained  # safetensors keeps one name per tied group
    reference = module.TiedLM()  # built by hand: every name, the head from the embedding
    reference.load_state_dict({**trained, "head.weight": trained["embed.weight"]})
    want = reference.eval()(_val_ids(module))

    monkeypatch.chdir(tied)  # where training ran: its relative model path resolves
    export("run", tmp_path / "final")
    for loaded in (load_model(tmp_path / "final", model=module.TiedLM), load_model(tmp_path / "final", trust_code=True)):
        assert loaded.head.weight is loaded.embed.weight  # still tied: fine-tuning it keeps them one
        assert torch.equal(loaded(_val_ids(module)), want)

    checkpoint = tied / "run" / "checkpoints" / "step_00000015"
    export(checkpoint, tmp_path / "sharded", max_shard_bytes=100)
    assert len(set(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    loaded = load_model(tmp_path / "sharded", model=module.TiedLM)
    assert loaded.head.weight is loaded.embed.weight
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)


def test_load_model_names_what_does_not_fit(tied, tmp_path, monkeypatch):
    """Only a name tied in the built model may be missing; anything else is the caller's wrong model."""
    module = _module(tied)
    monkeypatch.chdir(tied)
    export("run", tmp_path / "exported")

    class Untied(module.TiedLM):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 11, bias=False)  # its own weight: the export has none for it

    with pytest.raises(UserError, match=r"missing from the export: \['head.weight'\]; not in the model: \[\]"):
        load_model(tmp_path / "exported", model=Untied)
    with pytest.raises(UserError, match=r"embed.weight \(export \[11, 8\], model \[11, 4\]\)"):
        load_model(tmp_path / "exported", model=module.TiedLM(dim=4))
    config_path = tmp_path / "exported" / "dist_train_model.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_args": {"dim": 8}}))
    with pytest.raises(UserError, match=r"model=Untied cannot take the export's model_args \{'dim': 8\}"):
        load_model(tmp_path / "exported", model=Untied)


def test_export_refuses_a_relative_model_path_it_cannot_resolve(tied, tmp_path):
    """Run from another directory than training's, `tied.py:TiedLM` names no file: refused, not stored."""
    run = tied / "run"
    refused = run_cli([str(run), "--out", str(tmp_path / "never")], subcommand="export", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "'tied.py:TiedLM'" in refused.stderr and "--model path/to/model.py:TiedLM" in refused.stderr
    assert not (tmp_path / "never").exists()

    absolute = f"{tied / 'tied.py'}:TiedLM"
    run_cli([str(run), "--out", str(tmp_path / "exported"), "--model", absolute], subcommand="export")
    assert json.loads((tmp_path / "exported" / "dist_train_model.json").read_text())["model"] == absolute
    assert load_model(tmp_path / "exported", trust_code=True).head.weight is not None  # loads from anywhere

    with contextlib.chdir(tied):  # from training's directory the relative path resolves, and is stored absolute
        export("run", tmp_path / "from_training_dir")
    assert json.loads((tmp_path / "from_training_dir" / "dist_train_model.json").read_text())["model"] == absolute


def test_export_of_a_run_takes_its_final_weights_unless_a_checkpoint_is_newer(tied, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tied)  # config.yaml's relative model path resolves
    run = Path(shutil.copytree("run", tmp_path / "run"))  # copy2: the files keep their mtimes
    # Final weights newer than any checkpoint: step 16's checkpoint gone (a newer loop writes one, an older did not).
    shutil.rmtree(run / "checkpoints" / "step_00000016", ignore_errors=True)
    assert main(["export", str(run), "--out", str(tmp_path / "final")]) == 0
    assert f"dist_train: exported the final weights of {run} (optimizer step 16) to {tmp_path / 'final'}\n" in capsys.readouterr().out
    final, newest_checkpoint = load_weights(run), load_weights(run / "checkpoints" / "step_00000015")
    exported = load_weights(tmp_path / "final")
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert not all(torch.equal(exported[k], newest_checkpoint[k]) for k in final)  # step 16 is not step 15

    # A resumed training (more epochs) wrote a checkpoint after the final weights of the first one.
    manifest_ns = (run / "checkpoints" / "step_00000015" / "manifest.json").stat().st_mtime_ns
    os.utime(run / "model.safetensors", ns=(manifest_ns - 10**9, manifest_ns - 10**9))
    assert main(["export", str(run), "--out", str(tmp_path / "checkpoint")]) == 0
    checkpoint = run / "checkpoints" / "step_00000015"
    assert f"dist_train: exported checkpoint {checkpoint} (optimizer step 15) to {tmp_path / 'checkpoint'}\n" in capsys.readouterr().out
    exported = load_weights(tmp_path / "checkpoint")
    assert all(torch.equal(exported[k], newest_checkpoint[k]) for k in newest_checkpoint)

    # metrics.jsonl written after the final weights belongs to a later training: their step is not its last.
    os.utime(run / "model.safetensors", ns=(manifest_ns + 10**9, manifest_ns + 10**9))
    os.utime(run / "metrics.jsonl", ns=(manifest_ns + 2 * 10**9, manifest_ns + 2 * 10**9))
    assert main(["export", str(run), "--out", str(tmp_path / "unknown")]) == 0
    assert f"exported the final weights of {run} (optimizer step unknown)" in capsys.readouterr().out


def test_load_model_imports_nothing_from_the_folder_unless_trusted(tied, tmp_path, monkeypatch):
    module = _module(tied)
    monkeypatch.chdir(tied)
    export("run", tmp_path / "received")
    # A folder from someone else: its import string names a file that runs code when imported.
    marker = tmp_path / "ran"
    (tmp_path / "theirs.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + TIED_PROJECT)
    config_path = tmp_path / "received" / "dist_train_model.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model": f"{tmp_path / 'theirs.py'}:TiedLM"}))

    with pytest.raises(UserError, match=r"pass model=YourClass .*, or trust_code=True"):
        load_model(tmp_path / "received")
    by_class = load_model(tmp_path / "received", model=module.TiedLM)
    mine = module.TiedLM()
    assert load_model(tmp_path / "received", model=mine) is mine
    assert not marker.exists(), "load_model imported the folder's code"
    assert torch.equal(by_class(_val_ids(module)), mine(_val_ids(module)))

    trusted = load_model(tmp_path / "received", trust_code=True)
    assert marker.exists() and type(trusted).__module__ != module.__name__  # asked for: their class, imported
