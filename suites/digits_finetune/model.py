"""Fine-tuning a pretrained digits MLP at a low learning rate: pure bf16 loses its updates and stalls.

Data: scikit-learn's bundled 8x8 handwritten digits (``suites/digits_data.py``; no download), the fixed
stratified 80/20 split. ``build_model`` pretrains a 64 -> 128 -> 128 -> 10 ReLU MLP (weights drawn from N(0, 0.1))
in fp32 on the original images (300 AdamW steps at lr 1e-3, seeded, cached per process: every arm starts from the
same pretrained weights); the task fine-tunes it to the same digits shifted one pixel to the right (a new scanner),
with AdamW at lr 5e-5, a fine-tuning rate. ``evaluate`` returns ``accuracy`` (primary) and ``eval_loss`` on the
shifted test images.

Expected result (200 steps, the default; measured 2026-11-30 on the 2-core development machine): the pretrained
model scores 0.44 on shifted digits; fp32, bf16 (autocast, fp32 master weights) and fp16 fine-tune it to 0.6139,
while ``bf16-pure`` (weights, gradients and AdamW state in bf16) stays at 0.4778: with weights of order 0.1 a bf16
ulp is 2^-11..2^-10, and AdamW's steps of about 5e-5 fall below half of it, so they round away. ``bf16-pure`` is
not a default arm: run it with ``--arms fp32,bf16,bf16-pure --verify``. 200 steps show the stall, and the gap widens
with more steps (fp32 vs bf16-pure: 0.567 vs 0.467 at 100 steps, 0.614 vs 0.478 at 200, 0.728 vs 0.497 at
400). Each fix, trained as its own arm at 200 steps: stochastic rounding 0.6139, Kahan compensation 0.6139, fp32
master copies of the three Linear layers 0.6139.

What the audit should find: fp32, bf16 and fp16 clean (no flag). The ``bf16-pure`` arm not safe as is, with an
``update_underflow`` error on each Linear layer (``0``, ``2``, ``4``: 94.4%, 93.0% and 94.9% of the sampled updates
left the bf16 weights unchanged, where fp32's updates predict 95.2%, 94.5% and 96.1%), and with ``--verify`` a
recommendation verified by training: ``update_rounding: "stochastic"`` (arm ``bf16-pure+sr``, one run) brings it
back to fp32's accuracy, so the verdict is "safe with changes".
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits_data import BATCH_SIZE, _split, accuracy

INIT_STD = 0.1
"""Initial weights (and biases) drawn from N(0, INIT_STD): the scale of a pretrained network's weights."""
PRETRAIN_STEPS = 300
PRETRAIN_LR = 1e-3
FINETUNE_LR = 5e-5
"""AdamW's learning rate for the fine-tuning the audit trains: its steps are about this size, far below half a bf16
ulp of a weight of order 0.1 (2^-12 ≈ 2.4e-4 in [2^-4, 2^-3))."""
SHIFT = 1
"""The fine-tuning domain: every image shifted this many pixels to the right (zeros come in on the left)."""

_PRETRAINED: dict[str, torch.Tensor] = {}


def _shift(x: torch.Tensor) -> torch.Tensor:
    images = x.view(-1, 8, 8)
    out = torch.zeros_like(images)
    out[:, :, SHIFT:] = images[:, :, : 8 - SHIFT]
    return out.reshape(-1, 64)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def _pretrain() -> dict[str, torch.Tensor]:
    """fp32 pretraining on the original images, seeded on its own generators (the caller's random state is kept)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _mlp()
        for p in model.parameters():
            nn.init.normal_(p, 0.0, INIT_STD)
        x, y, _, _ = _split()
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
        g = torch.Generator().manual_seed(0)
        for _ in range(PRETRAIN_STEPS):
            idx = torch.randint(len(x), (BATCH_SIZE,), generator=g)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_model() -> nn.Module:
    if not _PRETRAINED:
        _PRETRAINED.update(_pretrain())
    model = _mlp()
    model.load_state_dict(_PRETRAINED)
    return model


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=FINETUNE_LR)


def train_loader():
    x, y, _, _ = _split()
    return DataLoader(TensorDataset(_shift(x), y), batch_size=BATCH_SIZE, shuffle=True)


def eval_loader():
    _, _, x, y = _split()
    return DataLoader(TensorDataset(_shift(x), y), batch_size=256)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module, loader) -> dict[str, float]:
    return accuracy(model, loader)
