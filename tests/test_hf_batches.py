"""Hugging Face style batches: a tokenized `datasets` dataset from local files, dict batches passed as
`model(**batch)`, the model's own loss (`loss: model`) or a built-in one on `labels`, on 1 and 2 ranks,
with the validation loss the exact per-sample mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_weights_equal, import_file, load_weights, run_clis, sample_cases, sampled_params, val_records

pytest.importorskip("transformers")
pytest.importorskip("datasets")

TINY_BERT = {
    "vocab_size": 16,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 8,
    "num_labels": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "eats", "big", "small", "old"]

PROJECT = '''
import datasets
from transformers import BertConfig, BertForSequenceClassification

WORDS = {words!r}

def make_model(**config):
    return BertForSequenceClassification(BertConfig(**config))

def tokenize(example):
    ids = [2 + WORDS.index(w) for w in example["text"].split()][:8]
    pad = 8 - len(ids)
    return {{"input_ids": ids + [0] * pad, "attention_mask": [1] * len(ids) + [0] * pad, "labels": example["label"]}}

def get_dataset(cfg, train):
    """A tokenized `datasets` dataset read from local jsonl files: dict samples, no DataLoader of our own."""
    split = datasets.load_dataset("json", data_files=cfg.files, split="train" if train else "validation")
    return split.map(tokenize, remove_columns=["text", "label"]).with_format("torch")
'''


def _write_files(folder: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    files = {}
    for split, count in (("train", 50), ("validation", 19)):
        lines = []
        for _ in range(count):
            length = int(torch.randint(3, 9, (1,), generator=g))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)]
            lines.append(json.dumps({"text": " ".join(words), "label": int(words.count("cat") + words.count("dog") > 0)}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        files[split] = str(folder / f"{split}.jsonl")
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    (folder / "hf_project.py").write_text(PROJECT.format(words=WORDS))
    (folder / "files.json").write_text(json.dumps(_write_files(folder)))
    return folder


def _args(project: Path, out: Path, *extra: str) -> list[str]:
    files = json.loads((project / "files.json").read_text())
    return [
        f"model={project / 'hf_project.py'}:make_model",
        f"model_args={json.dumps(TINY_BERT)}",
        f"data={project / 'hf_project.py'}:get_dataset",
        f"data_args={json.dumps({'files': files})}",
        "optimizer=sgd",
        "lr=0.2",
        "epochs=2",
        "progress=false",
        "plot=false",
        "resume=never",
        "log_every=1",
        f"output_dir={out}",
        *extra,
    ]


def _reference_val_loss(project: Path, out: Path) -> float:
    """The mean cross-entropy over all 19 validation samples, in one pass, from the saved weights."""
    module = import_file(project / "hf_project.py", "hf_ref")
    model = module.make_model(**TINY_BERT)
    model.load_state_dict(load_weights(out), strict=False)  # (position_ids buffers are not saved)
    model.eval()
    import types

    data = module.get_dataset(types.SimpleNamespace(files=json.loads((project / "files.json").read_text())), False)
    batch = data[:]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"]).item()


# Each loss is a 1-process and a 2-process run (~22 s of CPU): the suite runs one, drawn by DIST_TRAIN_MATRIX_SEED
# (helpers.sample_cases); DIST_TRAIN_FULL_MATRIX=1 runs both.
LOSSES = ["model", "cross_entropy"]
LOSSES_SAMPLED = sample_cases("hf_loss", LOSSES)


@pytest.mark.parametrize("loss", sampled_params(LOSSES, LOSSES_SAMPLED))
def test_dict_batches_train_with_the_models_loss_or_a_builtin_one_and_two_ranks_match_one(project, tmp_path, loss):
    """A sampled matrix (see LOSSES_SAMPLED): `DIST_TRAIN_FULL_MATRIX=1 python -m pytest tests/test_hf_batches.py -k
    dict_batches_train` runs both losses."""
    run_clis(
        {"args": _args(project, tmp_path / "one", f"loss={loss}", "batch_size=8")},
        {"args": _args(project, tmp_path / "two", f"loss={loss}", "batch_size=4"), "nproc": 2},
    )
    assert_weights_equal(tmp_path / "two", tmp_path / "one", exact=False, rtol=1e-4)
    for out in (tmp_path / "one", tmp_path / "two"):
        final = val_records(out)[-1]
        assert final["val_samples"] == 19
        # The batch means the model returns, weighted by their batch sizes: the exact per-sample mean.
        assert final["val_loss"] == pytest.approx(_reference_val_loss(project, out), rel=1e-5)
        assert ("val_accuracy" in final) == (loss == "cross_entropy")
        steps = [r for r in json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]") if "lr" in r]
        assert steps and all(r["tokens_per_s"] > 0 for r in steps)


def test_a_dict_without_labels_and_a_model_without_a_loss_are_named(project, tmp_path):
    (project / "nolabels.py").write_text((project / "hf_project.py").read_text().replace(', "labels": example["label"]', ""))
    args = lambda out, *extra: [
        a.replace("hf_project.py:get_dataset", "nolabels.py:get_dataset") for a in _args(project, out, "epochs=1", *extra)
    ]
    # Both at once, each in its own output_dir.
    result, with_model_loss = run_clis({"args": args(tmp_path / "a")}, {"args": args(tmp_path / "b", "loss=model")}, check=False)
    assert result.returncode == 2 and "yielded a dict without 'labels'" in result.stderr and "loss: model" in result.stderr
    assert with_model_loss.returncode == 2 and "without a `loss` tensor" in with_model_loss.stderr


EXTRA_COLUMNS = '''
import datasets
import torch
import torch.nn as nn
from hf_project import make_model, tokenize


class Tagger(nn.Module):
    """Named keyword parameters only, and a dict with logits and no loss: a built-in loss takes the logits."""

    def __init__(self, vocab=16, hidden=8):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, hidden, mode="sum")
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.embed(input_ids, per_sample_weights=attention_mask.float()))}


def get_dataset(cfg, train):
    """The usual extra columns beside the model's: the raw `text` and an `idx`."""
    split = datasets.load_dataset("json", data_files=cfg.files, split="train" if train else "validation")
    split = split.map(tokenize, remove_columns=["label"])
    return split.add_column("idx", list(range(len(split)))).with_format("torch")
'''


@pytest.mark.parametrize("model", ["Tagger", "bert"])
def test_columns_the_model_does_not_take_are_dropped_and_named_once(project, tmp_path, capsys, model):
    """Issue 19: `forward() got an unexpected keyword argument 'text'`. A model with named parameters (a dict
    with logits and no loss out) and a transformers model (typed **kwargs; a ModelOutput whose loss is None
    under a built-in loss) both train; the dropped columns are said once."""
    import sys

    from helpers import train_in_process

    (project / "extra_columns.py").write_text(EXTRA_COLUMNS)
    args = [a.replace("hf_project.py:get_dataset", "extra_columns.py:get_dataset") for a in _args(project, tmp_path / "out", "epochs=1")]
    if model == "Tagger":
        args = [a for a in args if not a.startswith(("model=", "model_args="))] + [f"model={project / 'extra_columns.py'}:Tagger"]
    sys.path.insert(0, str(project))  # extra_columns imports hf_project, as a user's module beside it would
    try:
        capsys.readouterr()
        result = train_in_process([*args, "loss=cross_entropy", "batch_size=8"])
    finally:
        sys.path.remove(str(project))
    out = capsys.readouterr().out
    forward = "Tagger.forward" if model == "Tagger" else "BertForSequenceClassification.forward"
    said = f"dist_train: the batch's column(s) 'text', 'idx' are not parameters of {forward}; they are left out of every call"
    assert out.count(said) == 1, out
    assert out.count("left out of every call") == 1
    assert result["val_samples"] == 19 and "val_accuracy" in result
