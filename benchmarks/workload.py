"""The matmul-bound MLP every benchmark measures: 1024 -> 4096 -> 4096 -> 10 with ReLU, batch 256, AdamW."""

from __future__ import annotations

import itertools
import types
from pathlib import Path

import torch
from torch import nn

from mpaudit.run.task import Task

WIDTHS = (1024, 4096, 4096, 10)
"""Layer widths of the benchmark MLP."""
BATCH = 256
SEED = 0


def mlp() -> nn.Module:
    """The benchmark MLP in fp32."""
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(itertools.pairwise(WIDTHS)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(w_in, w_out))
    return nn.Sequential(*layers)


def batch(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed (x, y) batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine slows every arm alike)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def mlp_task(name: str) -> Task:
    """An in-memory task: the MLP, one fixed batch, cross-entropy, AdamW (the contract's default optimizer)."""
    module = types.ModuleType(name)

    def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = b
        return nn.functional.cross_entropy(model(x), y)

    module.build_model = mlp  # type: ignore[attr-defined]
    module.train_loader = lambda: [batch()]  # type: ignore[attr-defined]
    module.loss_fn = loss_fn  # type: ignore[attr-defined]
    return Task(path=Path(f"{name}.py"), sha256="", module=module)
