"""Auto batch size: the largest `batch_size` (halving from the configured one) that fits on every rank.

With `auto_batch_size: true` the loop builds the model, optimizer and loaders through `fit_batch_size`,
which runs Accelerate's `find_executable_batch_size` in function form (the decorator form ignores
`reduce_batch_size_fn`). Each attempt builds everything at the candidate size, then probes it: one
forward and backward of this rank's first training batch, without DDP's gradient all-reduce. A rank
that runs out of memory must not leave the others waiting in a collective, so the ranks then agree
(one tiny all-gather) whether any of them ran out; if so all raise the out-of-memory error together,
`free_memory` drops everything Accelerate holds, and the next size is the minimum of what the ranks
propose (half the current size). The probe leaves the model, its buffers and every RNG as it found
them, so a run whose configured size fits is the run without `auto_batch_size`.

What it does not cover: an out-of-memory error later in training (e.g. a longer batch than the first)
still fails the run; with several processes it cannot be retried without a rank hanging. Under FSDP the
probe's forward and backward are collective (parameters are gathered per unit), so the ranks must run out
at the same size, as identical GPUs with equal shards do; a rank that runs out alone leaves the others in
an all-gather (docs/fsdp.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, find_executable_batch_size

from ..accelerate_internals import is_out_of_memory
from ..config import Config
from ..errors import UserError
from .batches import batch_size_of, call_model, split_batch
from .streams import Dealt


def _probe(accelerator: Accelerator, model, optimizer, train_loader, loss_fn, cfg: Config) -> bool:
    """Whether one training step at the loader's batch size runs out of memory on this rank."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    out_of_memory = False
    # Under FSDP2 a backward inside no_sync keeps its gradients unsharded, outside `.grad` where zero_grad cannot
    # clear them, and adds them into the next synced backward: the first training step. Its forward is collective
    # anyway (every rank probes), so there the probe's backward reduces like a training one and zero_grad clears it.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    with torch.random.fork_rng(devices=devices), contextlib.nullcontext() if fsdp else accelerator.no_sync(model):
        batch = next(iter(train_loader))
        batch = batch.batch if isinstance(batch, Dealt) else batch  # a stream's: its rows, padding included (no more than a batch)
        train_loader.end()  # left after one batch: tell Accelerate's gradient state this loader is done
        inputs, targets = split_batch(batch, cfg.data, loss_fn.model_computes)
        samples = batch_size_of(inputs, targets)
        if samples > cfg.batch_size:
            raise UserError(
                f"auto_batch_size: the training loader yields batches of {samples}, not batch_size {cfg.batch_size}; "
                "build the DataLoader in get_dataloader with batch_size=cfg.batch_size so the size can shrink."
            )
        try:
            accelerator.backward(loss_fn(call_model(model, inputs), targets))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True
        del batch, inputs, targets
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])  # e.g. BatchNorm statistics: the probe must not count as training
    return out_of_memory


def fit_batch_size(cfg: Config, accelerator: Accelerator, build: Callable[[Config], tuple], loss_fn) -> tuple[Config, tuple]:
    """`build(cfg)` (returns prepared model, optimizer, train loader, val loader) at a batch size that fits.

    Returns the config with the batch size used (unchanged without `auto_batch_size`) and what `build` returned.
    """
    if not cfg.auto_batch_size:
        return cfg, build(cfg)
    current = cfg.batch_size

    def attempt(batch_size: int) -> tuple[Config, tuple]:
        nonlocal current
        current = batch_size
        trial = dataclasses.replace(cfg, batch_size=batch_size)
        built = build(trial)
        model, optimizer, train_loader, _ = built
        oom = _probe(accelerator, model, optimizer, train_loader, loss_fn, trial)
        if accelerator.gather(torch.tensor([int(oom)], device=accelerator.device)).any():
            del model, optimizer, train_loader, built
            accelerator.free_memory()
            # should_reduce_batch_size recognises this message, so find_executable_batch_size retries.
            raise torch.OutOfMemoryError(f"auto_batch_size: batch_size {batch_size} ran out of memory. on at least one rank")
        return trial, built

    def agreed_smaller() -> int:
        """Half the current size, the minimum over the ranks (they may disagree after different failures)."""
        proposal = torch.tensor([current // 2], device=accelerator.device)
        smaller = int(accelerator.gather(proposal).min())
        if smaller < 1:
            raise UserError(
                "auto_batch_size: even batch_size 1 runs out of memory; use a smaller model or more memory "
                "(and check that get_dataloader uses cfg.batch_size)."
            )
        if accelerator.is_main_process:
            print(f"dist_train: auto_batch_size: batch_size {current} does not fit; trying {smaller}", flush=True)
        return smaller

    fitted, built = find_executable_batch_size(attempt, starting_batch_size=cfg.batch_size, reduce_batch_size_fn=agreed_smaller)()
    if accelerator.is_main_process and fitted.batch_size != cfg.batch_size:
        print(f"dist_train: auto_batch_size: training with batch_size {fitted.batch_size} per process", flush=True)
    return fitted, built
