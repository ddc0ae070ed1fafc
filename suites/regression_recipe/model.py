"""A regression MLP whose recipe needs a warm-up schedule and gradient clipping (SGD at base rate 1.0).

Model: an MLP 8 -> 256 -> 256 -> 1 with ReLU, mean-squared error on a standardised target, plain SGD at learning
rate 1.0 with the recipe every arm trains with:

* ``build_scheduler``: a linear warm-up from 1% to 100% of the rate over the first 50 optimizer steps, then a
  cosine decay to zero at step 200 (mpaudit's default length);
* ``clip_grad_norm = 1.0``: the gradient norm clipped to 1 before every step.

The recipe is what makes the rate usable: without clipping the first steps blow the weights up, without the
schedule the rate stays too high to settle. In fp16 the clipping must come after ``GradScaler.unscale_``: clipping
the *scaled* gradients (the classic mistake of a naive fp16 loop) clips a norm 2^16 times too large, so every
step shrinks by the loss scale and the model barely moves. mpaudit clips after unscaling.

Data: synthetic, drawn from a fixed-seed generator (no download): 2,048 training and 1,024 held-out points, 8
standard-normal features, target ``sin(2 x0) + x1 x2 + 0.5 x3^2 + 0.3 x4`` plus Gaussian noise (the best R² a
model can reach is about 0.84), standardised with the training set's mean and deviation. Batches of 64 in a fixed
order. ``evaluate`` returns held-out ``r2`` (primary, higher is better) and ``eval_loss`` (MSE).

Expected result (200 steps), measured with ``python suites/regression_recipe/model.py`` (plain PyTorch, the CPU's
own bf16/fp16 autocast) and ``mpaudit run suites/regression_recipe`` (fp16 emulated on a CPU); the rows without
the schedule or the clipping ran a copy of this file without ``build_scheduler`` or ``clip_grad_norm``:

  ========================================  ===================  =========================================
  recipe                                    plain PyTorch R²     mpaudit R² (fp32 / bf16 / fp16)
  ========================================  ===================  =========================================
  the recipe (warm-up + cosine, clip 1.0)   0.7822 / 0.7791 /    0.7822 / 0.7791 / 0.7768
                                            0.7779
  no schedule (constant rate 1.0)           0.4250 (fp32)        0.4250 / 0.3983 / 0.3596
  no clipping                               NaN (fp32 diverges)  diverged / 0.6006 / 0.6700
  fp16, clipping the scaled gradients       −0.0086              (mpaudit clips after unscale_)
  ========================================  ===================  =========================================

mpaudit's fp32 arm reproduces the plain loop to the digit (same seed, batches and ops). Without clipping fp32
diverges, while the two half arms survive by luck: GradScaler skips the steps whose gradients overflow, and bf16's
rounding nudges the run elsewhere.

What the audit should find: a clean model under its recipe: bf16 and fp16 within 0.01 of fp32's R² (0.78), no
error or warning flag (GradScaler skips one step whose output-layer gradient overflows at its initial scale: an
``info`` flag, handled as designed); ``config`` records ``clip_grad_norm`` 1.0, the ``LambdaLR`` scheduler and
``grad_accumulation`` 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

FEATURES = 8
WIDTH = 256
TRAIN_POINTS = 2048
EVAL_POINTS = 1024
BATCH = 64
LR = 1.0
"""SGD's base learning rate: far too high for this model without warm-up and clipping."""
WARMUP_STEPS = 50
TOTAL_STEPS = 200
"""The schedule's length: warm-up, then cosine decay to zero here (mpaudit's default number of steps)."""
NOISE = 0.55

clip_grad_norm = 1.0
"""The recipe's gradient clipping (mpaudit clips after GradScaler.unscale_ in the fp16 arm)."""


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 - 0.5 + 0.3 * x[:, 4]
         + NOISE * torch.randn(n, generator=g))
    return x, y[:, None]


def _splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_tr, y_tr = _data(1, TRAIN_POINTS)
    x_te, y_te = _data(2, EVAL_POINTS)
    mean, std = y_tr.mean(), y_tr.std()
    return x_tr, (y_tr - mean) / std, x_te, (y_te - mean) / std


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, 1),
    )


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR)


def lr_factor(step: int) -> float:
    """Linear warm-up from 1% over ``WARMUP_STEPS``, then cosine decay to 0 at ``TOTAL_STEPS``."""
    if step < WARMUP_STEPS:
        return 0.01 + 0.99 * step / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def train_loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _, _ = _splits()
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, TRAIN_POINTS, BATCH)]


def eval_loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, _, x, y = _splits()
    return [(x, y)]


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y)


def evaluate(model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
    preds, targets = [], []
    for x, y in loader:
        preds.append(model(x).float())
        targets.append(y)
    p, t = torch.cat(preds), torch.cat(targets)
    mse = float(((p - t) ** 2).mean())
    return {"r2": 1.0 - mse / float(t.var(unbiased=False)), "eval_loss": mse}


def train_plain(steps: int = TOTAL_STEPS, precision: str = "fp32", *, schedule: bool = True, clip: bool = True,
                clip_scaled: bool = False, seed: int = 0) -> dict[str, float]:
    """The same recipe in a plain PyTorch loop (no mpaudit): the reference mpaudit's fp32 arm must reproduce.

    ``precision``: ``fp32``, ``bf16`` (CPU autocast) or ``fp16`` (CPU autocast and a GradScaler); ``clip_scaled``
    clips before ``scaler.unscale_`` — the mistake. Returns what ``evaluate`` returns."""
    torch.manual_seed(seed)
    model = build_model()
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer) if schedule else None
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    batches = train_loader()
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(model, (x, y))
        if scaler is None:
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            stepped = True
        else:
            scaler.scale(loss).backward()
            if clip and not clip_scaled:
                scaler.unscale_(optimizer)
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale  # GradScaler lowers the scale when it skips a step
        if scheduler is not None and stepped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        return evaluate(model, eval_loader())


if __name__ == "__main__":
    runs = {
        "fp32, the recipe": dict(precision="fp32"),
        "fp32, no schedule": dict(precision="fp32", schedule=False),
        "fp32, no clipping": dict(precision="fp32", clip=False),
        "bf16, the recipe": dict(precision="bf16"),
        "fp16, unscale then clip": dict(precision="fp16"),
        "fp16, clip the scaled gradients": dict(precision="fp16", clip_scaled=True),
    }
    for name, kwargs in runs.items():
        print(f"{name:<34} R² {train_plain(**kwargs)['r2']:.4f}", flush=True)  # type: ignore[arg-type]
