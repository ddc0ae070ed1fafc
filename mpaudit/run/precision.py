"""What an arm's recipe means for torch: its autocast, its GradScaler, and the context a step runs in.

On a CPU an fp16 arm runs under fp16 emulation by default (:mod:`mpaudit.run.fp16_emulation`): the numerics of a
GPU's tensor cores at fp32 speed. On a CPU every arm with autocast follows CUDA autocast's op lists by default
(:mod:`mpaudit.run.autocast_policy`): each op runs in the dtype it would run in on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mpaudit.arms import Arm
from mpaudit.run.autocast_policy import cuda_autocast_policy, cuda_policy_active, gpu_autocast_state
from mpaudit.vocab import AutocastPolicy, Fp16Mode

DEFAULT_AUTOCAST_POLICY: AutocastPolicy = "cuda"
"""The op policy CPU arms follow unless told otherwise: CUDA autocast's, so a CPU audit predicts GPU training."""


def torch_dtype(arm: Arm) -> torch.dtype:
    """The dtype the arm's autocast computes in (fp32 for the baseline)."""
    return torch.float32 if arm.autocast_dtype is None else getattr(torch, arm.autocast_dtype)


@contextlib.contextmanager
def autocast(arm: Arm, device_type: str) -> Iterator[None]:
    """The forward context of ``arm``: autocast to its dtype, or plain fp32.

    On a CPU inside a step under CUDA's op policy (:func:`step_context`), CUDA autocast's state also reads as on a
    GPU (enabled, the arm's dtype) for code that asks, such as torchao's float8 layers.
    """
    if arm.autocast_dtype is None:
        yield
        return
    dtype = torch_dtype(arm)
    with torch.autocast(device_type=device_type, dtype=dtype):
        if device_type == "cpu" and cuda_policy_active():
            with gpu_autocast_state(dtype):
                yield
        else:
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


def follows_cuda_policy(arm: Arm, device_type: str, autocast_policy: str) -> bool:
    """Whether ``arm``'s ops follow CUDA autocast's lists through :mod:`mpaudit.run.autocast_policy`: a CPU arm
    with autocast under the ``cuda`` policy (on a GPU CUDA autocast itself runs)."""
    return arm.autocast_dtype is not None and device_type == "cpu" and autocast_policy == "cuda"


def step_context(
    arm: Arm, device_type: str, fp16_cpu: str, autocast_policy: str = DEFAULT_AUTOCAST_POLICY
) -> contextlib.AbstractContextManager[Any]:
    """The context a whole training step (forward, backward, optimizer) of ``arm`` runs in: fp16 emulation for an
    emulated fp16 arm, CUDA autocast's op policy for a CPU arm with autocast under the ``cuda`` policy, the faster
    (bit-identical) emulation of torchao's float8 GEMMs for a float8 arm on a CPU. Yields the fp16 emulation's mode
    (its ``calls``), or None."""
    emulated = fp16_mode(arm, device_type, fp16_cpu) == "emulated"
    cuda_policy = follows_cuda_policy(arm, device_type, autocast_policy)
    float8_cpu = arm.fp8 is not None and device_type == "cpu"
    if not emulated and not cuda_policy and not float8_cpu:
        return contextlib.nullcontext()
    return _step_context(emulated, cuda_policy, float8_cpu)


@contextlib.contextmanager
def _step_context(emulated: bool, cuda_policy: bool, float8_cpu: bool) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:
        if cuda_policy:
            stack.enter_context(cuda_autocast_policy())
        if float8_cpu:
            from mpaudit.run.fp8_emulation import fast_float8_emulation

            stack.enter_context(fast_float8_emulation())
        mode = None
        if emulated:
            from mpaudit.run.fp16_emulation import emulated_fp16

            mode = stack.enter_context(emulated_fp16())
        yield mode
