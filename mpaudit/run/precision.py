"""What an arm's recipe means for torch: its autocast, its GradScaler, and the context a step runs in.

On a CPU an fp16 arm runs under fp16 emulation by default (:mod:`mpaudit.run.fp16_emulation`): the numerics of a
GPU's tensor cores at fp32 speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mpaudit.arms import Arm
from mpaudit.vocab import Fp16Mode


def torch_dtype(arm: Arm) -> torch.dtype:
    """The dtype the arm's autocast computes in (fp32 for the baseline)."""
    return torch.float32 if arm.autocast_dtype is None else getattr(torch, arm.autocast_dtype)


@contextlib.contextmanager
def autocast(arm: Arm, device_type: str) -> Iterator[None]:
    """The forward context of ``arm``: autocast to its dtype, or plain fp32."""
    if arm.autocast_dtype is None:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=torch_dtype(arm)):
        yield


def make_scaler(
    arm: Arm, device_type: str, cls: type[torch.amp.GradScaler] = torch.amp.GradScaler
) -> torch.amp.GradScaler | None:
    """A fresh GradScaler (``cls``) for arms with loss scaling, PyTorch's defaults unless ``init_scale`` is set;
    None for arms without."""
    if not arm.grad_scaler:
        return None
    if arm.init_scale is None:
        return cls(device_type)
    return cls(device_type, init_scale=arm.init_scale)


def fp16_mode(arm: Arm, device_type: str, fp16_cpu: str) -> Fp16Mode | None:
    """``"emulated"`` or ``"native"`` for an fp16 arm, None for other arms."""
    if arm.autocast_dtype != "float16":
        return None
    return "emulated" if device_type == "cpu" and fp16_cpu == "emulate" else "native"


def step_context(arm: Arm, device_type: str, fp16_cpu: str) -> contextlib.AbstractContextManager[Any]:
    """The context a whole training step (forward, backward, optimizer) of ``arm`` runs in."""
    if fp16_mode(arm, device_type, fp16_cpu) == "emulated":
        from mpaudit.run.fp16_emulation import emulated_fp16

        return emulated_fp16()
    return contextlib.nullcontext()
