"""A checkpoint's manifest: what it is (step, epoch, world size, versions) and the SHA-256 of every file.

A checkpoint directory is complete exactly when its `manifest.json` exists and every file it lists
has the listed hash: the manifest is written last, after every other file is on disk, and the
directory only gets its final name afterwards (see checkpoint.py). `verify` is what `resume` trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK_BYTES = 8 << 20


class InvalidCheckpoint(Exception):
    """A checkpoint that is incomplete or corrupt; the message says which file and why."""


def sha256_file(path: Path) -> str:
    """SHA-256 of a file; the next chunk is read in a thread while this one is hashed (both drop the GIL)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1) as reader:
        pending = reader.submit(f.read, _CHUNK_BYTES)
        while chunk := pending.result():
            pending = reader.submit(f.read, _CHUNK_BYTES)
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every regular file under `directory` (FSDP's sharded state is a sub-folder), manifest excluded."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry list to disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, info: dict) -> dict:
    """Hash and fsync every file of `directory`, then write `manifest.json` (fsynced) with `info` and the hashes."""
    files, paths = {}, _files(directory)
    with ThreadPoolExecutor(1) as flusher:  # the disk flushes while the CPU hashes
        flushed = [flusher.submit(fsync_path, path) for path in paths]
        for path in paths:
            files[path.relative_to(directory).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for future in flushed:
            future.result()
    for sub in sorted({p.parent for p in paths}, reverse=True):
        fsync_path(sub)
    manifest = {**info, "files": files}
    target = directory / MANIFEST
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(directory)
    return manifest


def read_manifest(directory: Path) -> dict:
    """The manifest, without checking hashes (cheap: for listing and pruning)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InvalidCheckpoint(f"{directory} has no {MANIFEST} (an interrupted save)")
    try:
        manifest = json.loads(path.read_text())
        int(manifest["step"]), dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidCheckpoint(f"{path} is not a valid manifest ({exc})") from None
    return manifest


def verify(directory: Path) -> dict:
    """The manifest of a complete, intact checkpoint; InvalidCheckpoint naming the first bad file otherwise."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = manifest["files"]
    present = {p.relative_to(directory).as_posix() for p in _files(directory)}
    if present - listed.keys():
        raise InvalidCheckpoint(f"{directory} holds files its manifest does not list: {sorted(present - listed.keys())}")
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            raise InvalidCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise InvalidCheckpoint(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
    # Hashing is what bounds a load's speed: the files are hashed in parallel (hashlib drops the GIL).
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        digests = dict(zip(listed, pool.map(lambda name: sha256_file(directory / name), listed)))
    for name, entry in listed.items():
        if digests[name] != entry["sha256"]:
            raise InvalidCheckpoint(f"{directory / name} does not match its SHA-256 in the manifest (corrupt or modified)")
    return manifest
