"""What a batch is: `(inputs, targets)` as the seed's loop has it, or a Hugging Face style dict.

- `(inputs, targets)` (a tuple or list of two), or `{"inputs": ..., "targets": ...}`: the model is
  called as `model(inputs)` and the loss as `loss(outputs, targets)`.
- Any other dict (`{"input_ids", "attention_mask", "labels", ...}`, what a tokenized `datasets`
  dataset and transformers' collators yield): the model is called as `model(**batch)`. With
  `loss: model` the whole dict goes in and the loss the model returns (`outputs.loss`) is used, as a
  transformers model computes it from `labels`; with any other loss `labels` is taken out as the
  targets and the rest goes to the model.
- Anything else (e.g. `(inputs, targets, weights)`) is refused with one line saying what was yielded.

A dict batch often carries columns the model does not take (a `datasets` dataset's raw `text`, an
`idx`): as transformers' Trainer does (`remove_unused_columns`), the keys that are not parameters of the
model's `forward` are dropped before the call and named once; a plain `forward(**kwargs)` gets them all
(a transformers model's typed `**kwargs: Unpack[TransformersKwargs]` names what it takes). A
`forward` whose required parameters the dict does not hold (e.g. `forward(self, x)` given
`input_ids`/`attention_mask`) is one line naming both, not Python's `unexpected keyword argument`.
"""

from __future__ import annotations

import inspect
import typing
import weakref

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel

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
    """`model(**inputs)` for a dict batch (its keys that `forward` does not take left out), `model(inputs)`
    otherwise (the seed's call)."""
    if not isinstance(inputs, dict):
        return model(inputs)
    return model(**_Signature.of(model).keep(inputs))


class _Signature:
    """What a model's `forward` takes as keywords, read once per model (the unwrapped one: DDP's takes anything)."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the model called -> its forward's signature

    def __init__(self, module: torch.nn.Module):
        self.name = f"{type(module).__name__}.forward"
        try:
            parameters = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):  # no signature to read (a C extension): pass everything, as before
            parameters = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.accepted = {p.name for p in parameters if p.kind in named}
        self.takes_any = False
        for p in parameters:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                typed = _typed_keywords(p.annotation)
                self.takes_any = typed is None
                self.accepted |= typed or set()
        self.required = [p.name for p in parameters if p.kind in named and p.default is inspect.Parameter.empty]
        self.said: set[str] = set()

    @classmethod
    def of(cls, model) -> _Signature:
        signature = cls._cache.get(model)
        if signature is None:
            # Only its signature is read: the user's own forward, under DDP, the fp32 and torch.compile wrappers.
            # One per user module, so that the training model and its unwrapped form (validation) say a column once.
            module = extract_model_from_parallel(model, keep_fp32_wrapper=False, keep_torch_compile=False)
            signature = cls._cache.get(module) or cls(module)
            cls._cache[model] = cls._cache[module] = signature
        return signature

    def keep(self, inputs: dict) -> dict:
        """The keys of `inputs` that `forward` takes; the first batch's unused ones said once (main process)."""
        if self.takes_any:
            return inputs
        missing = [name for name in self.required if name not in inputs]
        if missing:
            raise UserError(
                f"model: {self.name} requires {', '.join(map(repr, missing))}, and the batch is a dict of "
                f"{', '.join(map(repr, inputs))}: a dict batch is passed as model(**batch). Make the loader yield "
                f"(inputs, targets) for a model that takes one tensor, or name forward's parameters after the batch's keys."
            )
        kept = {key: value for key, value in inputs.items() if key in self.accepted}
        dropped = [key for key in inputs if key not in self.accepted and key not in self.said]
        if dropped:
            self.said.update(dropped)
            if PartialState().is_main_process:
                print(
                    f"dist_train: the batch's column(s) {', '.join(map(repr, dropped))} are not parameters of {self.name}; "
                    "they are left out of every call (as transformers' Trainer does with remove_unused_columns)",
                    flush=True,
                )
        return kept


def _typed_keywords(annotation) -> set[str] | None:
    """The keys of `**kwargs: Unpack[SomeTypedDict]` (transformers' models: `Unpack[TransformersKwargs]`),
    which name every keyword the model takes; None for a plain `**kwargs`, which may take anything."""
    if typing.get_origin(annotation) is not typing.Unpack:
        return None
    (typed,) = typing.get_args(annotation)
    keys = getattr(typed, "__required_keys__", None)
    return None if keys is None else set(keys) | set(typed.__optional_keys__)


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


def worker_settings(loader) -> dict:
    """How the user's DataLoader loads (workers, collate, pinning), for a loader dist_train rebuilds over another order."""
    names = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "persistent_workers", "prefetch_factor")
    return {name: getattr(loader, name) for name in names}
