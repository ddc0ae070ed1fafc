"""A small CNN on scikit-learn's 8x8 digits: two 3x3 conv blocks, max-pool, a linear head.

What the audit should find: a clean model. All arms reach ~97-98% test accuracy with no error flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits_data import accuracy, loaders  # noqa: E402


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
