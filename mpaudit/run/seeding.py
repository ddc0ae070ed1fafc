"""Same start for every arm: seeding, and fingerprints that prove the weights and batches matched."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from mpaudit.run.batches import iter_leaves

FINGERPRINT_BATCHES = 3
"""How many leading training batches are hashed into an arm's data fingerprint."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def fingerprint_model(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _update_tensor(h, t)
    return h.hexdigest()[:16]


class BatchFingerprint:
    """Accumulates a hash of the first :data:`FINGERPRINT_BATCHES` batches an arm trains on."""

    def __init__(self, limit: int = FINGERPRINT_BATCHES) -> None:
        self._h = hashlib.sha256()
        self.limit = limit
        self.seen = 0

    def add(self, batch: Any) -> None:
        if self.seen >= self.limit:
            return
        self.seen += 1
        for path, leaf in iter_leaves(batch):
            self._h.update(path.encode())
            if isinstance(leaf, torch.Tensor):
                _update_tensor(self._h, leaf)
            else:
                self._h.update(repr(leaf).encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]
