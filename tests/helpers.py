"""Helpers for tests that train through the real CLI, in real processes (gloo on CPU when N > 1)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CPU_LAUNCH_CONFIG = REPO / "launch_configs" / "cpu.yaml"
FSDP_CPU_LAUNCH_CONFIG = REPO / "launch_configs" / "fsdp_cpu.yaml"

# A real-process case costs seconds to tens of seconds, so where a matrix of them would be long the suite runs a
# sample, drawn by DIST_TRAIN_MATRIX_SEED (the seed tests/test_promise_matrix_e2e.py draws its setups by), named in
# each skip reason and at the end of the run (conftest.py); DIST_TRAIN_FULL_MATRIX=1 runs every case.
MATRIX_SEED = int(os.environ.get("DIST_TRAIN_MATRIX_SEED", "20250101"))
FULL_MATRIX = os.environ.get("DIST_TRAIN_FULL_MATRIX") == "1"


def sample_cases(name: str, cases: list, k: int = 1) -> list:
    """k of `cases`, drawn by the seed and the matrix's `name`; all of them with DIST_TRAIN_FULL_MATRIX=1."""
    return list(cases) if FULL_MATRIX else random.Random(f"{MATRIX_SEED}/{name}").sample(list(cases), k)


def sampled_params(cases: list, sampled: list, unpack: bool = False) -> list:
    """`cases` as pytest params (each a tuple of arguments with `unpack`); those not in `sampled` are skipped, the
    reason naming the seed and the sample."""
    skip = pytest.mark.skip(
        reason=f"not in the sample of DIST_TRAIN_MATRIX_SEED={MATRIX_SEED} ({sampled}); DIST_TRAIN_FULL_MATRIX=1 runs every case"
    )
    return [pytest.param(*(case if unpack else (case,)), marks=() if case in sampled else skip) for case in cases]


class Background:
    """fn(*args) in a daemon thread (one that never holds up the end of the session); result() waits for it and
    returns its value or raises its exception, as the test's own code would have."""

    def __init__(self, fn, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args):
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the test that asks)
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def cli_command(args: list[str], nproc: int = 1, subcommand: str = "train", launch_config: Path | None = None) -> list[str]:
    """`python -m dist_train SUBCOMMAND ARGS`, or the same under `accelerate launch` with N CPU processes
    (`launch_config`: another launch config, e.g. FSDP_CPU_LAUNCH_CONFIG, launched even for 1 process)."""
    if nproc == 1 and launch_config is None:
        return [sys.executable, "-m", "dist_train", subcommand, *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(launch_config or CPU_LAUNCH_CONFIG),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "dist_train",
        subcommand,
        *args,
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (its direct children, e.g. a launcher's workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def run_cli(
    args: list[str],
    nproc: int = 1,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    subcommand: str = "train",
    launch_config: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run the CLI to completion; with check=True, a non-zero exit fails the test showing its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = cli_command(args, nproc, subcommand, launch_config)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}")
    return result


def run_clis(*calls: dict, check: bool = True) -> list[subprocess.CompletedProcess]:
    """Independent CLI runs at once, each given as run_cli's keyword arguments: one-thread processes, so a
    lone 1-process run leaves the other cores idle. Each is checked (and fails) as run_cli would."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run_cli, **{"check": check, **call}) for call in calls]
        return [future.result() for future in futures]


class start_cli:  # noqa: N801 (used like a function: start_cli(...).result())
    """run_cli started now, in the background (its environment is this process's as it is now, before an
    in-process run changes it); result() waits and checks it as run_cli would."""

    def __init__(self, args: list[str], nproc: int = 1, timeout: float = 300, check: bool = True, env: dict | None = None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.check, self.timeout = check, timeout
        self.args = cli_command(args, nproc)
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        self.pool = ThreadPoolExecutor(1)  # reads its pipes meanwhile, so that a full pipe never stalls it
        self.output = self.pool.submit(self.process.communicate, timeout=timeout)

    def result(self) -> subprocess.CompletedProcess:
        try:
            stdout, stderr = self.output.result()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise
        finally:
            self.pool.shutdown()
        result = subprocess.CompletedProcess(self.args, self.process.returncode, stdout, stderr)
        if self.check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}")
        return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def val_records(output_dir: Path) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "val_loss" in r]


def load_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "model.safetensors"))


def write_seed_project(
    folder: Path, num_train: int = 256, num_val: int = 101, *, ids: bool = False, files: dict[str, str] | None = None
) -> Path:
    """A user project in the seed's layout: model.py (MyModel), dataset.py, dataloader.py (get_dataloader).

    ids: each sample carries its index as a last input column (for a model that records what it trains
    on, e.g. `ids_model()`); files: more files to write beside them, name -> text (e.g. SLOW_MODEL)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn

        class MyModel(nn.Module):
            def __init__(self, in_features=16, hidden=32, num_classes=4):
                super().__init__()
                self.fc1 = nn.Linear(in_features, hidden)
                self.act = nn.Tanh()
                self.fc2 = nn.Linear(hidden, num_classes)

            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))
    """)
    )
    (folder / "dataset.py").write_text(
        textwrap.dedent(f'''
        import torch
        from torch.utils.data import Dataset

        class MyDataset(Dataset):
            """A fixed synthetic classification set stored in data_path, read back like a real one."""

            def __init__(self, data_path, train=True):
                data = torch.load(data_path, weights_only=True)
                split = "train" if train else "val"
                self.x, self.y = data[split + "_x"], data[split + "_y"]

            def __len__(self):
                return len(self.y)

            def __getitem__(self, index):
                return {{getitem}}

        def make(path):
            g = torch.Generator().manual_seed(0)
            w = torch.randn(16, 4, generator=g)
            def split(n):
                x = torch.randn(n, 16, generator=g)
                return x, (x @ w).argmax(dim=1)
            tx, ty = split({num_train}); vx, vy = split({num_val})
            torch.save({{"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy}}, path)
    ''').replace("{getitem}", GETITEM_WITH_ID if ids else "self.x[index], self.y[index]")
    )
    (folder / "dataloader.py").write_text(
        textwrap.dedent("""
        from torch.utils.data import DataLoader
        from dataset import MyDataset

        def get_dataloader(cfg, train):
            dataset = MyDataset(cfg.data_path, train=train)
            return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train, num_workers=cfg.num_workers)
    """)
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(folder)!r}); import dataset; dataset.make({str(folder / 'data.pt')!r})",
        ],
        check=True,
    )
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


GETITEM_WITH_ID = "torch.cat([self.x[index], torch.tensor([float(index)])]), self.y[index]  # last column: the id"


def ids_model(dropout: float = 0.0, rng_scale: bool = False) -> str:
    """model.py for a seed project written with ids=True: MyModel on all columns but the id, which logs the
    ids it trains on ($IDS_DIR/rank{RANK}.txt, one line per training forward, an empty one per stand-in) and SIGKILLs itself at rank 0's
    $KILL_AT_FORWARD-th training forward (a real crash). dropout: a Dropout before the head (its masks draw
    from the torch RNG); rng_scale: the input scaled by one draw of the global torch RNG per training
    forward. Either way a resume must restore that RNG exactly to be bitwise the uninterrupted run."""
    return textwrap.dedent(f"""
        import os, signal
        import torch
        import torch.nn as nn

        class MyModel(nn.Module):
            def __init__(self, in_features=16, hidden=32, num_classes=4):
                super().__init__()
                self.fc1 = nn.Linear(in_features, hidden)
                self.act = nn.Tanh()
                self.drop = {f"nn.Dropout({dropout})" if dropout else "nn.Identity()"}
                self.fc2 = nn.Linear(hidden, num_classes)
                self.forwards = 0

            def forward(self, x):
                features = x[:, :-1]
                rank = os.environ.get("RANK", "0")
                if not self.training and torch.is_grad_enabled() and os.environ.get("IDS_DIR"):
                    # A stand-in forward (a rank with no sample in an epoch's short last step): an empty line.
                    with open(os.path.join(os.environ["IDS_DIR"], f"rank{{rank}}.txt"), "a") as f:
                        f.write("\\n")
                if self.training:
                    self.forwards += 1
                    if os.environ.get("IDS_DIR"):
                        with open(os.path.join(os.environ["IDS_DIR"], f"rank{{rank}}.txt"), "a") as f:
                            f.write(" ".join(str(int(i)) for i in x[:, -1].tolist()) + "\\n")
                    if rank == "0" and self.forwards == int(os.environ.get("KILL_AT_FORWARD", "0")):
                        os.kill(os.getpid(), signal.SIGKILL)
                    {"features = features * (1 + 0.01 * torch.rand(()))" if rng_scale else "pass"}
                return self.fc2(self.drop(self.act(self.fc1(features))))
    """)


def read_ids(ids_dir: Path) -> dict[int, list[list[int]]]:
    """rank -> the ids of each training forward it logged to ids_dir/rank{RANK}.txt, in order (an empty line: a
    stand-in forward that trains nothing, kept so that line k is micro-batch k on every rank)."""
    return {
        int(p.stem[4:]): [[int(i) for i in line.split()] for line in p.read_text().splitlines()]
        for p in sorted(Path(ids_dir).glob("rank*.txt"))
    }


def seed_project_args(folder: Path, output_dir: Path, *extra: str) -> list[str]:
    """CLI overrides that train the seed project in `folder` into `output_dir`. No curves.png (`plot=true` in
    `extra` draws it): drawing it costs each run ~0.6 s of CPU, and the suite is mostly CPU-bound."""
    return [
        f"model={folder / 'model.py'}:MyModel",
        f"data={folder / 'dataloader.py'}:get_dataloader",
        f"data_args={{data_path: {folder / 'data.pt'}}}",
        f"output_dir={output_dir}",
        "progress=false",
        "plot=false",
        "resume=never",
        *extra,
    ]


SLOW_MODEL = textwrap.dedent('''
    import time
    from model import MyModel

    class SlowModel(MyModel):
        """The seed model with a fixed pause per forward: a signal lands mid-training, and a run lasts
        as long on any machine."""

        def __init__(self, delay_s=0.0, **kwargs):
            super().__init__(**kwargs)
            self.delay_s = delay_s

        def forward(self, x):
            time.sleep(self.delay_s)
            return super().forward(x)
''')
"""`slow_model.py:SlowModel` for a seed project (write it beside its model.py)."""


def import_file(path: Path, name: str | None = None):
    """A user's Python file, imported by path (as the test's reference builds the model by hand)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or f"test_import_{Path(path).stem}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_weights_equal(got: dict | Path, want: dict | Path, exact: bool = True, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same keys and tensors: bitwise (`exact`), or within rtol/atol. Paths are run folders (their model.safetensors)."""
    got = load_weights(got) if isinstance(got, (str, Path)) else got
    want = load_weights(want) if isinstance(want, (str, Path)) else want
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for key in want:
        if exact:
            assert torch.equal(got[key], want[key]), f"{key} differs"
        else:
            torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def train_in_process(args: list[str]) -> dict:
    """`dist_train.train` on `key=value` args, in this process (one rank; faster than a CLI run)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from dist_train import load_config, train

    def reset() -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    try:
        return train(load_config(None, args))
    finally:
        reset()
