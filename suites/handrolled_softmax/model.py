"""A 1D-CNN + attention digit classifier whose attention softmax is written by hand: ``exp`` with no max subtraction.

Model: each 8x8 digit is read as a sequence of its 8 pixel rows. ``conv`` (Conv1d over the rows, 8 -> 64
channels, ReLU) -> ``attn`` (single-head self-attention, added back to its input, whose weights are
``e / e.sum(-1)`` with ``e = torch.exp(q @ k.transpose(-1, -2))``: no max subtraction, no 1/sqrt(d) scaling) ->
``head`` (Linear from the 8 rows' features to 10 logits).

Data: scikit-learn's bundled 8x8 handwritten digits (``suites/digits_data.py``; ships with the package, no
download), a fixed stratified 80/20 split. ``evaluate`` returns ``accuracy`` (primary) and ``eval_loss``.

What a GPU does: CUDA autocast runs ``exp`` (and ``sum``, ``softmax``, ``layer_norm``, ``pow``, ``norm``...) in
fp32 whatever its input's dtype: it is on CUDA autocast's fp32 list. The scores ``q @ k^T`` come out of the
matmul in fp16, but ``exp`` widens them to fp32, whose range (up to e^88) holds them; the division stays fp32 and
the next matmul casts the weights (all in [0, 1]) back to fp16. fp16 trains like fp32. CPU autocast does not
list ``exp``: there ``exp`` of an fp16 tensor is fp16, which overflows to ``inf`` past 11.09, and ``inf / inf`` is
NaN. The scores pass 11 within the first steps of training, so a CPU audit that followed CPU autocast's op
lists would call this model unsafe in fp16 for a failure a GPU never has.

Expected result (200 steps): fp32 reaches 0.958 accuracy, bf16 and fp16 0.953, within a point of fp32
(measured on a CPU under CUDA's op policy).

What the audit should find: with the default ``--autocast-policy cuda`` (each op in the dtype a GPU's autocast
gives it), a clean model: no error flag, every arm safe. With ``--autocast-policy cpu`` (CPU autocast's own op
lists, for people who really train on CPUs) the fp16 arm diverges (every step's loss is NaN, GradScaler skips
them all) with an error-severity flag on ``attn``'s output projection (``attn.out``, the first module whose
output is not finite); bf16 still trains (its range holds e^11).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits_data import accuracy, loaders

ROWS = 8
"""Sequence length: the rows of an 8x8 digit."""
PIXELS = 8
"""Features per row."""
WIDTH = 64
CLASSES = 10
LR = 3e-3


class HandRolledAttention(nn.Module):
    """Single-head self-attention with a softmax written out as ``exp(scores) / sum(exp(scores))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        e = torch.exp(scores)  # no max subtraction, no 1/sqrt(d): fp16 overflows past 11.09, fp32 past 88.7
        weights = e / e.sum(-1, keepdim=True)
        return self.out(weights @ self.v(x))


class ConvAttentionClassifier(nn.Module):
    """Rows as a sequence: ``conv`` -> ``attn`` (residual) -> ``head`` on every row's features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(PIXELS, WIDTH, kernel_size=3, padding=1)
        self.attn = HandRolledAttention(WIDTH)
        self.head = nn.Linear(ROWS * WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, ROWS, PIXELS).transpose(1, 2)  # (batch, pixels as channels, rows)
        h = torch.relu(self.conv(rows)).transpose(1, 2)  # (batch, rows, width)
        h = h + self.attn(h)
        return self.head(h.flatten(1))


def build_model() -> nn.Module:
    return ConvAttentionClassifier()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def train_loader() -> Any:
    return loaders(image=False)[0]


def eval_loader() -> Any:
    return loaders(image=False)[1]


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    return accuracy(model, loader)
