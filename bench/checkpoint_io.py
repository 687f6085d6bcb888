"""Checkpoint save/load throughput of a ~1 GB model against the disk's own bandwidth, measured the same way.

    python -m bench.checkpoint_io [--dir /path/on/the/disk] [--gib 1.0] [--repeats 2]

Save is `Checkpointer.save()` end to end: `accelerator.save_state` (safetensors weights), SHA-256 of every
file, fsync of files and folders, atomic rename. Load is `Checkpointer.resume()` with `resume: PATH`: hash
verification, then `load_state`. The references are `dd if=/dev/zero bs=16M conv=fsync` (write) and
`dd of=/dev/null bs=16M` (read). Before every timed read, the files are evicted from the page cache
(`posix_fadvise(DONTNEED)`, no root needed), so load and the read reference both come from the disk.
The optimizer is plain SGD (no state), so the checkpoint is the model's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from dist_train.checkpoint import Checkpointer
from dist_train.checkpoint.manifest import sha256_file
from dist_train.config import Config
from dist_train.state import TrainState


def evict(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def dd_write(path: Path, source: Path) -> float:
    """Bytes/s of `dd ... conv=fsync` copying random bytes from RAM (timed here, end to end, like the save)."""
    start = time.perf_counter()
    subprocess.run(["dd", f"if={source}", f"of={path}", "bs=16M", "conv=fsync"], check=True, capture_output=True)
    return source.stat().st_size / (time.perf_counter() - start)


def dd_read(path: Path) -> float:
    evict(path.parent)
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return path.stat().st_size / (time.perf_counter() - start)


def build(gib: float, output_dir: Path, resume: str = "never"):
    from accelerate import Accelerator

    width = 4096
    layers = max(1, round(gib * 2**30 / (width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    cfg = Config(output_dir=str(output_dir), resume=resume, keep_last=1)
    return Checkpointer(cfg, accelerator, state), state, model


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temp folder)")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir))
    try:
        checkpointer, state, model = build(args.gib, root / "run")
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"model: {nbytes / 2**30:.2f} GiB of fp32 weights; folder: {root}")
        # A thin-provisioned (VM) disk writes never-touched blocks several times slower than reused ones:
        # write and free 2x the model once so that dd and the checkpoints both land on provisioned blocks.
        # Random bytes, not zeros (which a virtual disk may treat specially), read from RAM (/dev/shm).
        source = Path(tempfile.mkstemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)[1])
        with open(source, "wb") as f:
            for _ in range(nbytes // 2**24):
                f.write(os.urandom(2**24))
        for _ in range(2):
            dd_write(root / "warmup.bin", source)
            (root / "warmup.bin").unlink()
        writes, reads, saves, loads, hashes = [], [], [], [], []
        for repeat in range(args.repeats):
            # dd and the save write onto the same free space: each result is deleted before the next write.
            writes.append(dd_write(root / "dd.bin", source))
            reads.append(dd_read(root / "dd.bin"))
            (root / "dd.bin").unlink()
            state.optimizer_step = repeat + 1
            start = time.perf_counter()
            path = checkpointer.save()
            saves.append(checkpoint_bytes(path) / (time.perf_counter() - start))
            evict(path)
            start = time.perf_counter()
            sha256_file(path / "model.safetensors")
            hashes.append((path / "model.safetensors").stat().st_size / (time.perf_counter() - start))
            evict(path)
            loader, _, _ = build(args.gib, root / "run", resume=str(path))
            start = time.perf_counter()
            loader.resume()
            loads.append(checkpoint_bytes(path) / (time.perf_counter() - start))
            del loader
            shutil.rmtree(path)
        gbs = lambda xs: f"{median(xs) / 1e9:.2f} GB/s median (runs: {', '.join(f'{x / 1e9:.2f}' for x in xs)})"
        print(f"dd write (conv=fsync):    {gbs(writes)}")
        print(f"checkpoint save:          {gbs(saves)}  -> {median(saves) / median(writes):.0%} of dd write")
        print(f"dd read (cache evicted):  {gbs(reads)}")
        print(f"checkpoint load:          {gbs(loads)}  -> {median(loads) / median(reads):.0%} of dd read")
        print(f"sha256 of the weights file (cache evicted): {gbs(hashes)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if "source" in locals():
            source.unlink()


if __name__ == "__main__":
    main()
