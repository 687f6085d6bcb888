"""Loading a checkpoint without executing pickled code, into the user's unwrapped model.

Weights come from safetensors; every other file through `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers (plus numpy's RNG-state types, as Accelerate allows).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_model

from ..accelerate_internals import set_micro_step
from ..errors import UserError


def safe_torch_load(path: Path):
    """torch.load that only rebuilds tensors and plain containers; a UserError for anything else."""
    try:
        return accelerate_load(str(path), map_location="cpu", weights_only=True)  # adds numpy's RNG-state types
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint file {path} holds pickled objects other than tensors; refusing to unpickle it "
            f"(torch.load weights_only=True: {first_line}). Only load checkpoints you trust."
        ) from None


def load_unwrapped_weights(accelerator, models, input_dir) -> None:
    """Accelerate's load pre-hook: weights keyed as in the user's model (see save), shapes checked first."""
    for i, model in enumerate(models):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        module = accelerator.unwrap_model(model, keep_torch_compile=False)  # keys as in the user's model
        check_shapes(module, path)
        missing, unexpected = load_model(module, str(path), strict=False)
        if missing or unexpected:
            raise UserError(
                f"checkpoint {input_dir} was written for a different model: tensors missing from it: "
                f"{sorted(missing)[:8]}; tensors the model does not have: {sorted(unexpected)[:8]}."
            )
    models.clear()  # loaded here; Accelerate must not load them again


def restore_rng(rng: dict, accelerator) -> None:
    """Set this process's RNGs (and Accelerate's micro-step counter) from another rank's saved states."""
    random.setstate(rng["random_state"])
    np.random.set_state(rng["numpy_random_seed"])
    torch.set_rng_state(rng["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in rng:
        torch.cuda.set_rng_state_all(rng["torch_cuda_manual_seed"][: torch.cuda.device_count()])
    set_micro_step(accelerator, rng.get("step", 0))


def check_shapes(module: torch.nn.Module, path: Path) -> None:
    """A UserError naming every tensor whose shape differs between the checkpoint and the model."""
    expected = {name: list(t.shape) for name, t in module.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    wrong = [f"{n} (checkpoint {saved[n]}, model {expected[n]})" for n in sorted(saved.keys() & expected.keys()) if saved[n] != expected[n]]
    if wrong:
        raise UserError(
            f"checkpoint {path.parent} was written for a different model; shape mismatch in {len(wrong)} "
            f"tensor(s): {', '.join(wrong[:8])}. Check model and model_args, or resume: never with a new output_dir."
        )
