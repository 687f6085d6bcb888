"""`dist-train predict`: the model's outputs for every sample of a set, each exactly once, written as it goes.

The set is cut into parts of `shard_samples` consecutive samples (by global index: the sample's position
in one pass over the set's loader, its order fixed as for evaluation, data/eval_order.py). Part `c` is
computed and written by rank `c % world_size` alone, to `part-{c:06d}.safetensors`: an `index` tensor
(the global indices) and the outputs (`outputs`, or `outputs.KEY` / `outputs.I` for a dict or tuple),
one row per sample. A part is written to a temporary name, flushed and renamed, so a file with a part's
name is complete; a rerun into the same folder skips the parts that exist and computes only the rest.
Within a part the batches start at the part's first sample, so the parts' contents depend neither on the
world size nor on which run of an interrupted series wrote them: the same files for 1 or N ranks. Only
one part per rank is in memory at a time; nothing is gathered.

A map-style set: each rank loads only the samples of its parts. A stream (no length): every rank reads
the whole stream and runs the model on the samples of its parts only (the parts are defined by position,
which only a full read knows); it must yield the same samples in the same order on every read.

At the end rank 0 writes `manifest.json`: the number of samples, the parts (first index, count, SHA-256)
and the output keys, after checking that the parts cover 0..N-1 exactly once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, send_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from ..data import call_model, split_batch
from ..errors import UserError

PLAN = "predict.json"
MANIFEST = "manifest.json"
FORMAT = "dist_train-predictions/1"


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.safetensors"


def _written(out: Path, chunk: int) -> int | None:
    """The sample count of part `chunk` if a complete file of it exists (renamed into place only when whole)."""
    path = out / part_name(chunk)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return _part_meta(f)["count"]


def _part_meta(f) -> dict:
    return json.loads(f.metadata()["part"])


def _check_plan(out: Path, plan: dict, accelerator: Accelerator) -> None:
    """One predict per folder: a rerun continues it only with the same source, set and part size."""
    error = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".part-*.tmp-*"):  # a part being written when an earlier run was killed
            stale.unlink()
        path = out / PLAN
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous != plan:
                changed = sorted(k for k in plan.keys() | previous.keys() if plan.get(k) != previous.get(k))
                error = (
                    f"predict: {out} holds predictions of another run ({', '.join(changed)} differ: {previous} then); "
                    "choose another --out, or delete it to start again."
                )
        else:
            _atomic_write(path, json.dumps(plan, indent=1).encode())
    error = broadcast_object_list([error])[0]
    if error:
        raise UserError(error)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rows(value, start: int, stop: int):
    if isinstance(value, dict):
        return {k: _rows(v, start, stop) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, stop) for v in value)
    # A copy, not a view at an offset into the user's batch: a CPU kernel may round differently on memory of
    # another alignment (seen: 6e-8 apart), and a part's bytes must be the same on every world size.
    return value[start:stop].clone() if isinstance(value, torch.Tensor) and value.ndim else value


def _size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _size(next(iter(batch.values())))
    return _size(batch[0])


def _named_outputs(outputs, size: int) -> dict[str, torch.Tensor]:
    """The per-sample tensors of a model's outputs (a tensor, a dict / ModelOutput, a tuple), on the CPU."""
    if isinstance(outputs, torch.Tensor):
        items = [("outputs", outputs)]
    elif isinstance(outputs, dict):
        items = [(f"outputs.{k}", v) for k, v in outputs.items()]
    elif isinstance(outputs, (tuple, list)):
        items = [(f"outputs.{i}", v) for i, v in enumerate(outputs)]
    else:
        raise UserError(f"predict: the model returned a {type(outputs).__name__}; return a tensor, a dict or a tuple of tensors.")
    named = {k: v.detach().cpu() for k, v in items if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size}
    if not named:
        raise UserError(f"predict: the model's outputs hold no tensor with one row per sample (batch of {size}).")
    return named


class _Part:
    """The outputs of one part, collected batch by batch and written whole."""

    def __init__(self, chunk: int, first: int):
        self.chunk, self.first, self.count = chunk, first, 0
        self.pieces: dict[str, list[torch.Tensor]] = {}

    def add(self, named: dict[str, torch.Tensor], size: int) -> None:
        if self.pieces and named.keys() != self.pieces.keys():
            raise UserError(f"predict: the model returned outputs {sorted(named)} for one batch and {sorted(self.pieces)} for another.")
        for key, value in named.items():
            self.pieces.setdefault(key, []).append(value)
        self.count += size

    def write(self, out: Path, rank: int) -> None:
        tensors = {"index": torch.arange(self.first, self.first + self.count, dtype=torch.int64)}
        for key, values in self.pieces.items():
            if len({v.shape[1:] for v in values}) > 1:
                raise UserError(
                    f"predict: output {key!r} has per-sample shapes {sorted({tuple(v.shape[1:]) for v in values})} in different "
                    "batches (padding to each batch's longest sequence?); pad to one length to write predictions."
                )
            tensors[key] = torch.cat(values).contiguous()
        path = out / part_name(self.chunk)
        tmp = out / f".{path.name}.tmp-rank{rank}"
        # One metadata key: safetensors writes several in no fixed order, and the files must be byte-identical.
        save_file(tensors, str(tmp), metadata={"part": json.dumps({"first_index": self.first, "count": self.count})})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _inputs(batch, data_spec: str, model_computes: bool):
    if isinstance(batch, torch.Tensor):  # a set without targets: the batch is the model's input
        return batch
    if isinstance(batch, dict) and "labels" not in batch and not {"inputs", "targets"} <= batch.keys():
        return batch  # keyword inputs without targets
    return split_batch(batch, data_spec, model_computes)[0]


def _map_style_pieces(loader: DataLoader, mine: list[int], shard_samples: int, n: int):
    """(chunk, first index, batch) of this rank's parts, loading only their samples."""
    spans = []
    for chunk in mine:
        end = min((chunk + 1) * shard_samples, n)
        spans += [(chunk, j, list(range(j, min(j + loader.batch_size, end)))) for j in range(chunk * shard_samples, end, loader.batch_size)]
    own = DataLoader(
        loader.dataset,
        batch_sampler=[indices for _, _, indices in spans],
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    for (chunk, first, _), batch in zip(spans, own):
        yield chunk, first, batch


def _stream_pieces(loader: DataLoader, is_mine, shard_samples: int, counted: list[int]):
    """(chunk, first index, rows of a batch) of this rank's parts, from a full read of the stream."""
    position = 0
    for batch in loader:
        size = _size(batch)
        start = position
        while start < position + size:
            chunk = start // shard_samples
            stop = min((chunk + 1) * shard_samples, position + size)
            if is_mine(chunk):
                yield chunk, start, _rows(batch, start - position, stop - position)
            start = stop
        position += size
        counted[0] = position


@torch.no_grad()
def predict(
    model, loader: DataLoader, accelerator: Accelerator, out: Path, data_spec: str, model_computes: bool, shard_samples: int, plan: dict
) -> dict:
    """Write every sample's outputs to `out` (see the module docstring); return the manifest."""
    out = Path(out)
    _check_plan(out, plan, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    stream = isinstance(loader.dataset, IterableDataset)
    if not stream and loader.batch_size is None:
        raise UserError(f"predict: the loader from {data_spec!r} has no batch_size (a batch_sampler); give it batch_size= to predict.")
    done: dict[int, int] = {}

    def is_mine(chunk: int) -> bool:
        if chunk % world != rank:
            return False
        if chunk not in done:
            done[chunk] = _written(out, chunk) or 0
        return not done[chunk]

    counted = [0]
    if stream:
        pieces = _stream_pieces(loader, is_mine, shard_samples, counted)
    else:
        counted[0] = len(loader.dataset)
        chunks = math.ceil(counted[0] / shard_samples)
        pieces = _map_style_pieces(loader, [c for c in range(chunks) if is_mine(c)], shard_samples, counted[0])
    model.eval()
    part = None
    for chunk, first, batch in pieces:
        if part is not None and part.chunk != chunk:
            part.write(out, rank)
            part = None
        batch = send_to_device(batch, accelerator.device, non_blocking=accelerator.non_blocking)
        size = _size(batch)
        with accelerator.autocast():
            outputs = call_model(model, _inputs(batch, data_spec, model_computes))
        if part is None:
            part = _Part(chunk, first)
        part.add(_named_outputs(outputs, size), size)
    if part is not None:
        part.write(out, rank)
    accelerator.wait_for_everyone()
    manifest, error = None, None
    if accelerator.is_main_process:
        try:
            manifest = _write_manifest(out, counted[0], shard_samples, plan)
        except UserError as exc:
            error = str(exc)
    error = broadcast_object_list([error])[0]
    if error:
        raise UserError(error)
    return manifest


def _write_manifest(out: Path, num_samples: int, shard_samples: int, plan: dict) -> dict:
    parts, keys = [], None
    for chunk in range(math.ceil(num_samples / shard_samples)):
        path = out / part_name(chunk)
        expected = min(shard_samples, num_samples - chunk * shard_samples)
        if not path.is_file():
            raise UserError(f"predict: part {path.name} is missing after every rank finished; run predict again to write it.")
        with safe_open(str(path), framework="pt") as f:
            meta = _part_meta(f)
            if meta["first_index"] != chunk * shard_samples or meta["count"] != expected:
                raise UserError(
                    f"predict: {path} holds {meta['count']} samples from {meta['first_index']}, not {expected} from "
                    f"{chunk * shard_samples}: the set changed since it was written; predict into a new --out."
                )
            part_keys = {k: {"dtype": str(f.get_slice(k).get_dtype()), "shape": f.get_slice(k).get_shape()[1:]} for k in f.keys()}
        keys = keys or part_keys
        parts.append({"file": path.name, "first_index": chunk * shard_samples, "count": expected, "sha256": _sha256(path)})
    manifest = {"format": FORMAT, **plan, "num_samples": num_samples, "keys": keys, "parts": parts}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
