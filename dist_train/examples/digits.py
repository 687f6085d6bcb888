"""The built-in task: handwritten digits (1,797 real 8x8 images, 10 classes, shipped with scikit-learn).

It is written exactly like a user's `model.py` + `dataloader.py`, as the worked example of the plug-in
contract: `model: dist_train.examples.digits:DigitsMLP` names a class returning an nn.Module, and
`data: dist_train.examples.digits:get_dataloader` is the seed's `get_dataloader(cfg, train)`.
Copy this file to start your own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# The train/validation split is fixed (not tied to `cfg.seed`) so every run validates on the same images.
_SPLIT_SEED = 1234


class DigitsMLP(nn.Module):
    """A small MLP over the 64 pixels; ~98% validation accuracy after a few epochs."""

    def __init__(self, hidden: int = 128, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsDataset(TensorDataset):
    """Images scaled to [0, 1] as float32 tensors of shape (8, 8), labels as int64."""

    def __init__(self, train: bool, val_fraction: float = 0.2):
        from sklearn.datasets import load_digits  # imported here so importing dist_train stays light

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
        num_val = int(len(labels) * val_fraction)
        chosen = order[num_val:] if train else order[:num_val]
        super().__init__(images[chosen], labels[chosen])


def get_dataloader(cfg, train: bool) -> DataLoader:
    """The seed's data entry point: `cfg.batch_size`, `cfg.num_workers` and `data_args` keys are attributes."""
    dataset = DigitsDataset(train=train, val_fraction=getattr(cfg, "val_fraction", 0.2))
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train, num_workers=cfg.num_workers)
