"""The benchmark's workloads, written like a user's model.py + dataloader.py so dist_train can run them.

Both arms of the benchmark (the seed's hand-written loop and dist_train) build their model with
`build_model(workload=...)` after seeding torch with the same seed, and their data with
`make_tensors`, so they train the same weights on the same samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "mlp" or "gpt"
    batch_size: int
    widths: tuple = ()  # mlp: in, hidden..., out
    layers: int = 0
    d_model: int = 0
    heads: int = 0
    context: int = 0
    vocab: int = 0

    @property
    def tokens_per_sample(self) -> int:
        return self.context if self.kind == "gpt" else 0


WORKLOADS = {
    "tiny_mlp": Workload("tiny_mlp", "mlp", 256, widths=(256, 32, 32, 10)),
    "mlp": Workload("mlp", "mlp", 256, widths=(256, 1024, 1024, 10)),
    "gpt": Workload("gpt", "gpt", 16, layers=4, d_model=256, heads=4, context=128, vocab=512),
    # GPU only (`python -m bench --gpu`): GPT-2 small's shape, 124M parameters (vocab padded to 50304);
    # bench/gpu.py sizes its batch to the GPU's memory (`--gpu-batch`), this 32 is only the default of the arms.
    "gpt124m": Workload("gpt124m", "gpt", 32, layers=12, d_model=768, heads=12, context=1024, vocab=50304),
}
CPU_WORKLOADS = ("tiny_mlp", "mlp", "gpt")


class MLP(nn.Sequential):
    def __init__(self, widths):
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, time, width))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A nanoGPT-style decoder (pre-LayerNorm, tied input/output embedding)."""

    def __init__(self, layers: int, d_model: int, heads: int, context: int, vocab: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.token_embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.ln_f(self.blocks(x)))


def build_model(workload: str) -> nn.Module:
    w = WORKLOADS[workload]
    if w.kind == "mlp":
        return MLP(w.widths)
    return GPT(w.layers, w.d_model, w.heads, w.context, w.vocab)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, one value per sequence (dist_train's per-sample loss contract)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(dim=1)


def make_tensors(workload: str, num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic training set: (inputs, targets), independent of the model's seed."""
    w = WORKLOADS[workload]
    g = torch.Generator().manual_seed(10_000 + seed)
    if w.kind == "mlp":
        inputs = torch.randn(num_samples, w.widths[0], generator=g)
        targets = torch.randint(0, w.widths[-1], (num_samples,), generator=g)
        return inputs, targets
    tokens = torch.randint(0, w.vocab, (num_samples, w.context + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def get_dataloader(cfg, train: bool) -> DataLoader:
    """The seed's `get_dataloader`: DataLoader(TensorDataset) with shuffling for training."""
    num_samples = cfg.num_samples if train else cfg.batch_size * 2
    inputs, targets = make_tensors(cfg.workload, num_samples, seed=0 if train else 1)
    return DataLoader(TensorDataset(inputs, targets), batch_size=cfg.batch_size, shuffle=train, num_workers=cfg.num_workers)


def train_flops_per_sample(workload: str) -> float:
    """Matmul FLOPs of one training sample (forward + backward = 3 x forward's 2 x MACs)."""
    w = WORKLOADS[workload]
    if w.kind == "mlp":
        macs = sum(a * b for a, b in zip(w.widths[:-1], w.widths[1:]))
        return 6.0 * macs
    d, t = w.d_model, w.context
    # Per token: 12 d^2 weights per block and the vocab head (nanoGPT/PaLM's 6N), plus attention's
    # QK^T and AV (12 L d T, the causal half not discounted, as PaLM counts it).
    weights = w.layers * 12 * d * d + d * w.vocab
    per_token = 6 * weights + 12 * w.layers * d * t
    return float(per_token * t)


def steps_for(workload: str, seconds: float, step_s_guess: float) -> int:
    return max(1, math.ceil(seconds / step_s_guess))
