"""The plug-in contract: the user's model factory, data function and loss, resolved from import strings.

An import string is `path/to/file.py:Name` (a file, loaded by path, its folder put on sys.path so the
seed's sibling imports work) or `package.module:Name`. Every failure is a `UserError` that names the
string and what is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


def resolve(spec: str, key: str) -> Callable:
    """Return the object an import string names; `key` is the config key it came from, for messages."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UserError(f"{key}: {spec!r} is not an import string; write `path/to/file.py:Name` or `package.module:Name`.")
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{key}: file {module_part!r} in {spec!r} does not exist (relative paths start at {Path.cwd()}).")
        # The seed's model.py / dataloader.py import their siblings (`from dataset import MyDataset`).
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        name = f"_dist_train_user_{path.stem}_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[name]
                raise
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            # Only the named module itself (or a parent package) missing is the user's typo; a module it
            # imports that is missing is reported as it is.
            if exc.name and (module_part == exc.name or module_part.startswith(exc.name + ".")):
                raise UserError(f"{key}: module {module_part!r} in {spec!r} cannot be found; check the name or install it.") from None
            raise
    try:
        return getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UserError(f"{key}: {module_part!r} has no attribute {attr!r} (it has: {', '.join(public[:12])}).") from None


def check_call(fn: Callable, kwargs: dict, what: str, fix: str, *args) -> None:
    """A UserError if `fn(*args, **kwargs)` would fail on its signature alone (before running any of it)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: let the call itself tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise UserError(f"{what}: {exc}. {fix}") from None


def build_model(spec: str, kwargs: dict) -> nn.Module:
    factory = resolve(spec, "model")
    check_call(factory, kwargs, f"model: {spec!r} cannot take model_args {kwargs!r}", "Fix model_args.")
    model = factory(**kwargs)  # an error inside the user's code is theirs, shown as it is
    if not isinstance(model, nn.Module):
        raise UserError(f"model: {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; it must return the model.")
    return model


def _mse_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    per_element = F.mse_loss(outputs, targets.to(outputs.dtype).view_as(outputs), reduction="none")
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


def _cross_entropy_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.ndim > 2 and outputs.shape[:-1] == targets.shape:
        # Sequence logits (batch, tokens, classes), as language models return them: torch wants the
        # classes on dim 1.
        outputs = outputs.movedim(-1, 1)
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


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: torch's one-kernel-per-parameter implementation (CPU and CUDA). On CPU torch's default
    is the per-tensor loop, ~12x slower for AdamW on a 1M-parameter matrix (bench/RESULTS.md)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, fused=fused or None)
    optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
