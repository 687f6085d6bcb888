"""The validation pass: the exact, sample-weighted mean loss over the whole validation set."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import reduce

from ..accelerate_internals import broadcast_buffers
from ..components import Loss, logits_of
from ..data import batch_size_of, call_model, split_batch
from ..errors import UserError


def _is_classification(loss: Loss, outputs, targets) -> bool:
    if loss.is_classification:
        return True
    return (
        not loss.model_computes
        and isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and outputs.ndim == targets.ndim + 1
    )


def _padded_round(accelerator: Accelerator) -> bool:
    """Whether this is the last round of batches and Accelerate padded it (the same answer on every rank)."""
    state = accelerator.gradient_state
    return accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0


def _real_rows(accelerator: Accelerator, size: int) -> int:
    """Rows of this rank's last batch that `gather_for_metrics` keeps: the first `remainder` rows of the
    ranks' batches concatenated in rank order."""
    return min(max(accelerator.gradient_state.remainder - accelerator.process_index * size, 0), size)


def _rows(value, count: int):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _rows(v, count) for k, v in value.items()}
    return value[:count] if isinstance(value, torch.Tensor) and value.ndim else value


@torch.no_grad()
def evaluate(model, loader, loss: Loss, accelerator: Accelerator, data_spec: str, max_batches: int | None = None, on_batch=None) -> dict:
    """Mean per-sample loss (and accuracy for classification) over every validation sample, once.

    Per-sample values are gathered with `gather_for_metrics`, which drops the duplicates Accelerate
    pads the last batch with, and summed in float64: the result equals a single process's mean over
    the same set up to float32 rounding of the individual losses. A loss that is one mean per batch
    (e.g. the one a model computes) counts once per sample of its batch; in a padded last batch it is
    recomputed over the real rows, so the duplicates never weigh in.
    """
    per_rank = getattr(loader, "per_rank", False)
    if per_rank:
        # Each rank's own part of a split stream, of its own length: no collective per batch (gather_for_metrics,
        # DDP's buffer broadcast in forward) that a rank with fewer batches would leave waiting; the sums are
        # added over the ranks once, at the end.
        if "FSDP" in str(accelerator.distributed_type):
            raise UserError(
                f"data: the validation stream from {data_spec!r} is split per rank, and an FSDP model's forward is "
                "collective (every rank at every batch); yield the whole validation stream on every rank instead."
            )
        model = accelerator.unwrap_model(model)  # keeps mixed precision's autocast
    broadcast_buffers(accelerator, model)  # FSDP: every rank evaluates with rank 0's BatchNorm statistics, as under DDP
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    hits = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    num_samples = 0
    classification = None
    for batch_index, batch in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            loader.end()  # leaving early: tell Accelerate's gradient state this loader is done
            break
        if on_batch is not None:
            on_batch()  # progress, for the hang watchdog
        inputs, targets = split_batch(batch, data_spec, loss.model_computes)
        outputs = call_model(model, inputs)
        size = batch_size_of(inputs, targets)
        per_sample = loss.per_sample(outputs, targets, size)
        if not per_rank and _padded_round(accelerator) and not loss.returns_per_sample(outputs, targets):
            # A batch mean over the last round, which Accelerate padded with duplicates: the mean of this
            # rank's real rows alone, from one more forward that every rank makes (DDP/FSDP forwards are
            # collective); on a rank with no real row its value is dropped by gather_for_metrics anyway.
            kept = max(_real_rows(accelerator, size), 1)
            mean = loss.per_sample(call_model(model, _rows(inputs, kept)), _rows(targets, kept), kept)[0]
            per_sample = mean.expand(size).contiguous()
        if classification is None:
            classification = _is_classification(loss, outputs, targets)
        # Per sample, like the loss: the fraction of its predictions (one, or one per token) that are right.
        correct = (
            (logits_of(outputs).argmax(dim=-1) == targets).float().reshape(len(per_sample), -1).mean(dim=1)
            if classification
            else per_sample
        )
        if not per_rank:
            per_sample, correct = accelerator.gather_for_metrics((per_sample, correct))
        loss_sum += per_sample.double().sum()
        hits += correct.double().sum()
        num_samples += per_sample.numel()
    if per_rank:
        totals = torch.stack([loss_sum, hits, torch.tensor(float(num_samples), dtype=torch.float64, device=loss_sum.device)])
        loss_sum, hits, count = reduce(totals, reduction="sum")
        num_samples = int(count.item())
    model.train()
    if num_samples == 0:
        raise UserError(
            f"data: the validation loader from {data_spec!r} yielded no samples (drop_last=True with fewer samples "
            "than one batch?); give it at least one batch."
        )
    result = {"val_loss": loss_sum.item() / num_samples, "val_samples": num_samples}
    if classification:
        result["val_accuracy"] = hits.item() / num_samples
    return result
