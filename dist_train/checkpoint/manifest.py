"""A checkpoint's manifest: what it is (step, epoch, world size, versions) and the SHA-256 of every file.

A checkpoint directory is complete exactly when its `manifest.json` exists and every file it lists
has the listed hash: the manifest is written last, after every other file is on disk, and the
directory only gets its final name afterwards (see manager.py). `verify` is what `resume` trusts.

Hashing scales with the ranks: each file has an owner (`owner_of`: the rank whose number its name
carries, `__R_0.distcp` of FSDP's sharded state or `random_states_R.pkl`; the main process for the
rest), which hashes and fsyncs it after a save (`hash_files`); the main process only gathers the
digests into the manifest (`write_manifest(..., digests=)`). On resume each rank verifies its share
(`verify(..., share=(rank, world_size))`: the files whose owner maps onto it) and the ranks agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK_BYTES = 8 << 20
# SHA-256 is sequential within a file, so the manifest also holds one digest per 64 MiB piece: a load
# verifies the pieces on every core at once (one core hashes ~2 GB/s, slower than a fast disk reads).
PIECE_BYTES = 64 << 20


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


def hash_file(path: Path) -> dict:
    """`{"sha256": whole-file digest, "pieces": [digest of each PIECE_BYTES piece]}` in one read.

    The two digests are fed by separate threads (hashlib drops the GIL), so on two free cores this
    costs one pass, not two."""
    whole, pieces, piece, piece_fill = hashlib.sha256(), [], hashlib.sha256(), 0

    def feed_pieces(chunk: bytes) -> None:
        nonlocal piece, piece_fill
        view = memoryview(chunk)
        while view:
            take = min(len(view), PIECE_BYTES - piece_fill)
            piece.update(view[:take])
            piece_fill += take
            view = view[take:]
            if piece_fill == PIECE_BYTES:
                pieces.append(piece.hexdigest())
                piece, piece_fill = hashlib.sha256(), 0

    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(2) as pool:
        pending_read = pool.submit(f.read, _CHUNK_BYTES)
        pending_pieces = None
        while chunk := pending_read.result():
            pending_read = pool.submit(f.read, _CHUNK_BYTES)
            if pending_pieces is not None:
                pending_pieces.result()  # pieces are fed in order
            pending_pieces = pool.submit(feed_pieces, chunk)
            whole.update(chunk)
        if pending_pieces is not None:
            pending_pieces.result()
    if piece_fill or not pieces:
        pieces.append(piece.hexdigest())
    return {"sha256": whole.hexdigest(), "pieces": pieces}


def _piece_digest(path: Path, index: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, end = index * PIECE_BYTES, (index + 1) * PIECE_BYTES
        while offset < end and (data := os.pread(fd, min(_CHUNK_BYTES, end - offset), offset)):
            digest.update(data)
            offset += len(data)
    finally:
        os.close(fd)
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


_RANK_IN_NAME = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|random_states_(\d+)\.pkl)$")


def owner_of(name: str) -> int:
    """The rank that wrote a checkpoint file (relative path): the number in a per-rank file's name, else 0."""
    match = _RANK_IN_NAME.search(name)
    return int(match[1] or match[2]) if match else 0


def owned_files(directory: Path, rank: int) -> list[Path]:
    """The files of `directory` that `rank` wrote (and so hashes)."""
    return [p for p in _files(directory) if owner_of(p.relative_to(directory).as_posix()) == rank]


def hash_files(directory: Path, paths: list[Path]) -> dict:
    """Hash and fsync `paths` (files of `directory`): `{relative name: {"sha256", "pieces", "bytes"}}`."""
    files = {}
    with ThreadPoolExecutor(1) as flusher:  # the disk flushes while the CPU hashes
        flushed = [flusher.submit(fsync_path, path) for path in paths]
        for path in paths:
            files[path.relative_to(directory).as_posix()] = {**hash_file(path), "bytes": path.stat().st_size}
        for future in flushed:
            future.result()
    return files


def write_manifest(directory: Path, info: dict, digests: dict | None = None) -> dict:
    """Write `manifest.json` (fsynced) with `info` and the hash of every file of `directory`.

    `digests`: what the ranks hashed (and fsynced) of their own files; any file not in it is hashed and
    fsynced here (without it: every file), and a digest of a file that is not there is an error."""
    paths = _files(directory)
    names = {p.relative_to(directory).as_posix() for p in paths}
    digests = dict(digests or {})
    if digests.keys() - names:
        raise OSError(f"files hashed by their rank are missing from {directory}: {sorted(digests.keys() - names)[:8]}")
    files = {**digests, **hash_files(directory, [p for p in paths if p.relative_to(directory).as_posix() not in digests])}
    for sub in sorted({p.parent for p in paths}, reverse=True):
        fsync_path(sub)
    manifest = {**info, "files": dict(sorted(files.items()))}
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


def verify(directory: Path, share: tuple[int, int] | None = None) -> dict:
    """The manifest of a complete, intact checkpoint; InvalidCheckpoint naming the first bad file otherwise.

    `share=(rank, world_size)`: hash only this rank's share, the files whose owner maps onto it (owner mod
    world_size), for the ranks to verify a checkpoint together; listing and sizes are checked whole."""
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
    # Hashing is what bounds a load's speed: every piece of every file is hashed in parallel (hashlib
    # drops the GIL). A manifest without pieces (written by hand, or by an older version) is checked
    # file by file against the whole-file digest.
    jobs = []
    for name, entry in listed.items():
        if share is not None and owner_of(name) % share[1] != share[0]:
            continue
        pieces = entry.get("pieces")
        if isinstance(pieces, list) and len(pieces) == max(1, math.ceil(entry["bytes"] / PIECE_BYTES)):
            jobs += [(name, i, want) for i, want in enumerate(pieces)]
        else:
            jobs.append((name, None, entry["sha256"]))

    def matches(job) -> bool:
        name, index, want = job
        path = directory / name
        return (sha256_file(path) if index is None else _piece_digest(path, index)) == want

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for (name, _, _), ok in zip(jobs, pool.map(matches, jobs)):
            if not ok:
                raise InvalidCheckpoint(f"{directory / name} does not match its SHA-256 in the manifest (corrupt or modified)")
    return manifest
