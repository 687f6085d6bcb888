"""Export a trained model for inference, and load it back: `dist-train export` and `dist_train.load_model`.

    dist-train export runs/default --out exported/        # newest complete checkpoint of a run
    dist-train export runs/default/checkpoints/step_00000300 --out exported/

An export is `model.safetensors` (or, above `--max-shard-size`, `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`, Hugging Face's layout) and `dist_train_model.json` with the model's
import string and `model_args`. `load_model(DIR)` rebuilds the model from those and loads the weights;
nothing is unpickled. An FSDP checkpoint (sharded state) is consolidated into one full state dict.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .dcp_check import check_dcp_folder
from .errors import UserError
from .manifest import InvalidCheckpoint, read_manifest, verify
from .safe_load import safe_torch_load

CONFIG_NAME = "dist_train_model.json"
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", text.upper())
    if not match:
        raise UserError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB.")
    return int(float(match[1]) * _UNITS[match[2]])


def find_checkpoint(source: Path) -> Path:
    """`source` itself when it is a checkpoint, else the newest complete checkpoint of the run `source`."""
    if (source / "manifest.json").exists():
        try:
            verify(source)
        except InvalidCheckpoint as exc:
            raise UserError(f"export: {source} is not a usable checkpoint: {exc}.") from None
        return source
    candidates = []
    for path in (source / "checkpoints").glob("step_*") if source.is_dir() else []:
        with contextlib.suppress(InvalidCheckpoint):
            candidates.append((read_manifest(path)["step"], path))
    for _, path in sorted(candidates, reverse=True):
        with contextlib.suppress(InvalidCheckpoint):
            verify(path)
            return path
    raise UserError(f"export: {source} is neither a checkpoint nor a run directory with a complete checkpoint in checkpoints/.")


def _consolidated_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    if (checkpoint / "model.safetensors").exists():
        return load_file(str(checkpoint / "model.safetensors"))
    sharded = checkpoint / "pytorch_model_fsdp_0"
    if sharded.is_dir():  # FSDP SHARDED_STATE_DICT: torch.distributed.checkpoint, merged on one process
        from accelerate.utils import merge_fsdp_weights

        check_dcp_folder(sharded)  # merging unpickles its metadata: vet it first
        with tempfile.TemporaryDirectory() as merged:
            merge_fsdp_weights(str(sharded), merged, safe_serialization=True)
            return load_file(str(Path(merged) / "model.safetensors"))
    full = checkpoint / "pytorch_model_fsdp.bin"
    if full.is_file():  # FSDP FULL_STATE_DICT: rank 0's torch.save of the whole model
        return safe_torch_load(full)
    raise UserError(f"export: {checkpoint} has no model.safetensors nor FSDP weights (pytorch_model_fsdp_0/ or pytorch_model_fsdp.bin).")


def export(source: str | Path, out: str | Path, max_shard_bytes: int = 5 * 10**9) -> Path:
    """Write the weights of a checkpoint (or a run's newest one) and its model config to `out`."""
    checkpoint = find_checkpoint(Path(source))
    cfg = yaml.safe_load((checkpoint / "config.yaml").read_text())
    model_spec = cfg["model"]
    path_part, _, name = model_spec.rpartition(":")
    if path_part.endswith(".py") and Path(path_part).exists():
        model_spec = f"{Path(path_part).resolve()}:{name}"  # a relative path would depend on the cwd
    weights = _consolidated_weights(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_sharded(weights, out, max_shard_bytes)
    config = {"format": "dist_train-model/1", "model": model_spec, "model_args": cfg.get("model_args") or {}, "source": str(checkpoint.resolve())}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out


def _save_sharded(weights: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    seen, tensors = set(), {}
    for name, tensor in weights.items():  # safetensors refuses tensors that share memory (tied weights)
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[name] = tensor.contiguous().clone() if key in seen else tensor.contiguous()
        seen.add(key)
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def load_model(directory: str | Path) -> torch.nn.Module:
    """The exported model, built from its import string and model_args, with its weights, in eval mode."""
    from .plugins import build_model

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise UserError(f"load_model: {directory} has no {CONFIG_NAME}; export it with `dist-train export RUN --out DIR`.") from None
    model = build_model(config["model"], config["model_args"])
    if (directory / INDEX_NAME).exists():
        index = json.loads((directory / INDEX_NAME).read_text())
        state_dict = {}
        for filename in sorted(set(index["weight_map"].values())):
            state_dict.update(load_file(str(directory / filename)))
    else:
        state_dict = load_file(str(directory / "model.safetensors"))
    model.load_state_dict(state_dict)
    return model.eval()
