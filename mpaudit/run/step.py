"""One real optimizer step of an arm: the unit training, speed and memory all run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mpaudit.arms import Arm
from mpaudit.run.precision import autocast
from mpaudit.run.task import Task


def train_step(
    task: Task,
    arm: Arm,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    batch: Any,
    device_type: str,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    hold_nonfinite: bool = False,
) -> torch.Tensor:
    """One real optimizer step of ``arm``: forward under its autocast, backward (scaled for fp16),
    optimizer step (through the GradScaler for fp16), zero grads. Returns the detached loss; no host sync.

    ``after_backward`` runs between backward and the optimizer step (gradients are populated and, in the
    fp16 arm, still multiplied by the loss scale); ``after_step`` right after the optimizer step. With
    ``hold_nonfinite`` an arm without GradScaler skips the optimizer step when its loss is not finite (one host
    sync, before the step instead of after it), so the weights stay those the failing step started from, as
    GradScaler leaves them in the fp16 arm.
    """
    with autocast(arm, device_type):
        loss = task.loss(model, batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if after_backward is not None:
            after_backward()
        if not hold_nonfinite or bool(torch.isfinite(loss.detach()).all()):
            optimizer.step()
    if after_step is not None:
        after_step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
