"""dist_train: your supervised PyTorch loop, from one CPU to a SLURM cluster, through Hugging Face Accelerate."""

from ._version import __version__ as __version__
from .config import Config, load_config
from .errors import UserError

__all__ = ["Config", "load_config", "load_model", "train", "UserError"]


def train(cfg: Config) -> dict:
    """Run a training described by `cfg`; returns the last validation record."""
    from .loop import train as _train  # torch/accelerate load on first use, not at import

    return _train(cfg)


def load_model(directory, model=None, *, trust_code=False):
    """The model exported by `dist-train export` to `directory`, with its weights, in eval mode: built
    from `model` (your class, called with the export's model_args, or a built module), or, only with
    `trust_code=True`, by importing the import string the export names."""
    from .export import load_model as _load_model

    return _load_model(directory, model, trust_code=trust_code)
