"""The arms: one precision recipe each, trained from the same seed on the same batches.

| arm    | forward/backward                       | weights & optimizer | loss scaling            |
| ------ | -------------------------------------- | ------------------- | ----------------------- |
| fp32   | fp32 (TF32 off unless asked)           | fp32                | none                    |
| bf16   | ``torch.autocast(dtype=torch.bfloat16)`` | fp32 master weights | none                    |
| fp16   | ``torch.autocast(dtype=torch.float16)``  | fp32 master weights | ``torch.amp.GradScaler`` |
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mpaudit.errors import UsageError


@dataclass(frozen=True)
class Arm:
    """A precision recipe: the autocast dtype (None for fp32) and whether a GradScaler scales the loss."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    description: str
    keep_fp32: tuple[str, ...] = ()
    """Module paths run in fp32 inside autocast (:func:`mpaudit.run.keep.keep_fp32`): a recommendation under test."""
    init_scale: float | None = None
    """The GradScaler's initial loss scale; None keeps PyTorch's default (2^16)."""

    @property
    def is_baseline(self) -> bool:
        return self.autocast_dtype is None

    @contextlib.contextmanager
    def autocast(self, device_type: str) -> Iterator[None]:
        """The forward context of this arm: autocast to its dtype, or plain fp32."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=device_type, dtype=self.autocast_dtype):
            yield

    def make_scaler(
        self, device_type: str, cls: type[torch.amp.GradScaler] = torch.amp.GradScaler
    ) -> torch.amp.GradScaler | None:
        """A fresh GradScaler (``cls``) for fp16 arms, PyTorch's defaults unless ``init_scale`` is set; None
        for arms without loss scaling."""
        if not self.grad_scaler:
            return None
        if self.init_scale is None:
            return cls(device_type)
        return cls(device_type, init_scale=self.init_scale)

    def with_changes(self, keep_fp32: Sequence[str] = (), init_scale: float | None = None) -> Arm:
        """This recipe plus a keep-list and/or an initial loss scale, named after the change
        (``fp16+keep``, ``fp16+scale2^24``, ``fp16+keep+scale2^24``)."""
        name = self.name
        parts = []
        if keep_fp32:
            name += "+keep"
            parts.append("keeps " + ", ".join(keep_fp32) + " in fp32")
        if init_scale is not None:
            name += f"+scale2^{math.log2(init_scale):g}"
            parts.append(f"GradScaler init_scale {init_scale:g}")
        return replace(self, name=name, keep_fp32=tuple(keep_fp32), init_scale=init_scale,
                       description=self.description + ("; " + "; ".join(parts) if parts else ""))


ARMS: dict[str, Arm] = {
    "fp32": Arm("fp32", None, False, "fp32 forward and backward, fp32 weights"),
    "bf16": Arm("bf16", torch.bfloat16, False, "bf16 autocast, fp32 master weights"),
    "fp16": Arm("fp16", torch.float16, True, "fp16 autocast, fp32 master weights, GradScaler"),
}
DEFAULT_ARMS: tuple[str, ...] = ("fp32", "bf16", "fp16")
BASELINE = "fp32"


FP16_CPU_MODES = ("emulate", "native")
"""How fp16 arms run on a CPU: ``emulate`` (default) computes matmuls and convolutions from fp16 inputs with fp32
accumulation and rounds to fp16, as a GPU tensor core does, at fp32 speed; ``native`` uses PyTorch's CPU half
kernels (~100x slower where the CPU has no fp16 units). On CUDA fp16 is always real."""


def fp16_mode(arm: Arm, device_type: str, fp16_cpu: str) -> str | None:
    """``"emulated"`` or ``"native"`` for an fp16 arm, None for other arms."""
    if arm.autocast_dtype != torch.float16:
        return None
    return "emulated" if device_type == "cpu" and fp16_cpu == "emulate" else "native"


def step_context(arm: Arm, device_type: str, fp16_cpu: str) -> contextlib.AbstractContextManager[Any]:
    """The context a whole training step (forward, backward, optimizer) of ``arm`` runs in."""
    if fp16_mode(arm, device_type, fp16_cpu) == "emulated":
        from mpaudit.run.fp16_emulation import emulated_fp16

        return emulated_fp16()
    return contextlib.nullcontext()


def parse_arms(names: str | Sequence[str]) -> list[Arm]:
    """Turn ``"fp32,fp16"`` (or a list of names) into arms, in the order given, without repeats."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UsageError("No arm given; pick from " + ", ".join(ARMS) + ".")
    arms: list[Arm] = []
    for name in names:
        if name not in ARMS:
            raise UsageError(f"Unknown arm {name!r}; pick from " + ", ".join(ARMS) + ".")
        if ARMS[name] in arms:
            raise UsageError(f"Arm {name!r} is given twice.")
        arms.append(ARMS[name])
    return arms
