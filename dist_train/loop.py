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

from .config import Config
from .data import build_loaders, epoch_sampler, split_batch
from .errors import UserError
from .evaluate import evaluate
from .metrics import MetricsLogger
from .plugins import Loss, build_model, build_optimizer
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
        dataloader_config=DataLoaderConfiguration(even_batches=True),
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


def _total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.fast_dev_run:
        return math.ceil(cfg.fast_dev_run / cfg.grad_accum_steps)
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def _grad_norm(accelerator: Accelerator, model, max_grad_norm: float | None) -> torch.Tensor:
    """The global gradient norm, clipped to `max_grad_norm` when set (Accelerate unscales fp16 first)."""
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm is not None else math.inf)


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
    set_seed(cfg.seed)

    model = build_model(cfg.model, cfg.model_args)
    loss_fn = Loss(cfg.loss)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    train_loader, val_loader = build_loaders(cfg, accelerator.num_processes)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    sampler = epoch_sampler(train_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total_steps = _total_steps(cfg, steps_per_epoch)
    scheduler = accelerator.prepare(build_scheduler(cfg, optimizer, total_steps))
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    metrics = MetricsLogger(cfg, accelerator)
    early_stopping = EarlyStopping(cfg)
    global_batch_size = cfg.batch_size * accelerator.num_processes
    max_batches = cfg.fast_dev_run or None
    progress = tqdm(
        total=total_steps, initial=state.optimizer_step, unit="step", dynamic_ncols=True,
        disable=not (accelerator.is_main_process and cfg.progress and os.isatty(1)),
    )
    anomaly = torch.autograd.detect_anomaly() if cfg.detect_anomaly else contextlib.nullcontext()
    last_eval: dict = {}

    with anomaly:
        stop = state.epoch >= cfg.epochs or state.optimizer_step >= total_steps
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
                        grad_norm = _grad_norm(accelerator, model, cfg.max_grad_norm)
                        # One host sync per optimizer step: the norm is identical on every rank after
                        # DDP's all-reduce, so all ranks take the same branch without another collective.
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
                if not finite:
                    state.nonfinite_skipped += 1
                elif accelerator.optimizer_step_was_skipped:
                    state.overflow_skipped += 1  # fp16 overflow: the scaler skipped; so does the schedule
                else:
                    scheduler.step()
                state.optimizer_step += 1
                progress.update(1)
                record = metrics.log_step(state, scheduler.get_last_lr()[0], grad_norm)
                if record is not None:
                    progress.set_postfix(loss=f"{record['train_loss']:.4g}", lr=f"{record['lr']:.3g}", samples_s=f"{record['samples_per_s']:.0f}")
                stop = state.optimizer_step >= total_steps
                if cfg.eval_every and state.optimizer_step % cfg.eval_every == 0:
                    last_eval, stop_early = _validate(model, val_loader, loss_fn, accelerator, cfg, state, metrics, early_stopping, max_batches)
                    stop = stop or stop_early
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
            stop = stop or state.epoch >= cfg.epochs

    progress.close()
    metrics.close()
    if not cfg.fast_dev_run:
        accelerator.save_model(model, out, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items())
        print(f"dist_train: finished at optimizer step {state.optimizer_step}: {summary}")
        print(f"dist_train: outputs in {out.resolve()} (config.yaml, metrics.jsonl, model.safetensors)")
    accelerator.end_training()
    return last_eval


def _validate(model, val_loader, loss_fn, accelerator, cfg, state, metrics, early_stopping, max_batches) -> tuple[dict, bool]:
    """One validation pass, logged; returns the record and early stopping's verdict, agreed by all ranks."""
    val_metrics = evaluate(model, val_loader, loss_fn, accelerator, cfg.data, max_batches)
    record = metrics.log_eval(state, val_metrics)
    early_stopping.update(state, record)
    if early_stopping.should_stop(state):
        accelerator.set_trigger()
    return record, accelerator.check_trigger()
