"""Keep chosen modules in fp32 inside autocast, without editing the model's source.

``keep_fp32(model, ["encoder.layers.3.attn"])`` registers a forward pre-hook and a forward hook on each
named module: the pre-hook disables autocast and casts the module's floating inputs to fp32, the hook
restores autocast. Everything the module computes (its children included) then runs in fp32; the rest of
the network keeps autocast's choices, because autocast casts an fp32 tensor to its own dtype at the next
op on its low-precision list (matmul, conv). Outputs stay fp32 by default, so a kept module whose output
does not fit fp16 (an amplifying layer) hands it on intact to the next kept module that scales it back;
``cast_back=True`` rounds floating outputs to the autocast dtype that was in force instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from mpaudit.errors import UsageError


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple keeps its type
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class _Region:
    """The autocast state around the kept modules' calls, as a stack: calls nest (a kept module inside a
    kept module, or one module called several times), so each pre-hook pushes and each hook pops."""

    def __init__(self, cast_back: bool) -> None:
        self.cast_back = cast_back
        self.stack: list[tuple[contextlib.ExitStack | None, torch.dtype | None]] = []

    def enter(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        device_types = _active_autocast_devices()
        if not device_types:
            self.stack.append((None, None))  # not under autocast: nothing to change
            return None
        dtype = torch.get_autocast_dtype(device_types[0])
        # Every autocast that is on goes off: a CPU arm under CUDA's op policy has CPU autocast on and shows
        # CUDA autocast on too (mpaudit.run.autocast_policy).
        ctx = contextlib.ExitStack()
        for device_type in device_types:
            ctx.enter_context(torch.autocast(device_type=device_type, enabled=False))
        self.stack.append((ctx, dtype))
        return _cast(args, torch.float32), _cast(kwargs, torch.float32)

    def leave(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not self.stack:
            return None
        ctx, dtype = self.stack.pop()
        if ctx is None:
            return None
        ctx.close()
        if self.cast_back and dtype is not None and output is not None:
            return _cast(output, dtype)
        return None


def _active_autocast_devices() -> list[str]:
    """The device types whose autocast is on in this thread (CUDA first)."""
    active = []
    for device_type in ("cuda", "cpu", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device_type):
                active.append(device_type)
        except (RuntimeError, TypeError):  # a device type this build does not know
            continue
    return active


class KeepFp32:
    """The hooks that keep some modules in fp32; ``remove()`` (or leaving the ``with`` block) undoes them."""

    def __init__(self, model: torch.nn.Module, module_paths: Iterable[str], cast_back: bool = False) -> None:
        paths = list(dict.fromkeys(module_paths))
        modules = dict(model.named_modules())
        unknown = [p for p in paths if p not in modules]
        if unknown:
            raise UsageError(
                f"keep_fp32: the model has no module {unknown[0]!r}; use a path from model.named_modules()."
            )
        self.module_paths: tuple[str, ...] = tuple(paths)
        self._region = _Region(cast_back)
        self._handles: list[RemovableHandle] = []
        for path in paths:
            module = modules[path]
            self._handles.append(module.register_forward_pre_hook(self._region.enter, with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(self._region.leave, with_kwargs=True, always_call=True)
            )

    def remove(self) -> None:
        """Take the hooks off: the modules follow autocast again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> KeepFp32:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def keep_fp32(model: torch.nn.Module, module_paths: Iterable[str], *, cast_back: bool = False) -> KeepFp32:
    """Run the modules at ``module_paths`` (names from ``model.named_modules()``) in fp32 inside autocast.

    Works as a context manager that undoes itself, or as a call that returns a handle with ``.remove()``::

        with mpaudit.keep_fp32(model, ["encoder.layers.3.attn"]):
            train(model)

        handle = mpaudit.keep_fp32(model, ["amp", "fc2"])
        ...
        handle.remove()

    Raises:
        UsageError: a path names no module of ``model``.
    """
    return KeepFp32(model, module_paths, cast_back=cast_back)


__all__ = ["KeepFp32", "keep_fp32"]
