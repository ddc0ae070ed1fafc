"""A small ResNet on scikit-learn's 8x8 digits: BatchNorm, residual blocks, a strided downsampling block.

Model: 3x3 conv stem (32 channels) + BatchNorm + ReLU; two residual stages of two basic blocks each
(conv-BN-ReLU-conv-BN plus identity, or a strided 1x1 conv + BN shortcut when the shape changes:
16 channels at 8x8, then 32 at 4x4); global average pool; linear head. ~43k parameters.

Data: scikit-learn's bundled 8x8 digits (``suites/digits_data.py``; ships with the package, no download),
a fixed stratified 80/20 split. ``evaluate`` returns ``accuracy`` (primary) and ``eval_loss``.

Expected result (200 steps): every arm reaches ~98% test accuracy; bf16 and fp16 within about a point
of fp32.

What the audit should find: a clean model, no error-severity flag. BatchNorm's running statistics stay
fp32 in every arm.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits_data import accuracy, loaders

STEM_CHANNELS = 16
STAGES = ((16, 1), (32, 2))
"""(output channels, stride of the first block) per stage; two blocks per stage."""
BLOCKS_PER_STAGE = 2
CLASSES = 10


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, added to the (projected when the shape changes) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, residual stages, global average pool, linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, STEM_CHANNELS, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(STEM_CHANNELS), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        for cout, stride in STAGES:
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def build_model() -> nn.Module:
    return ResNet()


def train_loader() -> Any:
    return loaders(image=True)[0]


def eval_loader() -> Any:
    return loaders(image=True)[1]


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    return accuracy(model, loader)
