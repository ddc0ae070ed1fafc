"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped inside the package: no download).

Shared by the digits workloads: a fixed stratified 80/20 split, pixels scaled to [0, 1].
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 64


def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return f(x_tr), g(y_tr), f(x_te), g(y_te)


def loaders(image: bool) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled) and eval loaders; ``image`` reshapes rows to 1x8x8 images for a CNN."""
    x_tr, y_tr, x_te, y_te = _split()
    if image:
        x_tr, x_te = x_tr.view(-1, 1, 8, 8), x_te.view(-1, 1, 8, 8)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=BATCH_SIZE, shuffle=True)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=256)
    return train, test


def accuracy(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on ``loader``."""
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        logits = model(x.to(next(model.parameters()).device)).float()
        y = y.to(logits.device)
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    return {"accuracy": correct / total, "eval_loss": loss_sum / total}
