"""The training loop: the seed's loop, on Accelerate.

    python -m dist_train train --config run.yaml                      # one process: GPU if present, else CPU
    accelerate launch --config_file launch_configs/cpu.yaml \\
        -m dist_train train --config run.yaml                         # 2 CPU processes over gloo
    accelerate launch --config_file launch_configs/multi_gpu.yaml \\
        -m dist_train train --config run.yaml                         # every local GPU (DDP)

`train` is the spec: a reader sees forward, loss, `accelerator.backward`, step, zero_grad and the
validation pass in it, top to bottom. Components (metrics, early stopping) decide for themselves
when they act; the loop calls them at step boundaries.
"""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from .batch_size import fit_batch_size
from .checkpoint import Checkpointer
from .config import Config
from .data import build_loaders, epoch_sampler, split_batch
from .errors import UserError
from .evaluate import evaluate
from .lean import PLAIN_BACKENDS, LeanOptimizer, can_fuse
from .metrics import MetricsLogger
from .plot import plot_if_available
from .plugins import Loss, build_model, build_optimizer
from .preemption import Preemption
from .profiling import StepProfiler
from .schedule import build_scheduler
from .state import TrainState
from .stopping import EarlyStopping


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator; refuses to become one of N lone trainings."""
    cuda = torch.cuda.is_available() and not cfg.cpu
    if cfg.mixed_precision == "fp16" and not cuda:
        raise UserError("mixed_precision: fp16 needs a CUDA GPU (its loss scaler is GPU-only); use bf16 on CPU, or no.")
    accelerator = Accelerator(
        cpu=not cuda,  # without a GPU, CPU mode is what makes N launched processes join one gloo group
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        # One scheduler step per optimizer step, whatever the world size: our schedules count optimizer steps.
        step_scheduler_with_optimizer=False,
        # non_blocking: host-to-GPU copies of the (pinned, see data.py) batches overlap with compute.
        dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=cuda),
        dynamo_backend="inductor" if cfg.compile else None,
        log_with=[t for t in cfg.log_with] or None,
        project_dir=cfg.output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
    )
    launched_world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_world_size:
        raise UserError(
            f"Launched as {launched_world_size} processes (WORLD_SIZE) but Accelerate formed a job of "
            f"{accelerator.num_processes}; each process would train alone. Launch with a multi-process "
            "config (launch_configs/cpu.yaml on CPU, multi_gpu.yaml on GPUs)."
        )
    return accelerator


def _prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output_dir {cfg.output_dir!r} cannot be written ({exc.strerror}); choose another output_dir.") from None
        (out / "config.yaml").write_text(cfg.to_yaml())
    accelerator.wait_for_everyone()
    return out


def _build(cfg: Config, accelerator: Accelerator) -> tuple:
    """Model, optimizer and loaders at `cfg.batch_size`, prepared (again on each auto_batch_size attempt)."""
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.model_args)
    fused = can_fuse(model, cfg.mixed_precision, accelerator.distributed_type)  # torch's fused optimizer where it is exact
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum, fused=fused)
    train_loader, val_loader = build_loaders(cfg, accelerator.num_processes)
    return accelerator.prepare(model, optimizer, train_loader, val_loader)


def _total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.fast_dev_run:
        total = math.ceil(cfg.fast_dev_run / cfg.grad_accum_steps)
    else:
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if cfg.warmup_steps > total and not cfg.fast_dev_run:  # a smoke test of the real config stays valid
        raise UserError(f"warmup_steps ({cfg.warmup_steps}) is larger than the run's {total} optimizer steps; lower warmup_steps.")
    return total


def _epoch_limit(cfg: Config) -> float:
    """Epochs to run: `max_steps` and `fast_dev_run` count steps instead, across as many epochs as they need."""
    return math.inf if cfg.max_steps is not None or cfg.fast_dev_run else cfg.epochs


def _grad_norm(accelerator: Accelerator, parameters: list, max_grad_norm: float | None) -> torch.Tensor:
    """The global gradient norm, clipped to `max_grad_norm` when set (Accelerate unscales fp16 first)."""
    if max_grad_norm is not None or accelerator.distributed_type not in PLAIN_BACKENDS:
        # (FSDP shards the gradients and DeepSpeed owns them: only Accelerate knows their global norm.)
        return accelerator.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm is not None else math.inf)
    # Nothing to clip: only the norm (clipping to inf would still multiply every gradient by 1).
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def _nonfinite_error(accelerator: Accelerator, step_loss: torch.Tensor, state: TrainState, batch_index: int, cfg: Config) -> UserError:
    # All ranks get here together (the gradient norm is the same on every rank after the all-reduce),
    # so gathering which ranks saw a non-finite loss is a safe collective.
    bad = accelerator.gather((~torch.isfinite(step_loss)).reshape(1).int())
    ranks = [rank for rank, flag in enumerate(bad.tolist()) if flag] or "none (the loss was finite; a gradient was not)"
    return UserError(
        f"Non-finite loss or gradient at optimizer step {state.optimizer_step + 1} (epoch {state.epoch}, "
        f"batch {batch_index}) on rank(s) {ranks}. Existing checkpoints in {cfg.output_dir} are untouched. "
        "Lower lr, set max_grad_norm, or set on_nonfinite: skip to drop such updates."
    )


def train(cfg: Config) -> dict:
    """Run the configured training; return the last validation record."""
    accelerator = make_accelerator(cfg)
    out = _prepare_output_dir(cfg, accelerator)

    loss_fn = Loss(cfg.loss)
    # With auto_batch_size, cfg comes back with the batch size that fits on every rank (saved to config.yaml).
    cfg, (model, optimizer, train_loader, val_loader) = fit_batch_size(cfg, accelerator, lambda c: _build(c, accelerator), loss_fn)
    sampler = epoch_sampler(train_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total_steps = _total_steps(cfg, steps_per_epoch)
    optimizer = LeanOptimizer(optimizer)  # Accelerate's step/zero_grad semantics without its per-step overhead
    parameters = [p for p in model.parameters() if p.requires_grad]  # listed once, not per step
    scheduler = accelerator.prepare(build_scheduler(cfg, optimizer.stepped, total_steps))
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    checkpointer = Checkpointer(cfg, accelerator, state)
    checkpointer.resume()  # before anything reads `state` (progress bar, profiler, the stop test)
    preemption = Preemption(accelerator)  # SIGUSR1/SIGTERM only set a flag; acted on between steps

    metrics = MetricsLogger(cfg, accelerator, resumed_step=state.optimizer_step)
    early_stopping = EarlyStopping(cfg)
    global_batch_size = cfg.batch_size * accelerator.num_processes
    max_batches = cfg.fast_dev_run or None
    progress = tqdm(
        total=total_steps, initial=state.optimizer_step, unit="step", dynamic_ncols=True,
        disable=not (accelerator.is_main_process and cfg.progress and os.isatty(1)),
    )
    anomaly = torch.autograd.detect_anomaly() if cfg.detect_anomaly else contextlib.nullcontext()
    profiler = StepProfiler(cfg.profile_steps, out, accelerator.process_index, accelerator.device)
    last_eval: dict = {}

    with anomaly, profiler:
        profiler.start_at(state.optimizer_step)
        stop = state.epoch >= _epoch_limit(cfg) or state.optimizer_step >= total_steps or early_stopping.should_stop(state)
        while not stop:
            model.train()
            if sampler is not None:
                sampler.set_position(state.epoch, state.samples_consumed)
            step_loss = torch.zeros((), device=accelerator.device)
            for batch_index, batch in enumerate(train_loader):
                inputs, targets = split_batch(batch, cfg.data)
                with accelerator.accumulate(model):
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
                    accelerator.backward(loss)
                    metrics.observe(loss, inputs)
                    step_loss += loss.detach()
                    state.samples_consumed += global_batch_size
                    if accelerator.sync_gradients:
                        grad_norm = _grad_norm(accelerator, parameters, cfg.max_grad_norm)
                        # One host read per optimizer step, kept on purpose: the update must be dropped (skip)
                        # or the run stopped (stop) before optimizer.step() applies it. On CPU it is no sync
                        # at all; on a GPU it costs one launch latency per step (bench/RESULTS.md). The norm
                        # is identical on every rank after DDP's all-reduce: all ranks take the same branch.
                        finite = cfg.mixed_precision == "fp16" or bool(torch.isfinite(grad_norm))
                        if not finite and cfg.on_nonfinite == "stop":
                            raise _nonfinite_error(accelerator, step_loss, state, batch_index, cfg)
                    # Accelerate turns step and zero_grad into no-ops between accumulation boundaries;
                    # zero_grad comes after step so the micro-batches of one step add up.
                    if not accelerator.sync_gradients or finite:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue

                # ---- an optimizer step has completed ----
                step_loss.zero_()
                lr = scheduler.get_last_lr()[0]  # the rate this step used; scheduler.step() sets the next one
                if not finite:
                    state.nonfinite_skipped += 1
                elif accelerator.optimizer_step_was_skipped:
                    state.overflow_skipped += 1  # fp16 overflow: the scaler skipped; so does the schedule
                else:
                    scheduler.step()
                state.optimizer_step += 1
                profiler.step(state.optimizer_step)
                progress.update(1)
                record = metrics.log_step(state, lr, grad_norm)
                if record is not None:
                    progress.set_postfix(loss=f"{record['train_loss']:.4g}", lr=f"{record['lr']:.3g}", samples_s=f"{record['samples_per_s']:.0f}")
                stop = state.optimizer_step >= total_steps
                if cfg.eval_every and state.optimizer_step % cfg.eval_every == 0:
                    last_eval, stop_early = _validate(model, val_loader, loss_fn, accelerator, cfg, state, metrics, early_stopping, max_batches)
                    stop = stop or stop_early
                with metrics.untimed():
                    checkpointer.save_if_due(epoch_end=False, record=last_eval)
                # An epoch's last step is left to the epoch-end check, so a resume never starts in an empty remainder.
                if not stop and not accelerator.gradient_state.end_of_dataloader and preemption.requested():
                    train_loader.end()
                    return _leave_for_requeue(accelerator, checkpointer, preemption, progress, metrics)
                if stop:
                    train_loader.end()  # leaving mid-epoch: tell Accelerate's gradient state this loader is done
                    break
            epoch_finished = not stop

            if last_eval.get("step") != state.optimizer_step:
                last_eval, stop_early = _validate(model, val_loader, loss_fn, accelerator, cfg, state, metrics, early_stopping, max_batches)
                stop = stop or stop_early
            if epoch_finished:
                # The next epoch starts at the beginning of its own order.
                state.epoch, state.samples_consumed = state.epoch + 1, 0
            stop = stop or state.epoch >= _epoch_limit(cfg)
            with metrics.untimed():
                checkpointer.save_if_due(epoch_end=True, record=last_eval)
            if not stop and preemption.requested():
                return _leave_for_requeue(accelerator, checkpointer, preemption, progress, metrics)

    progress.close()
    metrics.close()
    if not cfg.fast_dev_run:
        # compile: true wraps the prepared model once more; its keys would gain an `_orig_mod.` prefix.
        accelerator.save_model(getattr(model, "_orig_mod", model), out, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        plot_if_available(out)  # curves.png, when matplotlib is installed
        summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items())
        print(f"dist_train: finished at optimizer step {state.optimizer_step}: {summary}")
        print(f"dist_train: outputs in {out.resolve()} (config.yaml, metrics.jsonl, model.safetensors)")
    preemption.close()
    accelerator.end_training()
    return last_eval


def _leave_for_requeue(accelerator, checkpointer, preemption, progress, metrics) -> dict:
    """Preempted (all ranks agree): checkpoint now, requeue under SLURM, and end the run with exit 0."""
    path = checkpointer.save()
    preemption.requeue()
    progress.close()
    metrics.close()
    preemption.close()
    accelerator.end_training()
    return {"preempted": preemption.signal_name or "another rank", "checkpoint": str(path)}


def _validate(model, val_loader, loss_fn, accelerator, cfg, state, metrics, early_stopping, max_batches) -> tuple[dict, bool]:
    """One validation pass, logged; returns the record and early stopping's verdict, agreed by all ranks."""
    with metrics.untimed():
        val_metrics = evaluate(model, val_loader, loss_fn, accelerator, cfg.data, max_batches)
    record = metrics.log_eval(state, val_metrics)
    early_stopping.update(state, record)
    if early_stopping.should_stop(state):
        accelerator.set_trigger()
    return record, accelerator.check_trigger()
