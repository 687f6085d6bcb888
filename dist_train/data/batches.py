"""What a batch is: `(inputs, targets)` as the seed's loop has it, or a Hugging Face style dict.

- `(inputs, targets)` (a tuple or list of two), or `{"inputs": ..., "targets": ...}`: the model is
  called as `model(inputs)` and the loss as `loss(outputs, targets)`.
- Any other dict (`{"input_ids", "attention_mask", "labels", ...}`, what a tokenized `datasets`
  dataset and transformers' collators yield): the model is called as `model(**batch)`. With
  `loss: model` the whole dict goes in and the loss the model returns (`outputs.loss`) is used, as a
  transformers model computes it from `labels`; with any other loss `labels` is taken out as the
  targets and the rest goes to the model.
- Anything else (e.g. `(inputs, targets, weights)`) is refused with one line saying what was yielded.
"""

from __future__ import annotations

import torch

from ..errors import UserError

LABELS = "labels"


def split_batch(batch, data_spec: str, model_computes_loss: bool = False):
    """(inputs, targets) of a batch: inputs a tensor (positional) or a dict (keyword arguments);
    targets None when the model computes the loss itself."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        if {"inputs", "targets"} <= batch.keys():
            return batch["inputs"], batch["targets"]
        if model_computes_loss:
            return dict(batch), None
        if LABELS in batch:
            inputs = {k: v for k, v in batch.items() if k != LABELS}
            return inputs, batch[LABELS]
        raise UserError(
            f"data: the loader from {data_spec!r} yielded a dict without 'labels' (keys: {', '.join(map(str, batch))}); "
            "add the targets as 'labels', or set loss: model if the model computes its own loss."
        )
    kind = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise UserError(
        f"data: the loader from {data_spec!r} yielded a {kind}; each batch must be (inputs, targets) or a dict "
        "of model keyword arguments with 'labels' (e.g. a Dataset whose __getitem__ returns (x, y)). Fold extra "
        "elements such as sample weights into inputs or targets and handle them in your loss."
    )


def call_model(model, inputs):
    """`model(**inputs)` for a dict batch, `model(inputs)` otherwise (the seed's call)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def batch_size_of(inputs, targets) -> int:
    """Samples in a batch: the first dimension of the targets, else of the first tensor input."""
    for value in (targets, *(inputs.values() if isinstance(inputs, dict) else (inputs,))):
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    return len(targets) if targets is not None else len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)


def token_ids(inputs) -> torch.Tensor | None:
    """The token ids of a batch (integer inputs, or `input_ids`), for tokens/s; None for other data."""
    value = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    return value if isinstance(value, torch.Tensor) and not value.is_floating_point() else None


def real_tokens(inputs) -> torch.Tensor | int | None:
    """The tokens of a batch that are not padding: the attention mask's sum where there is one (a tensor,
    left on the device), else every token id; None for data without token ids."""
    ids = token_ids(inputs)
    if ids is None:
        return None
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return mask.sum()
    return ids.numel()
