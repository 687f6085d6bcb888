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
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    broadcast_object_list,
    set_seed,
)
from tqdm.auto import tqdm

from .accelerate_internals import LeanOptimizer, broadcast_buffers, check_launch_backend, fix_ddp_bucket_order, shard_on_cpu
from .checkpoint import Checkpointer, RunLock
from .components import (
    EMA,
    Loss,
    MetricsLogger,
    NonfiniteGuard,
    StepProfiler,
    UnusedParameterCheck,
    apply_config,
    build_optimizer,
    build_scheduler,
    can_fuse,
    check_trackers_installed,
    plot_if_available,
)
from .components import grad_norm as _grad_norm
from .config import Config, resolve_modes
from .data import (
    build_loaders,
    call_model,
    fit_batch_size,
    planned_steps,
    prepare_loaders,
    replanned,
    split_batch,
    train_position,
    weighed,
)
from .errors import UserError
from .evaluation import Validator
from .faults import (
    HangWatchdog,
    LauncherWatch,
    Preemption,
    StragglerMonitor,
    begin_attempt,
    clear_stale,
    enable_flight_recorder,
    process_group_kwargs,
)
from .plugins import build_model
from .state import TrainState


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator; refuses to become one of N lone trainings."""
    cuda = torch.cuda.is_available() and not cfg.cpu
    if cfg.mixed_precision == "fp16" and not cuda:
        raise UserError("mixed_precision: fp16 needs a CUDA GPU (its loss scaler is GPU-only); use bf16 on CPU, or no.")
    check_launch_backend(has_gpu=cuda)  # FSDP1 or DeepSpeed where they cannot run: one line, before Accelerate raises
    if cuda and cfg.hang_timeout_s:
        enable_flight_recorder(Path(cfg.output_dir) / "diagnostics")  # before NCCL's process group exists
    # startup_timeout_s to form the group; per-attempt store keys under an elastic agent (faults/restarts.py).
    process_group = process_group_kwargs(cfg)
    accelerator = Accelerator(
        cpu=not cuda,  # without a GPU, CPU mode is what makes N launched processes join one gloo group
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        # One scheduler step per optimizer step, whatever the world size: our schedules count optimizer steps.
        step_scheduler_with_optimizer=False,
        # non_blocking: host-to-GPU copies of the (pinned, see data/loaders.py) batches overlap with compute.
        dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=cuda),
        dynamo_backend="inductor" if cfg.compile else None,
        log_with=[t for t in cfg.log_with] or None,
        project_dir=cfg.output_dir,
        kwargs_handlers=[
            process_group,
            DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters),
        ],
    )
    shard_on_cpu(accelerator, cfg.mixed_precision)  # FSDP2 on gloo where Accelerate would fall back to DDP
    launched_world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_world_size:
        raise UserError(
            f"Launched as {launched_world_size} processes (WORLD_SIZE) but Accelerate formed a job of "
            f"{accelerator.num_processes}; each process would train alone. Launch with a multi-process "
            "config (launch_configs/cpu.yaml on CPU, multi_gpu.yaml on GPUs)."
        )
    begin_attempt(cfg, accelerator, process_group)  # collective_timeout_s after the first step; restart ledger
    return accelerator


def _prepare_output_dir(cfg: Config, accelerator: Accelerator, teardown: contextlib.ExitStack) -> Path:
    """The run's output_dir, writable and locked for this run alone (by the main process)."""
    out, error = Path(cfg.output_dir), None
    if accelerator.is_main_process:
        try:
            teardown.enter_context(RunLock(out))  # before anything is read or written there
            probe = out / ".write_test"
            probe.write_text("ok")
            probe.unlink()
            clear_stale(out)  # a previous run's hang report must not stop this one
        except UserError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"output_dir {cfg.output_dir!r} cannot be written ({exc.strerror}); choose another output_dir."
    error = broadcast_object_list([error])[0]  # every rank stops, not only the main process
    if error:
        raise UserError(error)
    return out


def _build(cfg: Config, accelerator: Accelerator) -> tuple:
    """Model, optimizer and loaders at `cfg.batch_size`, prepared (again on each auto_batch_size attempt)."""
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.model_args)
    fused = can_fuse(model, cfg.mixed_precision, accelerator.distributed_type)  # torch's fused optimizer where it is exact
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum, fused=fused)
    train_loader, val_loader = build_loaders(cfg, accelerator.num_processes)
    prepared = prepare_loaders(accelerator, model, optimizer, train_loader, val_loader)  # accelerator.prepare; per-rank streams as they are
    fix_ddp_bucket_order(prepared[0])  # so a resumed run reduces exactly as an uninterrupted one
    return prepared


def _epoch_limit(cfg: Config) -> float:
    """Epochs to run: `max_steps` counts steps instead, across as many epochs as it needs."""
    return math.inf if cfg.max_steps is not None else cfg.epochs


def train(cfg: Config) -> dict:
    """Run the configured training; return the last validation record (or, when preempted, where it saved)."""
    with contextlib.ExitStack() as teardown:  # every exit, normal, preempted or failed, closes what it opened
        return _train(cfg, teardown)


def _train(cfg: Config, teardown: contextlib.ExitStack) -> dict:
    launcher = LauncherWatch()  # the process that started this rank, noted before anything slow (faults/launcher.py)
    cfg = resolve_modes(cfg)  # fast_dev_run becomes the ordinary settings it stands for, once
    check_trackers_installed(cfg.log_with)  # Accelerate itself would only warn and drop a missing one
    accelerator = make_accelerator(cfg)
    teardown.callback(lambda: _end_trackers(accelerator))
    out = _prepare_output_dir(cfg, accelerator, teardown)

    loss_fn = Loss(cfg.loss)
    # With auto_batch_size, cfg comes back with the batch size that fits on every rank (saved to config.yaml).
    cfg, (model, optimizer, train_loader, val_loader) = fit_batch_size(cfg, accelerator, lambda c: _build(c, accelerator), loss_fn)
    sampler = train_position(train_loader)  # where each epoch starts: dist_train's order, or the stream's saved state

    state = TrainState()
    total_steps = planned_steps(cfg, sampler, train_loader, state)  # a fresh run's; recomputed after a resume below
    optimizer = LeanOptimizer(optimizer)  # Accelerate's step/zero_grad semantics without its per-step overhead
    parameters = [p for p in model.parameters() if p.requires_grad]  # listed once, not per step
    scheduler = accelerator.prepare(build_scheduler(cfg, optimizer.stepped, total_steps))
    accelerator.register_for_checkpointing(state)
    ema = EMA(cfg, model) if cfg.ema_decay is not None else None  # the EMA weights, per shard under FSDP (ema.py)
    checkpointer = Checkpointer(cfg, accelerator, state, model, optimizer.accelerated, scheduler)
    teardown.callback(checkpointer.close)  # a background checkpoint write finishes on every exit
    if ema is not None:
        ema.attach(accelerator, checkpointer)  # into every checkpoint: registered, or in shards under FSDP2
    # Before anything reads `state` (progress bar, profiler, the stop test). A mid-epoch position is restored
    # exactly or refused (never an epoch silently started again): the order's offset, or the stream's position.
    checkpointer.resume(sampler)
    # From where the run stands: a resume with another step size (batch, accumulation, world size) or epochs.
    total_steps = planned_steps(cfg, sampler, train_loader, state)
    if accelerator.is_main_process and (line := replanned(state.planned_steps, total_steps, state, cfg)):
        print(line, flush=True)
    state.planned_steps = int(total_steps) if math.isfinite(total_steps) else None
    apply_config(optimizer.stepped, scheduler.scheduler, cfg, total_steps)  # this config's lr and schedule, not the checkpoint's
    if accelerator.is_main_process:  # only now: a refused resume leaves the previous run's config.yaml as it was
        (out / "config.yaml").write_text(cfg.to_yaml())  # the config that runs (auto_batch_size's size included)
    # SIGUSR1/SIGTERM only set a flag, as the launcher's death does; acted on between steps
    preemption = teardown.enter_context(Preemption(accelerator, launcher))

    watchdog = teardown.enter_context(HangWatchdog(cfg.hang_timeout_s, out, accelerator.process_index, accelerator.num_processes))
    watchdog.at("step boundary", step=state.optimizer_step)
    stragglers = StragglerMonitor(accelerator)
    metrics = teardown.enter_context(
        MetricsLogger(
            cfg,
            accelerator,
            resumed_step=state.optimizer_step,
            resumed_losses=state.open_losses,
            rank_times=lambda steps: stragglers.record(watchdog.take_own_s(), steps),
            data_wait_s=watchdog.take_data_s,
        )
    )
    checkpointer.before_save.append(lambda: metrics.carry_into(state))  # the unlogged loss sums go into checkpoints
    checkpointer.before_save.append(lambda: broadcast_buffers(accelerator, model))  # FSDP: one set of buffers saved
    validator = Validator(cfg, accelerator, model, val_loader, loss_fn, metrics, watchdog, ema)
    guard = NonfiniteGuard(cfg, accelerator, model)
    unused = UnusedParameterCheck(cfg, accelerator, model)
    micro_batch_samples = cfg.batch_size * accelerator.num_processes
    progress = teardown.enter_context(_progress_bar(cfg, accelerator, total_steps, state.optimizer_step))
    teardown.enter_context(torch.autograd.detect_anomaly() if cfg.detect_anomaly else contextlib.nullcontext())
    profiler = teardown.enter_context(StepProfiler(cfg.profile_steps, out, accelerator.process_index, accelerator.device))
    profiler.start_at(state.optimizer_step)

    stop = state.epoch >= _epoch_limit(cfg) or state.optimizer_step >= total_steps or validator.should_stop(state)
    if stop and accelerator.is_main_process:
        print(
            f"dist_train: nothing to train: the run in {out} is finished at optimizer step {state.optimizer_step} "
            "(raise epochs or max_steps to continue it)",
            flush=True,
        )
    while not stop:
        model.train()
        if sampler is not None:
            sampler.set_position(state.epoch, state.samples_consumed)
        step_loss = torch.zeros((), device=accelerator.device)
        for batch_index, batch in enumerate(train_loader):
            # weight: 1, but where a step's batches are not all full: this rank's share of its samples (data/epoch.py).
            batch, weight = weighed(sampler, batch, batch_index, accelerator.process_index)
            inputs, targets = split_batch(batch, cfg.data, loss_fn.model_computes)
            with accelerator.accumulate(model):
                guard.before_forward()
                watchdog.at("forward")  # progress marks: a hang names the rank and phase (watchdog.py)
                if not weight:  # no sample of its own in the last step: a stand-in batch, for DDP's reduction only
                    model.eval()  # buffers (BatchNorm statistics) untouched, no dropout drawn
                with metrics.throughput.count(inputs):  # FLOPs of the first micro-batch only (throughput.py)
                    outputs = call_model(model, inputs)  # model(inputs), or model(**batch) for a dict batch
                    loss = loss_fn(outputs, targets)
                    watchdog.at("backward")
                    accelerator.backward(loss if weight == 1 else loss * weight)  # weight 0: a zero gradient
                if not weight:
                    model.train()
                unused.after_backward()
                metrics.observe(loss, inputs, weight)  # every rank: its sums are reduced together
                step_loss += loss.detach()
                state.samples_consumed += micro_batch_samples
                if accelerator.sync_gradients:
                    watchdog.at("optimizer")
                    grad_norm = _grad_norm(accelerator, parameters, cfg.max_grad_norm)
                    finite = guard.update_is_finite(grad_norm, step_loss, state, batch_index)
                # Accelerate turns step and zero_grad into no-ops between accumulation boundaries;
                # zero_grad comes after step so the micro-batches of one step add up.
                if not accelerator.sync_gradients or finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                watchdog.at("data")
                continue

            # ---- the step boundary: the one place where the run's position moves and decisions are made ----
            step_loss.zero_()
            lr = scheduler.get_last_lr()[0]  # the rate this step used; scheduler.step() sets the next one
            if not finite:
                state.nonfinite_skipped += 1
            elif accelerator.optimizer_step_was_skipped:
                state.overflow_skipped += 1  # fp16 overflow: the scaler skipped; so does the schedule
            else:
                scheduler.step()
            state.optimizer_step += 1
            if ema is not None:
                ema.after_step(state.optimizer_step, stepped=finite and not accelerator.optimizer_step_was_skipped)
            watchdog.at("step boundary", step=state.optimizer_step)
            epoch_ended = accelerator.gradient_state.end_of_dataloader
            last_step = state.optimizer_step >= total_steps or (epoch_ended and state.epoch + 1 >= _epoch_limit(cfg))
            profiler.step(state.optimizer_step)
            progress.update(1)
            record = metrics.log_step(state, lr, grad_norm)
            if record is not None:
                progress.set_postfix(
                    loss=f"{record['train_loss']:.4g}", lr=f"{record['lr']:.3g}", samples_s=f"{record['samples_per_s']:.0f}"
                )
            stop = validator.after_step(state, epoch_ended=epoch_ended, last_step=last_step) or last_step
            if epoch_ended:  # the position after an epoch's last step is the start of the next epoch
                state.epoch, state.samples_consumed = state.epoch + 1, 0
            watchdog.at("checkpoint")
            with metrics.untimed():
                checkpointer.save_if_due(epoch_ended=epoch_ended, last_step=stop, record=validator.last)
            watchdog.at("data")
            if not stop and preemption.requested():
                if not epoch_ended:
                    train_loader.end()  # leaving mid-epoch: tell Accelerate's gradient state this loader is done
                return _leave_for_requeue(checkpointer, preemption, validator.last)
            if stop or epoch_ended:
                if not epoch_ended:
                    train_loader.end()
                break
        else:
            # The loader had nothing left (a checkpoint at the very end of an epoch's data, written by an
            # older dist_train or with another global batch): that epoch is over.
            if state.samples_consumed == 0:
                raise UserError(f"data: the training loader from {cfg.data!r} yielded no batch for epoch {state.epoch}.")
            state.epoch, state.samples_consumed = state.epoch + 1, 0
            stop = state.epoch >= _epoch_limit(cfg)

    checkpointer.wait()  # the last checkpoint is complete before the run reports success
    if cfg.checkpoints:
        checkpointer.save_final(model)
        if ema is not None:
            with ema.applied():
                checkpointer.save_final(model, subfolder="ema")  # output_dir/ema/model.safetensors
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.plot:
            plot_if_available(out)  # curves.png, when matplotlib is installed
        summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in validator.last.items())
        print(f"dist_train: finished at optimizer step {state.optimizer_step}" + (f": {summary}" if summary else ""))
        print(f"dist_train: outputs in {out.resolve()} (config.yaml, metrics.jsonl, model.safetensors)")
    return validator.last


def _progress_bar(cfg: Config, accelerator: Accelerator, total_steps: float, initial: int) -> tqdm:
    return tqdm(
        total=total_steps if math.isfinite(total_steps) else None,  # a stream without a length: no total
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not (accelerator.is_main_process and cfg.progress and os.isatty(1)),
    )


def _end_trackers(accelerator: Accelerator) -> None:
    # `accelerator.end_training()` finishes the trackers and destroys the process group, last of all.
    accelerator.end_training()


def _leave_for_requeue(checkpointer: Checkpointer, preemption: Preemption, last_eval: dict) -> dict:
    """Preempted (all ranks agree): checkpoint now, requeue under SLURM; the exit status says whether it will go on."""
    path = checkpointer.save(last_eval, wait=True)  # complete before the requeue or the exit
    requeued = preemption.requeue()
    return {
        "preempted": preemption.signal_name or "another rank",
        "checkpoint": str(path),
        "requeued": requeued,
        "exit_code": 0 if requeued else preemption.exit_code,
    }
