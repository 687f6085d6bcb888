"""Export a trained model for inference, and load it back: `dist-train export` and `dist_train.load_model`.

    dist-train export runs/default --out exported/        # the run's final weights (or a newer checkpoint)
    dist-train export runs/default/checkpoints/step_00000300 --out exported/

An export is `model.safetensors` (or, above `--max-shard-size`, `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`, Hugging Face's layout) and `dist_train_model.json` with the model's
import string (a `.py` path made absolute) and `model_args`. An FSDP checkpoint (sharded state) is
consolidated into one full state dict. `load_model(DIR, model=MyModel)` builds your class and loads the
weights: nothing is unpickled, and nothing from DIR is imported unless you pass `trust_code=True`.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import MANIFEST, InvalidCheckpoint, check_dcp_folder, read_manifest, safe_torch_load, verify
from .errors import UserError

CONFIG_NAME = "dist_train_model.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", text.upper())
    if not match:
        raise UserError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB.")
    return int(float(match[1]) * _UNITS[match[2]])


def choose_weights(source: Path, ema: bool = False, command: str = "export") -> tuple[Path, str, int | None]:
    """The folder to export (it holds the weights and config.yaml), how to name it, and its optimizer step.

    A checkpoint is taken as it is. For a run directory: its final weights, which the loop writes after
    its last checkpoint, unless a complete checkpoint is newer (file mtime: a resumed training went on
    past them); else the newest complete checkpoint (by step, as `resume: auto` picks). With `ema`, the
    final weights are the run's `ema/` folder.
    """
    if (source / MANIFEST).exists():
        try:
            return source, f"{'the EMA weights of ' if ema else ''}checkpoint {source}", verify(source)["step"]
        except InvalidCheckpoint as exc:
            raise UserError(f"{command}: {source} is not a usable checkpoint: {exc}.") from None
    finals = source / "ema" if ema else source
    final = next((finals / name for name in (INDEX_NAME, WEIGHTS_NAME) if (finals / name).is_file()), None)
    candidates = []
    for path in (source / "checkpoints").glob("step_*") if source.is_dir() else []:
        with contextlib.suppress(InvalidCheckpoint):
            candidates.append((read_manifest(path)["step"], path))
    for step, path in sorted(candidates, reverse=True):
        if final and _mtime(final) >= _mtime(path / MANIFEST):
            break  # the newest checkpoint predates the final weights: no need to hash it
        with contextlib.suppress(InvalidCheckpoint):
            verify(path)
            return path, f"{'the EMA weights of ' if ema else ''}checkpoint {path}", step
    if final:
        return source, f"the final {'EMA ' if ema else ''}weights of {source}", _final_step(source, final)
    raise UserError(
        f"{command}: {source} is neither a checkpoint nor a run directory with model.safetensors or a complete checkpoint in checkpoints/."
    )


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def _final_step(run: Path, final: Path) -> int | None:
    """The step of the final weights: the loop closes metrics.jsonl, whose last record is the final
    validation, just before it writes them. A metrics.jsonl written after them belongs to a later
    (resumed) training, which says nothing about the step they were written at."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file() or _mtime(metrics) > _mtime(final):
        return None
    with contextlib.suppress(IndexError, ValueError, KeyError):
        return int(json.loads(metrics.read_text().splitlines()[-1])["step"])
    return None


def _model_spec(spec: str, origin: str) -> str:
    """`spec` as load_model will need it anywhere: a `.py` path made absolute, a package string as it is.

    A relative path is taken from the cwd only: the directory training ran in is recorded nowhere, and
    guessing it from output_dir could pick another project's model.py."""
    path_part, _, name = spec.rpartition(":")
    if not path_part.endswith(".py"):
        return spec
    path = Path(path_part).expanduser()
    if not path.is_file():
        raise UserError(
            f"export: model file {path_part!r} of {spec!r} ({origin}) does not exist from {Path.cwd()}; run export "
            f"from the directory training ran in, or pass --model path/to/model.py:{name}."
        )
    return f"{path.resolve()}:{name}"


def _ema_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a run's final weights (`ema/`) or of a checkpoint (the registered EMA state)."""
    if (folder / "ema" / WEIGHTS_NAME).is_file() or (folder / "ema" / INDEX_NAME).is_file():
        return _read_safetensors(folder / "ema")
    if (folder / "ema_fsdp").is_dir():  # FSDP2: the ranks' shards (components/ema.py), merged on one process
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        check_dcp_folder(folder / "ema_fsdp")  # merging unpickles its metadata: vet it first
        with tempfile.TemporaryDirectory() as merged:
            dcp_to_torch_save(str(folder / "ema_fsdp"), str(Path(merged) / "ema.pt"))
            return dict(safe_torch_load(Path(merged) / "ema.pt")["ema"])
    for path in sorted(folder.glob("custom_checkpoint_*.pkl")):
        state = safe_torch_load(path)
        if isinstance(state, dict) and set(state) == {"updates", "weights"}:  # components/ema.py's state_dict
            return dict(state["weights"])
    raise UserError(f"export --weights ema: {folder} holds no EMA weights (its run did not set ema_decay); export the raw weights.")


def _merged_dcp(sharded: Path) -> dict[str, torch.Tensor]:
    """A torch.distributed.checkpoint folder of one state dict, merged into whole tensors on this process."""
    from accelerate.utils import merge_fsdp_weights

    check_dcp_folder(sharded)  # merging unpickles its metadata: vet it first
    with tempfile.TemporaryDirectory() as merged:
        merge_fsdp_weights(str(sharded), merged, safe_serialization=True)
        return load_file(str(Path(merged) / WEIGHTS_NAME))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / INDEX_NAME).exists() or (folder / WEIGHTS_NAME).exists():
        return _read_safetensors(folder)
    sharded = folder / "pytorch_model_fsdp_0"
    if sharded.is_dir():  # FSDP SHARDED_STATE_DICT: torch.distributed.checkpoint, merged on one process
        return _merged_dcp(sharded)
    full = folder / "pytorch_model_fsdp.bin"
    if full.is_file():  # FSDP FULL_STATE_DICT: rank 0's torch.save of the whole model
        return safe_torch_load(full)
    raise UserError(f"export: {folder} has no model.safetensors nor FSDP weights (pytorch_model_fsdp_0/ or pytorch_model_fsdp.bin).")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """`model.safetensors`, or every shard an index names; an unreadable file (a save cut short) is a UserError."""
    names = [WEIGHTS_NAME]
    if (folder / INDEX_NAME).exists():
        names = sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
    state_dict = {}
    for name in names:
        try:
            state_dict.update(load_file(str(folder / name)))
        except (SafetensorError, FileNotFoundError) as exc:
            raise UserError(
                f"{folder / name} cannot be read ({exc}); export again (from one of the run's checkpoints if its final weights are damaged)."
            ) from None
    return state_dict


def export(source: str | Path, out: str | Path, max_shard_bytes: int = 5 * 10**9, model: str | None = None, ema: bool = False) -> Path:
    """Write the weights `choose_weights(source)` picks (their EMA with `ema`) and the model's import string
    (`model`, else config.yaml's) and model_args to `out`; prints what it exported, at which optimizer step."""
    folder, what, step = choose_weights(Path(source), ema)
    if not (folder / "config.yaml").is_file():
        raise UserError(
            f"export: {folder} has no config.yaml (the model and model_args); export a run's output_dir or one of its checkpoints."
        )
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    model_spec = _model_spec(model, "--model") if model else _model_spec(cfg["model"], f"model in {folder / 'config.yaml'}")
    weights = _ema_weights(folder) if ema else _weights(folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_sharded(weights, out, max_shard_bytes)
    config = {
        "format": "dist_train-model/1",
        "model": model_spec,
        "model_args": cfg.get("model_args") or {},
        "source": str(folder.resolve()),
        "optimizer_step": step,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    at = "optimizer step unknown" if step is None else f"optimizer step {step}"
    print(f"dist_train: exported {what} ({at}) to {out}")
    return out


def _save_sharded(weights: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    seen, tensors = set(), {}
    for name, tensor in weights.items():  # safetensors refuses tensors that share memory (tied weights)
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.contiguous().clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def load_weights(model: nn.Module, folder: Path, ema: bool = False) -> None:
    """The weights of a run or checkpoint folder chosen by `choose_weights` (their EMA with `ema`), loaded into
    `model` (shapes and names checked)."""
    _load_weights(model, _ema_weights(folder) if ema else _weights(folder), folder)


def load_model(directory: str | Path, model: Callable | nn.Module | None = None, *, trust_code: bool = False) -> nn.Module:
    """The exported model with its weights, in eval mode.

    `model`: your class or factory (called with the export's model_args) or a model you built; nothing
    from `directory` is imported. Without it, the import string the export names is imported only with
    `trust_code=True` (importing runs that file, and an export may come from anyone).
    """
    from .plugins import build_model, check_call

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise UserError(f"load_model: {directory} has no {CONFIG_NAME}; export it with `dist-train export RUN --out DIR`.") from None
    spec, kwargs = config["model"], config["model_args"]
    if isinstance(model, nn.Module):
        built = model
    elif model is not None:
        name = getattr(model, "__name__", repr(model))
        check_call(
            model,
            kwargs,
            f"load_model: model={name} cannot take the export's model_args {kwargs!r}",
            "Pass a built model: model=YourClass(...).",
        )
        built = model(**kwargs)
        if not isinstance(built, nn.Module):
            raise UserError(f"load_model: model={name} returned a {type(built).__name__}, not a torch.nn.Module; pass the model class.")
    elif trust_code:
        built = build_model(spec, kwargs)
    else:
        raise UserError(
            f"load_model: {directory} names its model as {spec!r}, and importing it would run that code; pass "
            "model=YourClass (built with the export's model_args), or trust_code=True if you trust where the folder came from."
        )
    _load_weights(built, _read_safetensors(directory), directory)
    return built.eval()


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    own = model.state_dict()
    wrong = [
        f"{k} (export {list(t.shape)}, model {list(own[k].shape)})" for k, t in state_dict.items() if k in own and t.shape != own[k].shape
    ]
    if wrong:
        raise UserError(
            f"load_model: {directory} does not fit the model: {', '.join(wrong[:8])}; pass the class and model_args it was trained with."
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Tied weights (an LM head that is the embedding's Parameter) are stored under one name: safetensors
    # refuses shared memory, so Accelerate's saves keep one name of each tied group. A name missing from
    # the export is fine exactly when the model ties it to a tensor that was loaded.
    loaded = {_identity(own[k]) for k in state_dict if k in own}
    missing = [k for k in missing if _identity(own[k]) not in loaded]
    if missing or unexpected:
        raise UserError(
            f"load_model: {directory} does not fit the model: missing from the export: {sorted(missing)[:8]}; "
            f"not in the model: {sorted(unexpected)[:8]}. Pass the class and model_args it was trained with."
        )


def _identity(tensor: torch.Tensor) -> tuple:
    """Equal for two state-dict entries exactly when they are the same memory seen the same way (tied)."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()
