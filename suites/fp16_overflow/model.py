"""Numerics showcase: tabular features in raw dollars overflow fp16 in the first layer's forward.

Model: a loan-default classifier, ``input_proj`` (Linear 6 -> 64) -> ``norm`` (LayerNorm) -> ``mlp`` ->
``head`` (2 logits). The six features go in **unnormalised, in their raw units**, as they come out of a database: annual
income ($), loan amount ($), property value ($), monthly debt payments ($), credit score, years employed.
The LayerNorm right after ``input_proj`` takes care of the scale, so fp32 trains without anyone noticing.

Data: synthetic loan applications from a fixed-seed ``torch.Generator`` (no download; no dataset that
ships offline carries raw currency units): log-normal incomes and loans, loan-to-value ratios between
0.5 and 1.0, and a hidden default risk driven by loan-to-value, loan-to-income, debt-to-income and credit
score. About half the loans default, so chance accuracy is ~50%. ``evaluate`` returns ``accuracy``
(primary) and ``eval_loss``.

Expected result (200 steps):
  * fp32 and bf16 train normally to ~82% accuracy (the hidden risk itself allows 87%; bf16 rounds the
    dollar amounts to 8 significant bits, harmless here).
  * fp16 fails. Under ``torch.autocast(dtype=float16)`` the Linear ``input_proj`` casts its input to
    fp16, whose largest finite value is 65504: nearly every loan amount and property value, and about
    half the incomes, become ``inf``, so ``input_proj``'s output is ``inf``/``NaN``, the loss is ``NaN``
    on every step, GradScaler skips every step (halving its scale each time) and after 25 such steps the
    arm is marked diverged; the weights never change, so accuracy stays at chance (~49%: the
    zero-initialised head predicts "repaid" for everyone).

What the audit should find: an error-severity ``forward_overflow`` flag on module **input_proj** in the
fp16 arm (the first module whose output is not finite, from step 0) and a ``loss_scale`` error (every step
skipped); the fp16 verdict is "not safe".

The fix: normalise the inputs (log-transform or standardise the dollar amounts; the real fix), or keep
``input_proj`` in fp32 (run it under ``torch.autocast(..., enabled=False)`` on ``x.float()``; its
LayerNorm then sees fp32 and the rest of the model can stay in fp16).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

FEATURES = ("annual_income_usd", "loan_amount_usd", "property_value_usd", "monthly_debt_usd",
            "credit_score", "years_employed")
OVERFLOWING_MODULE = "input_proj"
"""The module whose fp16 output overflows (its input holds dollar amounts above fp16's max, 65504)."""
HIDDEN = 64
TRAIN_SAMPLES = 16384
EVAL_SAMPLES = 4096
BATCH_SIZE = 128
LR = 3e-3
DATA_SEED = 4321
"""Seed of the generator that draws the applications (fixed: the data never changes)."""


class LoanDefaultModel(nn.Module):
    """Raw features -> ``input_proj`` -> ``norm`` -> ``mlp`` -> ``head``: logits for (repaid, defaulted)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_proj = nn.Linear(len(FEATURES), HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, 2)
        # a zero-initialised classifier: the untrained model predicts "repaid" for everyone (chance level)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.norm(self.input_proj(x))))


@lru_cache(maxsize=1)
def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """(features in raw units, defaulted) for train + eval applications, drawn once from ``DATA_SEED``."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    n = TRAIN_SAMPLES + EVAL_SAMPLES

    def lognormal(median: float, sigma: float) -> torch.Tensor:
        return median * torch.exp(sigma * torch.randn(n, generator=gen))

    income = lognormal(65_000.0, 0.45)
    loan = lognormal(240_000.0, 0.5)
    ltv = 0.5 + 0.5 * torch.rand(n, generator=gen)
    value = loan / ltv
    debt = 2_500.0 * torch.rand(n, generator=gen)
    credit = (690.0 + 60.0 * torch.randn(n, generator=gen)).clamp(300.0, 850.0)
    years = (30.0 * torch.rand(n, generator=gen)).floor()
    payment = loan * 0.006  # monthly payment of a 30-year mortgage at ~6%
    dti = (payment + debt) * 12 / income
    risk = 6.0 * (ltv - 0.75) + 3.0 * (dti - 0.55) + 1.2 * (loan / income - 3.7) - (credit - 690.0) / 40.0
    risk = risk - 0.05 * (years - 15.0)
    defaulted = torch.bernoulli(torch.sigmoid(risk - risk.median()), generator=gen).long()
    x = torch.stack([income, loan, value, debt, credit, years], dim=1)
    return x, defaulted


def _split(train: bool) -> TensorDataset:
    x, y = _dataset()
    part = slice(0, TRAIN_SAMPLES) if train else slice(TRAIN_SAMPLES, None)
    return TensorDataset(x[part], y[part])


def build_model() -> nn.Module:
    return LoanDefaultModel()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def train_loader() -> DataLoader:
    data = _split(train=True)
    return DataLoader(data, batch_size=None, sampler=BatchSampler(RandomSampler(data), BATCH_SIZE, drop_last=False))


def eval_loader() -> DataLoader:
    return DataLoader(_split(train=False), batch_size=1024)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    """Accuracy (primary) and mean cross-entropy on held-out applications."""
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
