"""The validation pass: the exact, sample-weighted mean loss over the whole validation set."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import reduce

from ..accelerate_internals import broadcast_buffers
from ..components import Loss, logits_of
from ..data import batch_size_of, call_model, split_batch
from ..errors import UserError
from .metrics import MetricSet


def _is_classification(loss: Loss, outputs, targets) -> bool:
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        return False  # e.g. class probabilities as targets (soft labels): no accuracy to count
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
    """The first `count` rows of a batch, of the model's inputs or of its outputs (a tensor, a dict or a
    transformers `ModelOutput`, which keeps its type, a tuple)."""
    if value is None:
        return None
    if isinstance(value, dict):
        sliced = copy.copy(value)
        for key, item in value.items():
            sliced[key] = _rows(item, count)
        return sliced
    if isinstance(value, (tuple, list)):
        items = [_rows(item, count) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value[:count] if isinstance(value, torch.Tensor) and value.ndim else value


@torch.no_grad()
def evaluate(
    model,
    loader,
    loss: Loss,
    accelerator: Accelerator,
    data_spec: str,
    max_batches: int | None = None,
    on_batch=None,
    metrics: MetricSet | None = None,
    prefix: str = "val",
) -> dict:
    """Mean per-sample loss (and accuracy for classification) and `metrics` over every sample of a set, once.

    Each rank adds up its *real* rows only: all of them, except in the last round of a padded set, where
    Accelerate filled the ranks' batches with duplicates and its `remainder` says how many rows of that
    round are real (the first ones, in rank order: what `gather_for_metrics` would keep). The loss and
    the metrics' sums are kept in float64 and added over the ranks once, at the end; a torchmetrics
    Metric syncs its own states. A loss that is one mean per batch (e.g. the one a model computes) counts
    once per sample of its batch; in a padded last batch it is recomputed over the real rows, so the
    duplicates never weigh in. Keys: `{prefix}_loss`, `{prefix}_samples`, `{prefix}_accuracy`, `{prefix}_<metric>`.
    """
    per_rank = getattr(loader, "per_rank", False)
    if per_rank:
        # Each rank's own part (of a split stream, or a batch_sampler's batches dealt whole), of its own length:
        # no collective per batch (DDP's buffer broadcast in forward) that a rank with fewer batches would leave
        # waiting; the sums are added over the ranks once, at the end.
        if "FSDP" in str(accelerator.distributed_type):
            raise UserError(
                f"data: the {prefix} set from {data_spec!r} is read per rank (a stream split per rank, or a batch_sampler), "
                f"and an FSDP model's forward is collective (every rank at every batch); yield the whole {prefix} stream "
                "on every rank, or give the loader a batch_size instead."
            )
        model = accelerator.unwrap_model(model)  # keeps mixed precision's autocast
    broadcast_buffers(accelerator, model)  # FSDP: every rank evaluates with rank 0's BatchNorm statistics, as under DDP
    was_training = model.training
    model.eval()
    if metrics is not None:
        metrics.reset()
    # loss sum, hits, samples, and whether it is a classification (a rank without a batch cannot tell alone)
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
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
        kept = size
        if not per_rank and _padded_round(accelerator):
            kept = _real_rows(accelerator, size)
            if not loss.returns_per_sample(outputs, targets):
                # A batch mean over rows some of which may be duplicates: the mean of this rank's real rows
                # alone, from one more forward that every rank makes, whatever its count (DDP/FSDP forwards
                # are collective); on a rank with no real row it is not counted.
                mean = loss.per_sample(call_model(model, _rows(inputs, max(kept, 1))), _rows(targets, max(kept, 1)), max(kept, 1))[0]
                per_sample = mean.expand(size)
        if classification is None:
            classification = _is_classification(loss, outputs, targets)
            totals[3] = float(classification)
        if kept == 0:
            continue
        totals[0] += per_sample[:kept].double().sum()
        if classification:
            # Per sample, like the loss: the fraction of its predictions (one, or one per token) that are right.
            correct = logits_of(outputs).argmax(dim=-1) == targets
            totals[1] += correct[:kept].double().reshape(kept, -1).mean(dim=1).sum()
        totals[2] += kept
        if metrics is not None:
            metrics.update(_rows(outputs, kept) if kept < size else outputs, _rows(targets, kept) if kept < size else targets)
    sums = torch.cat([totals, metrics.sums.reshape(-1)]) if metrics is not None else totals
    if accelerator.num_processes > 1:
        sums = reduce(sums, reduction="sum")
    if was_training:
        model.train()
    loss_sum, hits, count, classification = sums[:4].tolist()
    num_samples = int(count)
    if num_samples == 0:
        raise UserError(
            f"data: the {prefix} loader from {data_spec!r} yielded no samples (drop_last=True with fewer samples "
            "than one batch?); give it at least one batch."
        )
    result = {f"{prefix}_loss": loss_sum / num_samples, f"{prefix}_samples": num_samples}
    if classification:
        result[f"{prefix}_accuracy"] = hits / num_samples
    if metrics is not None:
        values = metrics.result(sums[4:].reshape(-1, 2), prefix)
        result.update({k: v for k, v in values.items() if k not in result})
    return result
