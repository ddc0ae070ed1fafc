"""Float8 showcase: corrupt records with values around 1e6 set the tensorwise fp8 scale of the input layer.

Model: a tabular classifier, ``input_proj`` (Linear 32 -> 64) -> ``norm`` (LayerNorm) -> ReLU -> ``hidden`` (Linear
64 -> 64) -> ReLU -> ``head`` (Linear 64 -> 4 classes). The LayerNorm right after the input layer takes care of any
scale, so fp32 and bf16 train without noticing that one training row in eight is a **corrupt record**: every feature
±1e6 to ±3e6 (a unit mix-up, an overflowed counter) and a random label.

Data: 32 standardised features drawn from a fixed-seed ``torch.Generator`` (no download): four classes, each a
mixture of two Gaussian blobs (centres N(0, 0.65²) per feature, unit noise), so the classes overlap and the best
accuracy is about 0.92. Training rows ``i % 8 == 3`` are replaced by corrupt records (every feature
±2e6·U(0.5, 1.5), a random label); the held-out rows are clean. ``evaluate`` returns ``accuracy`` (primary) and
``eval_loss``.

What goes wrong in float8 (torchao, tensorwise scaling): every batch of 64 holds 8 corrupt rows, so the input's amax
is about 3e6 and its scale 448 / 3e6 ≈ 1.5e-4. A clean feature (|x| below about 6) becomes less than 1e-3, under half
of e4m3's smallest subnormal 2^-9: every clean input flushes to zero in ``input_proj``'s forward GEMM and in its
weight-gradient GEMM (87.5% of the input's nonzero values: the 7 clean rows in 8). The model learns from the corrupt
rows alone and stays at chance on clean data. Rowwise scaling gives each row its own scale, so the forward GEMM is
fine, but the weight-gradient GEMM scales the input per *column* (over the batch), where the corrupt rows still set
the scale: the clean rows' contribution to ``input_proj``'s weight gradient still flushes. Keeping ``input_proj`` out
of float8 fixes both.

Expected result (200 steps, measured with torchao 0.18 directly, :func:`train_torchao`, emulated on a CPU): fp32
0.920, fp8 tensorwise 0.270, tensorwise with ``input_proj`` excluded 0.919, rowwise 0.853. mpaudit's arms (which
evaluate the trained weights in fp32): fp32 0.9204, bf16 0.9197, fp8 0.2590, ``fp8+filter`` 0.9202, ``fp8-rowwise``
0.8521.

What the audit should find (``--arms fp32,bf16,fp8 --verify``): an ``fp8_underflow`` error at ``input_proj`` in the
``fp8`` arm (forward GEMM, input e4m3), predicted from fp32's tensors and confirmed by the fp8 arm's own casts; the
fp8 verdict safe with changes: ``exclude_from_fp8: ["input_proj"]`` verified by training (``fp8+filter``), minimal;
rowwise scaling, trained as the alternative, recovers only part of the gap. At default settings (fp32, bf16, fp16)
the corrupt values themselves exceed fp16's max: the fp16 arm diverges, with a ``forward_overflow`` error at
``input_proj`` (measured over 30 steps: every step skipped, NaN loss), while bf16 matches fp32.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES = 32
CLASSES = 4
HIDDEN = 64
SEPARATION = 0.65
"""Standard deviation of the blob centres, per feature (unit noise around them)."""
CORRUPT_EVERY = 8
"""One training row in this many is a corrupt record."""
CORRUPT_MAGNITUDE = 2e6
"""A corrupt feature is ±CORRUPT_MAGNITUDE·U(0.5, 1.5): between 1e6 and 3e6."""
TRAIN_SAMPLES = 200 * 64
EVAL_SAMPLES = 4096
BATCH_SIZE = 64
LR = 1e-3
DATA_SEED = 0
CENTRE_SEED = 7
OUTLIER_MODULE = "input_proj"
"""The Linear layer whose tensorwise fp8 input scale the corrupt rows set."""


class TabularClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_proj = nn.Linear(FEATURES, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.input_proj(x)))
        return self.head(torch.relu(self.hidden(h)))


def _rows(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(2 * CLASSES, FEATURES, generator=torch.Generator().manual_seed(CENTRE_SEED)) * SEPARATION
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    blob = 2 * y + torch.randint(0, 2, (n,), generator=gen)
    return centres[blob] + torch.randn(n, FEATURES, generator=gen), y


@lru_cache(maxsize=1)
def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, eval x, eval y): training rows with corrupt records, clean held-out rows."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x, y = _rows(TRAIN_SAMPLES, gen)
    bad = torch.arange(TRAIN_SAMPLES) % CORRUPT_EVERY == 3
    n_bad = int(bad.sum())
    signs = torch.sign(torch.randn(n_bad, FEATURES, generator=gen))
    x[bad] = CORRUPT_MAGNITUDE * (0.5 + torch.rand(n_bad, FEATURES, generator=gen)) * signs
    y[bad] = torch.randint(0, CLASSES, (n_bad,), generator=gen)
    x_eval, y_eval = _rows(EVAL_SAMPLES, gen)
    return x, y, x_eval, y_eval


def build_model() -> nn.Module:
    return TabularClassifier()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def train_loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _, _ = dataset()
    return [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, TRAIN_SAMPLES, BATCH_SIZE)]


def eval_loader() -> DataLoader:
    _, _, x, y = dataset()
    return DataLoader(TensorDataset(x, y), batch_size=1024)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    """Accuracy (primary) and mean cross-entropy on clean held-out rows."""
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        logits = model(x.to(device)).float()
        y = y.to(device)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    return {"accuracy": correct / total, "eval_loss": loss_sum / total}


def train_torchao(recipe: str | None = None, exclude: tuple[str, ...] = (), seed: int = 0) -> dict[str, float]:
    """The same training with torchao directly (no mpaudit): fp32 when ``recipe`` is None, else the model converted by
    ``convert_to_float8_training`` under ``recipe`` (emulated, as on a CPU) with the Linear layers in ``exclude`` kept
    out, trained under bf16 autocast. Returns what ``evaluate`` returns through the model as trained (float8 layers
    included, as a torchao user evaluates it)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(seed)
    model = build_model()
    if recipe is not None:
        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)
        convert_to_float8_training(model, config=config, module_filter_fn=lambda _m, fqn: fqn not in exclude)
    optimizer = build_optimizer(model)
    model.train()
    for batch in train_loader():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        return evaluate(model, eval_loader())
