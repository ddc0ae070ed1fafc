"""One arm set-up for every phase: training, speed, memory and verification all get their model here.

:func:`prepare_arm` seeds, builds the model, fingerprints its initial weights *before* any conversion (later
recipes swap modules or cast weights), moves it to the device, casts it to the recipe's weight dtype (``bf16-pure``:
weights and buffers in bf16), applies the recipe's keep-list, wraps it for the distributed job and builds the
optimizer (on the cast parameters, so its state follows their dtype; with the recipe's fp32 master copies or update
rounding attached, :mod:`mpaudit.run.half_weights`), the task's LR scheduler and the GradScaler. A float8 arm's
Linear layers are swapped for torchao's float8 ones after the fingerprint and the move (:mod:`mpaudit.run.fp8`). What
is timed and measured is therefore exactly the recipe that was trained: keep-lists, loss scales, update rounding,
float8 filters, gradient clipping, accumulation, the scheduler and a custom step included (:mod:`mpaudit.run.step`).
A half-weight arm's batches have their floating tensors cast to the weight dtype in :meth:`PreparedArm.step` (a bf16
model without autocast rejects fp32 inputs), and so has whatever ``loss_fn`` passes to the model (a forward pre-hook
on its root: ``model(x.float())`` works too); integer tensors are untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpaudit.arms import Arm
from mpaudit.run.batches import cast_floating, casting_pre_hook
from mpaudit.run.distributed import SINGLE, Parallel
from mpaudit.run.fp8 import Conversion
from mpaudit.run.half_weights import Bf16Updates, attach_for_arm
from mpaudit.run.keep import KeepFp32, keep_fp32
from mpaudit.run.precision import autocast, fp16_mode, make_scaler, step_context
from mpaudit.run.seeding import fingerprint_model, seed_everything
from mpaudit.run.step import Recipe, recipe_of, train_step
from mpaudit.run.task import Task
from mpaudit.vocab import AutocastPolicy, Fp8Mode, Fp16Mode


@dataclass(frozen=True)
class RunContext:
    """Where and how every arm of one audit runs: the task, the device, fp16 on a CPU, the distributed job."""

    task: Task
    device: torch.device
    fp16_cpu: str = "emulate"
    autocast_policy: str = "cuda"
    """Whose autocast op lists CPU arms follow (``cuda`` or ``cpu``; see :data:`mpaudit.vocab.AutocastPolicy`)."""
    parallel: Parallel = field(default=SINGLE)
    clip_grad_norm: float | None = None
    """Overrides the task's ``clip_grad_norm`` (``--clip-grad-norm``); None keeps the task's."""
    grad_accumulation: int | None = None
    """Overrides the task's ``grad_accumulation`` (``--grad-accumulation``); None keeps the task's."""

    @property
    def recipe(self) -> Recipe:
        """How every arm's optimizer step trains: the task's recipe with the overrides applied."""
        return recipe_of(self.task, self.clip_grad_norm, self.grad_accumulation)

    def fp16_mode(self, arm: Arm) -> Fp16Mode | None:
        """How ``arm`` computes fp16 here (``emulated`` / ``native``), None for arms without fp16."""
        return fp16_mode(arm, self.device.type, self.fp16_cpu)

    def fp8_mode(self, arm: Arm) -> Fp8Mode | None:
        """How ``arm``'s float8 GEMMs run here (``real`` / ``emulated``), None for arms without float8."""
        from mpaudit.run.fp8 import fp8_mode

        return fp8_mode(arm, self.device)

    def skip_reason(self, arm: Arm) -> str | None:
        """Why ``arm`` cannot run here (an MX arm without MX units), or None."""
        from mpaudit.run.fp8 import skip_reason

        return skip_reason(arm, self.device)

    def autocast_policy_of(self, arm: Arm) -> AutocastPolicy | None:
        """The op policy ``arm``'s autocast follows here: ``cuda`` on a GPU, the configured one on a CPU; None for
        arms without autocast."""
        if arm.autocast_dtype is None:
            return None
        return "cuda" if self.device.type == "cuda" else self.autocast_policy  # type: ignore[return-value]

    def step_context(self, arm: Arm) -> contextlib.AbstractContextManager[Any]:
        """The context a whole step of ``arm`` runs in (on a CPU: fp16 emulation, CUDA's autocast op policy); enter
        it outermost."""
        return step_context(arm, self.device.type, self.fp16_cpu, self.autocast_policy)


@dataclass
class PreparedArm:
    """One arm ready to step: its model (``model`` bare, ``trained`` as training calls it), optimizer, scaler."""

    arm: Arm
    run: RunContext
    model: nn.Module
    trained: nn.Module
    """What a step calls: DDP- or FSDP-wrapped in a distributed job (or compiled), else ``model`` itself."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    weights_fingerprint: str
    """Hash of the initial weights, taken before the model was moved or converted."""
    keep: KeepFp32 | None = None
    scheduler: Any = None
    """The task's LR scheduler (``build_scheduler``), stepped after every optimizer step that really stepped."""
    updates: Bf16Updates | None = None
    """The step hooks of a half-weight recipe's fp32 master copies or update rounding (None: plain rounding)."""
    input_cast: RemovableHandle | None = None
    """A half-weight arm's forward pre-hook casting the model's floating inputs to the weight dtype."""
    fp8: Conversion | None = None
    """A float8 arm's conversion: the Linear layers in float8 and those kept out."""

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """The context every step of this arm runs in (enter it outermost, around forward, backward and step)."""
        return self.run.step_context(self.arm)

    def step(
        self, batch: Any, after_backward: Any = None, after_step: Any = None, hold_nonfinite: bool = False,
        *, group: Any = None,
    ) -> torch.Tensor:
        """One real optimizer step (call it inside :meth:`context`) with the run's recipe: on the micro-batches
        ``group`` when given (training), else on ``batch`` repeated ``grad_accumulation`` times (speed and memory:
        the step the user pays for is one optimizer step with all its micro-batches). The detached loss, no host
        sync (see :func:`~mpaudit.run.step.train_step` for ``hold_nonfinite``)."""
        batch = self.cast_batch(batch)
        if group is not None:
            group = [self.cast_batch(b) for b in group]
        return train_step(self.run.task, self.arm, self.trained, self.optimizer, self.scaler, batch,
                          self.run.device.type, after_backward=after_backward, after_step=after_step,
                          hold_nonfinite=hold_nonfinite, recipe=self.run.recipe, scheduler=self.scheduler,
                          group=group)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The arm's autocast on this device (for forward passes outside :meth:`step`)."""
        return autocast(self.arm, self.run.device.type)

    def cast_batch(self, batch: Any) -> Any:
        """``batch`` as the arm's model takes it: floating tensors in the weight dtype for a half-weight arm."""
        if self.arm.weights_dtype is None:
            return batch
        return cast_floating(batch, getattr(torch, self.arm.weights_dtype))

    def for_evaluation(self) -> None:
        """Widen a half-weight arm's trained weights (and buffers) to fp32, exactly, so ``evaluate`` runs in fp32
        like every other arm's: the metrics judge the weights bf16 training reached, not a bf16 forward. A float8
        arm's Linear layers become plain ``nn.Linear`` again, holding the trained fp32 weights."""
        if self.fp8 is not None and self.arm.fp8 != "mxfp8":
            from mpaudit.run.fp8 import unconvert

            unconvert(self.model)
        if self.arm.weights_dtype is not None:
            if self.input_cast is not None:
                self.input_cast.remove()
                self.input_cast = None
            self.model.float()


def prepare_arm(run: RunContext, arm: Arm, seed: int) -> PreparedArm:
    """A fresh, seeded model with ``arm``'s recipe applied, and its optimizer and GradScaler.

    Raises whatever the user's ``build_model`` / ``build_optimizer`` raise (as TaskError).
    """
    seed_everything(seed)
    model = run.task.build_model()
    weights = fingerprint_model(model)
    model.to(run.device)
    input_cast = None
    if arm.weights_dtype is not None:  # after the fingerprint: every arm starts from the same fp32 weights
        dtype = getattr(torch, arm.weights_dtype)
        model.to(dtype=dtype)
        input_cast = model.register_forward_pre_hook(casting_pre_hook(dtype), with_kwargs=True)
    conversion = None
    if arm.fp8 is not None:  # after the fingerprint: every arm starts from the same fp32 weights
        from mpaudit.run.fp8 import convert

        conversion = convert(model, arm, run.device)
    model.train()
    keep = keep_fp32(model, arm.keep_fp32) if arm.keep_fp32 else None
    trained = run.parallel.wrap(model, run.device)
    optimizer = run.task.build_optimizer(model)
    updates = attach_for_arm(optimizer, model, arm)
    scheduler = run.task.build_scheduler(optimizer)
    scaler = make_scaler(arm, run.device.type, run.parallel.scaler_cls)
    return PreparedArm(arm=arm, run=run, model=model, trained=trained, optimizer=optimizer, scaler=scaler,
                       weights_fingerprint=weights, keep=keep, scheduler=scheduler, updates=updates,
                       input_cast=input_cast, fp8=conversion)


def release(arm: Arm, run: RunContext) -> None:
    """Free what an arm's steps kept between calls: the emulation's fp32 workspace, CUDA's cached blocks."""
    if run.fp16_mode(arm) == "emulated":
        from mpaudit.run.fp16_emulation import release_buffers

        release_buffers()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
