"""A small CNN on scikit-learn's 8x8 digits: two 3x3 conv blocks, max-pool, a linear head.

Data: scikit-learn's bundled 8x8 handwritten digits (``suites/digits_data.py``; ships with the package,
no download), a fixed stratified 80/20 split. ``evaluate`` returns ``accuracy`` (primary) and ``eval_loss``.

Expected result (200 steps): all arms reach ~96% test accuracy; bf16 and fp16 within a point of fp32.

What the audit should find: a clean model, no error flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits_data import accuracy, loaders


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )


def train_loader():
    return loaders(image=True)[0]


def eval_loader():
    return loaders(image=True)[1]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module, loader) -> dict[str, float]:
    return accuracy(model, loader)
