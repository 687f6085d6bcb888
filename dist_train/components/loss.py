"""The loss: the built-in ones, the model's own (`loss: model`), or the user's function, and its
per-sample form for the exact validation mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..plugins import resolve


def _shapes(name: str, outputs: torch.Tensor, targets: torch.Tensor, expected: str) -> UserError:
    return UserError(
        f"loss: {name} between the model's outputs of shape {list(outputs.shape)} and targets of shape {list(targets.shape)}: {expected}"
    )


def _mse_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.numel() != targets.numel():
        raise _shapes(
            "mse",
            outputs,
            targets,
            "it needs one target per output. Give the model one output per target (e.g. out_features=1 for "
            "one value per sample), or use loss: cross_entropy for class labels.",
        )
    per_element = F.mse_loss(outputs, targets.to(outputs.dtype).view_as(outputs), reduction="none")
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


def _cross_entropy_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.ndim > 2 and outputs.shape[:-1] == targets.shape:
        # Sequence logits (batch, tokens, classes), as language models return them: torch wants the
        # classes on dim 1.
        outputs = outputs.movedim(-1, 1)
    probabilities = targets.is_floating_point() and targets.shape == outputs.shape
    indices = outputs.ndim >= 2 and targets.shape == outputs.shape[:1] + outputs.shape[2:]
    if not probabilities and (not indices or targets.is_floating_point()):
        raise _shapes(
            "cross_entropy",
            outputs,
            targets,
            "it needs logits (batch, classes) and integer class indices (batch,) (or per token: (batch, tokens, "
            "classes) and (batch, tokens)), or class probabilities of the logits' shape. "
            + ("Make the targets integers (.long())." if indices else "Return one logit per class, or use loss: mse for values."),
        )
    return F.cross_entropy(outputs.float(), targets, reduction="none")


BUILTIN_LOSSES = {"cross_entropy": _cross_entropy_per_sample, "mse": _mse_per_sample}
MODEL_LOSS = "model"  # `loss: model`: the loss the model returns (transformers models, given `labels`)


def loss_of(outputs, targets=None) -> torch.Tensor:
    """The loss a model returned: `outputs.loss`, `outputs["loss"]`, or the first element of a tuple."""
    value = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if value is None and isinstance(outputs, (tuple, list)) and outputs:
        value = outputs[0]
    if not isinstance(value, torch.Tensor):
        raise UserError(
            f"loss: model, but the model returned a {type(outputs).__name__} without a `loss` tensor; a transformers "
            "model returns one when the batch has `labels`. Add labels to the batch, or name a loss function."
        )
    return value


def logits_of(outputs) -> torch.Tensor:
    """The tensor built-in losses and accuracy use: the model's output itself when it is a tensor, its
    `logits` when it is an output object (transformers' `ModelOutput`, or any dict / object with a
    `logits` tensor), or the first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise UserError(
        f"loss: the model returned a {type(outputs).__name__}; built-in losses need a tensor, an object with a "
        "`logits` tensor, or a tuple starting with one. Return logits, or set loss to your own function."
    )


class Loss:
    """The training loss (a scalar mean over the batch) and the validation loss (one value per sample).

    Built-in losses are per-sample functions. A user loss `(outputs, targets) -> loss` may return one
    value per sample, used as is, or a scalar batch mean, which validation weights by the batch size:
    exact for mean-reduced losses, an approximation for anything else.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.is_classification = spec == "cross_entropy"
        self.model_computes = spec == MODEL_LOSS
        builtin = BUILTIN_LOSSES.get(spec)
        # Built-in losses take the logits out of an output object; a user loss gets the outputs as returned.
        if self.model_computes:
            self._fn = loss_of
        elif builtin:
            self._fn = lambda outputs, targets: builtin(logits_of(outputs), targets)
        else:
            self._fn = resolve(spec, "loss")

    def __call__(self, outputs, targets) -> torch.Tensor:
        value = self._fn(outputs, targets)
        return value.mean() if value.ndim else value

    def returns_per_sample(self, outputs, targets) -> bool:
        """Whether this loss gives one value per sample (else one mean per batch). Decided once, at the first call."""
        if not hasattr(self, "_per_sample"):
            self._per_sample = self._fn(outputs, targets).ndim > 0
        return self._per_sample

    def per_sample(self, outputs, targets, batch: int) -> torch.Tensor:
        """One value per sample, shape (batch,): a loss with more dimensions (e.g. one per token) is
        averaged over all but the first, so `gather_for_metrics` can drop padded samples exactly. A
        scalar (a batch mean, e.g. the loss a model computes) counts once for each sample of its batch."""
        value = self._fn(outputs, targets)
        if not value.ndim:
            return value.float().expand(batch)
        if value.shape[0] != batch:
            raise UserError(
                f"loss: {self.spec!r} returned shape {list(value.shape)} for a batch of {batch}; return a scalar "
                "or one value per sample (first dimension = batch)."
            )
        return value.float().reshape(batch, -1).mean(dim=1)
