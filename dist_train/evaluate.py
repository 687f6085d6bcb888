"""The validation pass: the exact, sample-weighted mean loss over the whole validation set."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .data import split_batch
from .errors import UserError
from .plugins import Loss, logits_of


def _is_classification(loss: Loss, outputs, targets) -> bool:
    if loss.is_classification:
        return True
    return (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and outputs.ndim == targets.ndim + 1
    )


@torch.no_grad()
def evaluate(model, loader, loss: Loss, accelerator: Accelerator, data_spec: str, max_batches: int | None = None) -> dict:
    """Mean per-sample loss (and accuracy for classification) over every validation sample, once.

    Per-sample values are gathered with `gather_for_metrics`, which drops the duplicates Accelerate
    pads the last batch with, and summed in float64: the result equals a single process's mean over
    the same set up to float32 rounding of the individual losses.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    hits = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    num_samples = 0
    classification = None
    for batch_index, batch in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            loader.end()  # leaving early: tell Accelerate's gradient state this loader is done
            break
        inputs, targets = split_batch(batch, data_spec)
        outputs = model(inputs)
        per_sample = loss.per_sample(outputs, targets)
        if classification is None:
            classification = _is_classification(loss, outputs, targets)
        # Per sample, like the loss: the fraction of its predictions (one, or one per token) that are right.
        correct = (logits_of(outputs).argmax(dim=-1) == targets).float().reshape(len(per_sample), -1).mean(dim=1) if classification else per_sample
        per_sample, correct = accelerator.gather_for_metrics((per_sample, correct))
        loss_sum += per_sample.double().sum()
        hits += correct.double().sum()
        num_samples += per_sample.numel()
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
