"""`dist-train doctor`: check a launch before spending a cluster allocation on it.

Run it exactly like the training (same launcher, same config and overrides, `doctor` instead of
`train`):

    accelerate launch --config_file launch_configs/cpu.yaml -m dist_train doctor --config run.yaml
    sbatch --nodes=2 slurm/train_multinode.sbatch doctor --config run.yaml

Every rank resolves the config and its view of the launch; the main process prints the whole job
(world size, rank -> node / local rank / device, backend, precision, the SLURM variables that
matter) and the job exits non-zero naming the first problem found:
- the main address does not resolve or accept connections (checked before joining the group, so
  a wrong address fails in seconds instead of hanging in init_process_group);
- the process group does not form, or an all_reduce does not return the right sum, within
  `--timeout_s`;
- processes != nodes x GPUs (or the SLURM allocation's node count), or two ranks share a GPU;
- ranks disagree on the resolved config (a hash of it is all-gathered), e.g. a node that reads an
  older copy of run.yaml.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections import Counter

SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NNODES",
    "SLURM_NODEID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_GPUS_ON_NODE",
    "SLURM_RESTART_COUNT",
    "CUDA_VISIBLE_DEVICES",
)


def _say(message: str) -> None:
    print(f"dist-train doctor: {message}", flush=True)


def check_main_address(timeout_s: float) -> str | None:
    """On a non-zero rank: can this process reach MASTER_ADDR:MASTER_PORT? None if fine, else why not."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or int(os.environ.get("RANK", "0")) == 0:
        return None
    try:
        infos = socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"main address {addr!r} does not resolve on {socket.gethostname()} ({exc.strerror}); pass a host name every node can resolve (--main_process_ip)"
    ip = infos[0][4][0]
    deadline = time.monotonic() + timeout_s
    while True:  # "refused" may only mean the main process has not opened its port yet: retry until the deadline
        try:
            with socket.create_connection((ip, int(port)), timeout=max(0.1, deadline - time.monotonic())):
                return None
        except OSError as exc:
            if time.monotonic() >= deadline:
                return (
                    f"main address {addr}:{port} ({ip}) unreachable from {socket.gethostname()} for {timeout_s:.0f} s "
                    f"({exc.strerror or type(exc).__name__}); check --main_process_ip/--main_process_port and firewalls"
                )
            time.sleep(0.2)


def _local_view(cfg) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not cfg.cpu
    device_index = torch.cuda.current_device() if cuda else None
    return {
        "host": socket.gethostname(),
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        "gpus_on_node": torch.cuda.device_count() if cuda else 0,
        "device": f"cuda:{device_index} ({torch.cuda.get_device_name(device_index)})" if cuda else "cpu",
        "gpu_uuid": str(torch.cuda.get_device_properties(device_index).uuid) if cuda else None,
        "config_sha": hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:12],
        "launcher_precision": os.environ.get("ACCELERATE_MIXED_PRECISION"),
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
    }


def _problems(views: list[dict], cfg) -> list[str]:
    """Everything wrong with the job, judged from all ranks' views (the same list on every rank)."""
    problems = []
    world = len(views)
    hosts = Counter(v["host"] for v in views)
    slurm_nodes = views[0]["slurm"].get("SLURM_NNODES")
    if slurm_nodes and int(slurm_nodes) != len(hosts):
        problems.append(
            f"processes != nodes x GPUs: the SLURM allocation has {slurm_nodes} nodes but the {world} ranks run on "
            f"{len(hosts)} ({', '.join(sorted(hosts))}); start one launcher per node (srun --ntasks-per-node=1) with "
            "--num_machines $SLURM_NNODES and --machine_rank $SLURM_NODEID expanded inside the task"
        )
    for host, count in sorted(hosts.items()):
        gpus = next(v["gpus_on_node"] for v in views if v["host"] == host)
        if gpus and count != gpus:
            problems.append(
                f"processes != nodes x GPUs: {count} processes on {host}, which has {gpus} GPUs "
                f"({len(hosts)} nodes x {gpus} GPUs = {len(hosts) * gpus} processes expected, launched {world}); "
                "set --num_processes to nodes x GPUs per node"
            )
    shared = Counter(v["gpu_uuid"] for v in views if v["gpu_uuid"])
    for uuid, count in shared.items():
        if count > 1:
            ranks = [v["rank"] for v in views if v["gpu_uuid"] == uuid]
            problems.append(f"ranks {ranks} share one GPU ({uuid}); check CUDA_VISIBLE_DEVICES and the process count")
    shas = Counter(v["config_sha"] for v in views)
    if len(shas) > 1:
        majority = shas.most_common(1)[0][0]
        odd = [v["rank"] for v in views if v["config_sha"] != majority]
        problems.append(
            f"ranks disagree on the resolved config: rank(s) {odd} resolved a different config than the others "
            "(a stale copy of the YAML file on some node, or different arguments); use one shared file"
        )
    launcher = views[0]["launcher_precision"]
    if launcher and launcher != "no" and launcher != cfg.mixed_precision:
        problems.append(
            f"mixed precision: the launch config says {launcher} but the run config says {cfg.mixed_precision} "
            f"(dist_train uses the run config's); set mixed_precision: {launcher} in the run config or change the launch config"
        )
    return problems


def _report(views: list[dict], accelerator, cfg) -> None:
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "none (single process)"
    _say(
        f"world size {len(views)} on {len({v['host'] for v in views})} node(s); backend {backend}; "
        f"distributed type {accelerator.distributed_type.value}; mixed precision {cfg.mixed_precision}"
    )
    for v in views:
        _say(
            f"  rank {v['rank']:>3}  local rank {v['local_rank']:>2}/{v['local_world_size']}  node {v['host']}  "
            f"device {v['device']}  config {v['config_sha']}"
        )
    for key, value in views[0]["slurm"].items():
        _say(f"  {key}={value}")


def run_doctor(cfg, timeout_s: float) -> int:
    """Check the launch; 0 if it is sound, 1 (with the cause printed by the main process) if not."""
    import dataclasses

    import torch
    from accelerate.utils import gather_object

    from .loop import make_accelerator

    unreachable = check_main_address(min(timeout_s, 10.0))
    if unreachable:
        # Only this rank knows; it cannot tell the others (no group yet), and they fail at init.
        print(f"dist-train doctor: FAILED: {unreachable}", file=sys.stderr, flush=True)
        return 1
    # A short collective timeout: a missing or stuck rank fails the smoke test instead of hanging.
    try:
        accelerator = make_accelerator(dataclasses.replace(cfg, collective_timeout_s=max(1, int(timeout_s))))
    except (RuntimeError, OSError) as exc:  # DistStoreError, DistNetworkError: the group never formed
        return _failed(f"the process group did not form on rank {os.environ.get('RANK', '0')}", "", timeout_s, exc)
    try:
        views = gather_object([_local_view(cfg)])
        total = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")
    except Exception as exc:  # a timeout or a dead peer surfaces as the backend's own error type
        return _failed(f"all_reduce smoke test on rank {accelerator.process_index}", "did not complete ", timeout_s, exc)
    views.sort(key=lambda v: v["rank"])
    problems = _problems(views, cfg)
    total = int(total.item())
    sum_ok = total == accelerator.num_processes
    if not sum_ok:
        problems.append(
            f"all_reduce smoke test returned {total}, expected {accelerator.num_processes} (one per rank); "
            "the backend or the network between the nodes corrupts collectives"
        )
    if accelerator.is_main_process:
        _report(views, accelerator, cfg)
        _say(f"all_reduce across {accelerator.num_processes} ranks: " + ("ok" if sum_ok else f"FAILED (sum {total})"))
        for problem in problems:
            print(f"dist-train doctor: FAILED: {problem}", file=sys.stderr, flush=True)
        if not problems:
            _say("OK: the launch is consistent")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 1 if problems else 0


def _failed(what: str, verb: str, timeout_s: float, exc: BaseException) -> int:
    """One line naming what failed on which rank and host, and the backend's first line; exit status 1."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(
        f"dist-train doctor: FAILED: {what} ({socket.gethostname()}) {verb}within {timeout_s:.0f} s: {first_line}",
        file=sys.stderr,
        flush=True,
    )
    return 1
