"""``amp``: mpaudit's handle on one arm's precision inside a training step.

Every step mpaudit runs goes through this handle — its own step (:func:`mpaudit.run.step.train_step`) and a task's
``custom_step(model, batch, optimizer, amp)`` alike — so the matched arms, GradScaler handling, tracing and fp16
emulation apply to a custom loop body too. A custom step writes its precision work as::

    def custom_step(model, batch, optimizer, amp):
        x, y = batch
        with amp.autocast():                    # the arm's autocast (nothing in the fp32 arm)
            loss = loss_a(model, x, y) + 0.1 * loss_b(model, x)
        amp.backward(loss)                      # scaled by the GradScaler in the fp16 arm
        amp.unscale_(optimizer)                 # true gradients before clipping (a no-op without a GradScaler)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        amp.step(optimizer)                     # GradScaler.step in fp16 (skips the step on inf/NaN gradients)
        optimizer.zero_grad(set_to_none=True)
        return loss                             # what mpaudit records as the step's training loss

What mpaudit does around a step, in every arm: it enters the arm's step context (fp16 emulation on a CPU) around
the whole call; after the call it runs ``GradScaler.update()`` once when ``amp.step`` stepped through the scaler
(a step that never called ``amp.step``, e.g. one that accumulates over calls, leaves the scaler alone).

The tracer's contract (:class:`mpaudit.trace.tracer.Tracer`): parameter gradients are read once per step, at the
first ``amp.unscale_`` or ``amp.step`` of it — after every backward of the step, before anything unscales or clips
them — so fp16 gradients are recorded as fp16 held them, multiplied by the loss scale (the scale in force is
recorded beside them), and bf16/fp32 gradients as the backward produced them. Update statistics are taken when the
step returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mpaudit.arms import Arm
from mpaudit.run.precision import autocast, torch_dtype


class Amp:
    """The precision of one arm, for one step: autocast, (scaled) backward, unscale and (skippable) optimizer step.

    Build a fresh one per step (:func:`mpaudit.run.step.train_step` does). ``on_gradients`` runs once, when the
    step's gradients are complete and not yet unscaled (the tracer's ``after_backward``). With ``hold_nonfinite``
    an arm without GradScaler skips the optimizer step when a loss given to :meth:`backward` is not finite (one
    host sync), as GradScaler does in the fp16 arm, so a failing step leaves the weights it started from.
    """

    def __init__(
        self,
        arm: Arm,
        device_type: str,
        scaler: torch.amp.GradScaler | None,
        on_gradients: Callable[[], None] | None = None,
        hold_nonfinite: bool = False,
    ) -> None:
        self._arm = arm
        self._device_type = device_type
        self._scaler = scaler
        self._on_gradients = on_gradients
        self._hold = hold_nonfinite and scaler is None
        self._losses: list[torch.Tensor] = []
        self._gradients_read = False
        self.backward_calls = 0
        """How many times :meth:`backward` ran in this step."""
        self.scaler_steps = 0
        """How many times :meth:`step` went through the GradScaler (its ``update()`` is due once when > 0)."""
        self.stepped = False
        """Whether an optimizer really stepped (False when GradScaler skipped it or the step was held back)."""
        self.step_calls = 0
        """How many times :meth:`step` was called."""

    # ------------------------------------------------------------------ what a step may read

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: the format this arm computes in."""
        return self._arm.half_format or "fp32"

    @property
    def arm(self) -> str:
        """The arm's name (``fp32``, ``bf16``, ``fp16``, or a verified variant such as ``fp16+keep``)."""
        return self._arm.name

    @property
    def dtype(self) -> torch.dtype:
        """The dtype autocast computes in (``torch.float32`` in the fp32 arm)."""
        return torch_dtype(self._arm)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The arm's GradScaler (fp16), None in arms without loss scaling."""
        return self._scaler

    @property
    def loss_scale(self) -> float:
        """The loss scale in force (1.0 without a GradScaler). Reads the scale from the device: a host sync."""
        return float(self._scaler.get_scale()) if self._scaler is not None else 1.0

    # ------------------------------------------------------------------ what a step calls

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The arm's autocast around a forward pass (plain fp32 in the fp32 arm)."""
        with autocast(self._arm, self._device_type):
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` multiplied by the loss scale (fp16), unchanged otherwise: for a backward you call yourself."""
        return self._scaler.scale(loss) if self._scaler is not None else loss

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backward from ``loss``, scaled by the GradScaler in the fp16 arm (``kwargs`` go to ``Tensor.backward``).

        Call it once per loss (several times to accumulate micro-batches, dividing each loss by their count)."""
        self.backward_calls += 1
        if self._hold:
            self._losses.append(loss.detach())
        self.scale(loss).backward(**kwargs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the loss scale (fp16; a no-op otherwise), e.g. before clipping them.

        At most once per optimizer per step, as ``GradScaler.unscale_`` requires."""
        self._gradients_complete()
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Step ``optimizer``: through the GradScaler in the fp16 arm (which skips the step when the gradients hold
        inf/NaN), directly otherwise. Returns what ``optimizer.step`` returned (None when it was skipped)."""
        self._gradients_complete()
        self.step_calls += 1
        stepped: list[bool] = []
        handle = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
        try:
            if self._scaler is not None:
                self.scaler_steps += 1
                out = self._scaler.step(optimizer, *args, **kwargs)
            elif self._hold and self._losses and not bool(torch.isfinite(torch.stack(self._losses)).all()):
                out = None  # the loss is not finite: keep the weights this step started from
            else:
                out = optimizer.step(*args, **kwargs)
        finally:
            handle.remove()
        self.stepped = self.stepped or bool(stepped)
        return out

    # ------------------------------------------------------------------ what the step's runner calls

    def finish(self) -> None:
        """After the step: ``GradScaler.update()`` when the step went through the scaler."""
        if self._scaler is not None and self.scaler_steps:
            self._scaler.update()

    def _gradients_complete(self) -> None:
        if not self._gradients_read:
            self._gradients_read = True
            if self._on_gradients is not None:
                self._on_gradients()


__all__ = ["Amp"]
