"""One real optimizer step of an arm, with the task's recipe: the unit training, speed and memory all run.

The recipe (the README's "The task file"):

* ``grad_accumulation`` N: N micro-batches per optimizer step, each loss divided by N before its backward, one
  GradScaler step per optimizer step. The step's recorded loss is the mean of the micro-batch losses.
* ``clip_grad_norm`` C: ``clip_grad_norm_(parameters, C)`` after ``GradScaler.unscale_`` in the fp16 arm, so
  the clipping sees the true gradients, not gradients multiplied by the loss scale (which would shrink every
  update by the scale).
* ``build_scheduler``: ``scheduler.step()`` after every optimizer step that really stepped: after the optimizer, as
  PyTorch requires, and not when GradScaler skipped the step (inf/NaN gradients).
* ``custom_step(model, batch, optimizer, amp)``: replaces all of the above; it does its precision work through the
  ``amp`` handle (:mod:`mpaudit.run.amp`) and owns everything between two batches.

Every path goes through :class:`~mpaudit.run.amp.Amp`, which also fixes where the tracer reads gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpaudit.arms import Arm
from mpaudit.run.amp import Amp
from mpaudit.run.task import Task


@dataclass(frozen=True)
class Recipe:
    """How one optimizer step trains: micro-batches per step, gradient clipping, a custom step."""

    grad_accumulation: int = 1
    clip_grad_norm: float | None = None
    custom_step: bool = False


def recipe_of(task: Task, clip_grad_norm: float | None = None, grad_accumulation: int | None = None) -> Recipe:
    """The task's recipe with the command line's overrides applied (an override wins over the task file)."""
    clip = clip_grad_norm if clip_grad_norm is not None else task.clip_grad_norm
    accumulation = grad_accumulation if grad_accumulation is not None else task.grad_accumulation
    return Recipe(grad_accumulation=accumulation or 1, clip_grad_norm=clip, custom_step=task.has_custom_step)


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
    *,
    recipe: Recipe | None = None,
    scheduler: Any = None,
    group: Sequence[Any] | None = None,
) -> torch.Tensor:
    """One real optimizer step of ``arm`` with ``recipe`` (default: the task's own); the detached loss, no host sync
    beyond what GradScaler and ``hold_nonfinite`` need.

    The micro-batches are ``group`` (the training loop's next N batches) or, without it, ``batch`` repeated N times
    (the speed and memory phases, which step on one fixed batch). ``after_backward`` runs once the step's gradients
    are complete, before they are unscaled or clipped (fp16: still multiplied by the loss scale); ``after_step``
    right after the optimizer step. With ``hold_nonfinite`` an arm without GradScaler skips the optimizer step (and
    the scheduler's) when its loss is not finite (one host sync), so the weights stay those the failing step
    started from, as GradScaler leaves them in the fp16 arm.
    """
    recipe = recipe or recipe_of(task)
    amp = Amp(arm, device_type, scaler, on_gradients=after_backward, hold_nonfinite=hold_nonfinite)
    if recipe.custom_step:
        loss = task.custom_step(model, batch if group is None else group[0], optimizer, amp)
        amp.finish()
        if after_step is not None:
            after_step()
        return loss
    micro = list(group) if group is not None else [batch] * recipe.grad_accumulation
    n = len(micro)
    total: torch.Tensor | None = None
    for i, mb in enumerate(micro):
        with _no_sync(model, last=i == n - 1):
            with amp.autocast():
                loss = task.loss(model, mb)
            amp.backward(loss / n if n > 1 else loss)
        total = loss.detach() if total is None else total + loss.detach()
    if recipe.clip_grad_norm is not None:
        amp.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
    amp.step(optimizer)
    amp.finish()
    if after_step is not None:
        after_step()
    if scheduler is not None and amp.stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    assert total is not None
    return total / n if n > 1 else total


def _no_sync(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync()`` for every micro-batch but the last (gradients are all-reduced once per step)."""
    no_sync = getattr(model, "no_sync", None)
    if last or no_sync is None:
        return contextlib.nullcontext()
    return no_sync()
