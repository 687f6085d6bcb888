"""Vet a `torch.distributed.checkpoint` folder (FSDP's sharded state) before PyTorch unpickles it.

DCP reads its `.metadata` file with plain `pickle.load`, and every non-tensor value (optimizer
hyper-parameters, step counters) with `torch.load(weights_only=False)`: a planted payload in either
would run as soon as Accelerate loads an FSDP checkpoint or `export` consolidates one. The SHA-256
manifest catches a modified file, but not one whose hashes were rewritten too. So before any of that
runs, this module reads the metadata with an unpickler that can only build DCP's own metadata classes
(and a few torch value types), and every non-tensor value with `weights_only=True`; anything else is
refused with an error naming the file and the object.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path

import torch

from ..errors import UserError

_DCP_PACKAGE = "torch.distributed.checkpoint"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns a torch.layout by name
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if module == _DCP_PACKAGE or module.startswith(_DCP_PACKAGE + "."):
            candidate = super().find_class(module, name)
            obj = candidate if isinstance(candidate, type) else None  # DCP's dataclasses, never its functions
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            obj = getattr(torch, name)
        elif (module, name) in _ALLOWED:
            obj = super().find_class(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of a DCP metadata file")
        return obj


def _load_metadata(path: Path):
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as exc:
        raise UserError(
            f"checkpoint file {path} is not a plain torch.distributed.checkpoint metadata file ({exc}); "
            "refusing to unpickle it. Only load checkpoints you trust."
        ) from None


def check_dcp_folder(folder: Path) -> None:
    """Raise a UserError unless every DCP folder under `folder` holds only metadata and plain values."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    for metadata_file in sorted(Path(folder).rglob(".metadata")):
        metadata = _load_metadata(metadata_file)
        storage = getattr(metadata, "storage_data", None) or {}
        for fqn, item in getattr(metadata, "state_dict_metadata", {}).items():
            if not isinstance(item, BytesStorageMetadata):
                continue  # tensors are read as raw bytes into allocated tensors, never unpickled
            info = storage.get(MetadataIndex(fqn))
            if info is None or getattr(info, "transform_descriptors", None):
                raise UserError(
                    f"checkpoint {metadata_file.parent}: value {fqn!r} is stored in a way dist_train cannot vet; refusing to load it."
                )
            data_file = metadata_file.parent / str(pathlib.PurePath(info.relative_path))
            with open(data_file, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            try:
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                first_line = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])[:200]
                raise UserError(
                    f"checkpoint file {data_file}: value {fqn!r} holds pickled objects other than tensors and "
                    f"plain containers; refusing to load it ({first_line}). Only load checkpoints you trust."
                ) from None
