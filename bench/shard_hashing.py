"""Checkpoint hashing with per-rank ownership against the main process hashing everything.

    python -m bench.shard_hashing [--mib 512] [--ranks 1 2 4] [--repeats 3] [--dir PATH]

A checkpoint of FSDP's layout (`pytorch_model_fsdp_0/__R_0.distcp`, `optimizer_0/__R_0.distcp`, one RNG file
per rank; random bytes, `--mib` in all, split evenly over R ranks) is hashed and fsynced the two ways a save
can: the main process alone (`hash_files` of every file, the old way) and every rank its own files at once
(`hash_files(owned_files(...))` in R processes: the save waits for the slowest). Then verified the two ways:
`verify` whole, and `verify(share=(rank, R))` in R processes. The files are in the page cache (just
written), so this times hashing, the part that grows with the checkpoint, not the disk. Figures are
wall seconds, the median of `--repeats`; on a machine with C cores the per-rank time cannot fall below
1/C of the whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import median

from dist_train.checkpoint.manifest import hash_files, owned_files, verify, write_manifest


def _layout(folder: Path, ranks: int, total_bytes: int) -> None:
    per_file = total_bytes // (2 * ranks)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / part).mkdir(parents=True)
        for rank in range(ranks):
            (folder / part / f"__{rank}_0.distcp").write_bytes(os.urandom(per_file))
        (folder / part / ".metadata").write_bytes(os.urandom(4096))
    for rank in range(ranks):
        (folder / f"random_states_{rank}.pkl").write_bytes(os.urandom(16 << 10))


def _hash_own(folder: str, rank: int) -> float:
    start = time.perf_counter()
    hash_files(Path(folder), owned_files(Path(folder), rank))
    return time.perf_counter() - start


def _verify_share(folder: str, rank: int, ranks: int) -> float:
    start = time.perf_counter()
    verify(Path(folder), share=(rank, ranks))
    return time.perf_counter() - start


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def measure(root: Path, ranks: int, total_bytes: int, repeats: int) -> dict:
    folder = root / f"ranks{ranks}"
    shutil.rmtree(folder, ignore_errors=True)
    _layout(folder, ranks, total_bytes)
    write_manifest(folder, {"step": 0})
    whole_hash, per_rank_hash, whole_verify, per_rank_verify = [], [], [], []
    with ProcessPoolExecutor(ranks) as pool:
        for _ in range(repeats):
            whole_hash.append(_timed(lambda: hash_files(folder, sorted(p for p in folder.rglob("*") if p.is_file()))))
            start = time.perf_counter()
            list(pool.map(_hash_own, [str(folder)] * ranks, range(ranks)))
            per_rank_hash.append(time.perf_counter() - start)
            whole_verify.append(_timed(verify, folder))
            start = time.perf_counter()
            list(pool.map(_verify_share, [str(folder)] * ranks, range(ranks), [ranks] * ranks))
            per_rank_verify.append(time.perf_counter() - start)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "ranks": ranks,
        "hash_main_s": median(whole_hash),
        "hash_per_rank_s": median(per_rank_hash),
        "verify_main_s": median(whole_verify),
        "verify_per_rank_s": median(per_rank_verify),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shard_hashing", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="checkpoint size (MiB)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        rows = [measure(Path(scratch), ranks, args.mib << 20, args.repeats) for ranks in args.ranks]
    print(f"checkpoint of {args.mib} MiB, {os.cpu_count()} cores; wall seconds, median of {args.repeats}")
    print(f"{'ranks':>5} {'hash: main':>11} {'per rank':>9} {'verify: main':>13} {'per rank':>9}")
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['hash_main_s']:11.3f} {r['hash_per_rank_s']:9.3f} {r['verify_main_s']:13.3f} {r['verify_per_rank_s']:9.3f}"
        )


if __name__ == "__main__":
    main()
