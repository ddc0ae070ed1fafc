"""Numerics showcase: attention scores computed without 1/sqrt(d) pass fp16's max inside the attention's own forward.

Model: a digit classifier that reads each 8x8 image as a sequence of 8 row tokens: ``embed`` (Linear 8 -> 64)
-> ``block`` (``block.attn``: single-head self-attention, then ``block.mlp``, each with a residual) -> the 8
tokens side by side -> ``head`` (10 logits). ``block.attn`` projects tokens to queries and keys with ``q``/``k``
(Linear 64 -> 64) and computes its scores as ``q @ k.transpose(-2, -1)`` in its own ``forward``, *without* the
usual division by sqrt(d) and with large query/key weights (an initialisation that keeps the attention sharp from
the start). The scores reach a few hundred thousand: fine in fp32 and bf16 (softmax subtracts the row maximum),
beyond fp16's 65504.

Data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), pixels scaled to [0, 1], a
fixed stratified 80/20 split; ``evaluate`` returns ``accuracy`` (primary) and ``eval_loss``.

Expected result (200 steps):
  * fp32 and bf16 train to ~97% accuracy.
  * fp16 fails, on a GPU as on a CPU audit: the score matmul is on autocast's fp16 list, so ``q @ k^T`` runs in
    fp16 and its largest entries become ``inf``; softmax (run in fp32 by CUDA autocast) turns a row holding
    ``inf`` into ``NaN``, the loss is ``NaN`` from the first step, GradScaler skips every step and after 25 the
    arm is diverged at chance accuracy. No *leaf* module outputs the scores: ``q`` and ``k`` produce finite
    values, the overflow happens in ``block.attn``'s own code.

What the audit should find: an error flag in the fp16 arm whose site is module **block.attn**, op a matmul
(``aten.bmm``/``aten.mm``), source the score line in ``SelfAttention.forward``, with no cause above it; the
flags of later layers are consequences folded under it. ``--verify`` finds a keep-list that contains
``block.attn`` (keeping its four Linear leaves changes nothing: autocast casts q and k back to fp16 at the score
matmul) and trains within 0.03 of fp32.

The fix: scale the queries by 1/sqrt(d) before the product (or use ``F.scaled_dot_product_attention``, which
does), or keep ``block.attn`` in fp32 (``mpaudit.keep_fp32(model, ["block.attn"])``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits_data import accuracy, loaders

WIDTH = 128
QK_INIT_STD = 5.0
"""Standard deviation of the query/key weights: large enough that unscaled scores pass 65504 in fp16."""
ATTENTION_MODULE = "block.attn"
"""The module whose own forward overflows fp16 (the score matmul)."""
LR = 1e-3


class SelfAttention(nn.Module):
    """Single-head self-attention whose scores are not scaled by 1/sqrt(d)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        for proj in (self.q, self.k):
            nn.init.normal_(proj.weight, std=QK_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-2, -1)  # no 1/sqrt(d): past 65504 in fp16
        weights = torch.softmax(scores, dim=-1)
        return self.out(weights @ v)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = SelfAttention(width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(self.norm(x))


class RowAttentionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, WIDTH), nn.LayerNorm(WIDTH))
        self.block = Block(WIDTH)
        self.head = nn.Linear(8 * WIDTH, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images.view(-1, 8, 8))  # 8 rows of 8 pixels
        return self.head(self.block(tokens).flatten(1))


def build_model() -> nn.Module:
    return RowAttentionClassifier()


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
    """Accuracy (primary) and mean cross-entropy on the held-out digits."""
    return accuracy(model, loader)
