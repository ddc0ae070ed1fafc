"""fp16 tensor-core numerics on a CPU at fp32 speed.

A GPU tensor core multiplies fp16 inputs, accumulates in fp32 and rounds the result to fp16 once. A CPU
without native fp16 matrix units runs ``torch.autocast("cpu", dtype=torch.float16)`` faithfully but its
fp16 matmuls and convolutions are about 100x slower than fp32, too slow to audit a real model. Inside
:func:`emulated_fp16`, the heavy ops of :data:`INTERCEPTED_OPS` that receive float16 CPU tensors are
computed the tensor-core way instead: upcast the fp16 inputs to fp32 (exact), compute in fp32, round each
result to fp16 (round to nearest even; overflow becomes inf, tiny values become subnormal or zero, as on
the GPU). ``nn.LSTM``'s layers (oneDNN's LSTM op, which has no fp16 version on such CPUs) are computed step by
step as cuDNN computes them, the hidden state rounded to fp16 at every step (:mod:`mpaudit.run.fp16_rnn`). Every
other op, and every op without a float16 input, runs untouched, so autocast's choices (which ops run in fp16, which
in fp32), GradScaler and the optimizer behave exactly as natively; an fp16 op this CPU has no kernel for fails with
one sentence naming it.

Caveat: this emulates fp16 *numerics* (overflow, underflow, rounding of every matmul/conv output), not
fp16 *speed*. A step time measured here says nothing about a GPU's fp16 speedup. Fused attention kernels
keep their softmax probabilities in fp32 here, where a GPU kernel may round them to fp16 before the second
matmul; the output is still rounded to fp16.

How it composes:

* autocast runs above Python dispatch modes, so the mode sees the tensors autocast already cast to fp16.
* backward: when ``backward()`` is called, the autograd engine captures the caller's thread-local state
  (``at::ThreadLocalState``, which holds the dispatch-mode stack) and runs every backward node under it,
  on the calling thread for CPU graphs and on device threads otherwise. Backward ops are therefore
  emulated when ``backward()`` is *called* inside the block; where the forward ran does not matter.
* threads: the mode stack is thread-local; entering the block on one thread never affects another.
* other dispatch modes: enter this block first (outermost) so modes entered later still see the fp16 ops
  autocast produced; ops reach this mode after them.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import torch
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode

from mpaudit.run import fp16_rnn
from mpaudit.run.fp16_rnn import RECURRENT_OPS

_aten = torch.ops.aten

INTERCEPTED_OPS: tuple[OpOverload, ...] = (
    # Linear layers: linear/matmul decompose into these before reaching dispatch (forward and backward).
    _aten.mm.default,
    _aten.addmm.default,
    _aten._addmm_activation.default,
    # Batched matmul (torch.matmul on >2-D tensors, nn.MultiheadAttention with need_weights=True).
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.addbmm.default,
    # torch.matmul with a 1-D operand, torch.addmv.
    _aten.mv.default,
    _aten.addmv.default,
    _aten.dot.default,
    # Conv1d/2d/3d and ConvTranspose*d, forward and backward; torch._convolution and conv_tbc called directly.
    _aten.convolution.default,
    _aten.convolution_backward.default,
    _aten._convolution.default,
    _aten.conv_tbc.default,
    # F.scaled_dot_product_attention (and nn.MultiheadAttention with need_weights=False) on CPU.
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
)
"""The aten ops computed as fp16-in, fp32-accumulate, fp16-out when a float16 CPU tensor reaches them.

These are what CPU fp16 autocast actually dispatches for Linear, Conv1d/2d, matmul/bmm,
nn.MultiheadAttention and F.scaled_dot_product_attention, forward and backward. ``aten.linear``,
``aten.matmul`` and ``aten.scaled_dot_product_attention`` decompose into the ops above before they reach
a dispatch mode (under ``torch.inference_mode`` they arrive whole and the mode decomposes them). SDPA with
dropout takes the math path, which on CPU already upcasts fp16 to fp32, so none of it runs in fp16.
Out-variants (``out=``) and in-place variants run natively.
"""

_INTERCEPTED = frozenset(INTERCEPTED_OPS)
_RECURRENT = frozenset(RECURRENT_OPS)
EMULATED_OPS: tuple[OpOverload, ...] = INTERCEPTED_OPS + RECURRENT_OPS
"""Every aten op the emulation computes itself on fp16 CPU inputs: :data:`INTERCEPTED_OPS` (one fp32 call, results
rounded to fp16) and :data:`~mpaudit.run.fp16_rnn.RECURRENT_OPS` (``nn.LSTM``'s layers, step by step)."""

NATIVE_FP16_OPS: Final[dict[str, str]] = {
    "prelu": "elementwise: the CPU's fp16 kernel computes each element in fp32 and rounds it once, as a GPU does",
    "addr": "an outer product: no sum, so each element is one product (and add) rounded once, as on a GPU",
    "linalg_vecdot": "a product and a sum: the CPU's fp16 sum accumulates in fp32, as a GPU's does",
    "_native_multi_head_attention": (
        "nn.MultiheadAttention's fused inference path (eval mode without gradients, never a training step; only "
        "--autocast-policy cpu sends it to fp16): the CPU's fp16 kernel computes in fp16 as a GPU's does, slower, and "
        "may round an intermediate a GPU's fused kernel keeps in fp32"
    ),
}
"""Ops that an fp16 arm sends to fp16 (CUDA autocast's lower-precision list, or CPU autocast's) and that run on the
CPU's own fp16 kernels inside the emulation, with why those compute what a GPU computes. Every other op of those lists
reaches :data:`EMULATED_OPS` (the composite ones decompose into them), forward and backward."""

FP32_BY_CONTRACT = frozenset({"logsumexp"})
"""Schema names of arguments and results that the native kernels keep in fp32 even for fp16 inputs (the
attention kernels' softmax statistics): they are neither required to be fp16 nor rounded to fp16."""

_EMULATED_DTYPE = torch.float16
_COMPUTE_DTYPE = torch.float32
_REDUCED_FP32_PRECISIONS = frozenset({"bf16", "medium"})
"""fp32 precision settings that let oneDNN compute fp32 matmuls/convs in bf16, which would round the
emulated products below fp16 precision (TF32 keeps fp16's 10 mantissa bits and stays exact)."""


class EmulatedFp16(TorchDispatchMode):
    """A dispatch mode that computes :data:`EMULATED_OPS` on float16 CPU inputs as a tensor core does.

    ``calls`` counts the emulated calls per op name (Python-side, no device sync), e.g. to show that
    backward ops were emulated too. The fp32 copies of the inputs go to per-thread buffers kept across
    modes (see :func:`release_buffers`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __enter__(self) -> EmulatedFp16:
        reduced = _reduced_fp32_precision()
        if reduced is not None:
            warnings.warn(
                f"fp32 matmul/conv precision is set to {reduced!r}, so emulated fp16 ops may be computed "
                "with bf16 products and differ from a GPU's fp16; set "
                "torch.set_float32_matmul_precision('highest') for exact emulation.",
                stacklevel=2,
            )
        super().__enter__()
        return self

    def __torch_dispatch__(
        self,
        func: OpOverload,
        types: Sequence[type],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        # ``types`` lists tensor subclasses with their own dispatch (fake, distributed, ...): leave those be.
        if types:
            return func(*args, **kwargs)
        if func in _INTERCEPTED:
            if _wants_emulation(func, args, kwargs):
                self.calls[func.name()] += 1
                return self._emulate(func, args, kwargs)
        elif func in _RECURRENT:
            if fp16_rnn.wants_emulation(func, args, kwargs):
                self.calls[func.name()] += 1
                try:
                    return fp16_rnn.emulate(func, args, kwargs)
                except fp16_rnn.UnsupportedRecurrentCall as exc:
                    raise _no_fp16_kernel_error(func, exc, f" {exc}") from None
        elif _is_composite(func) and _has_fp16_cpu_tensor(args, kwargs):
            # Only under inference_mode do composite ops (linear, conv2d, matmul, sdpa, einsum, ...) reach a
            # dispatch mode undecomposed; decompose them here, as PyTorch would, so their parts come back here.
            with self:
                return func.decompose(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            if _has_fp16_cpu_tensor(args, kwargs) and missing_fp16_kernel(exc):
                raise _no_fp16_kernel_error(func, exc) from exc
            raise

    def _emulate(self, func: OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """Upcast the fp16 inputs to fp32, run ``func`` in fp32, round its results to fp16."""
        up_args = tuple(self._upcast(a, slot) for slot, a in enumerate(args))
        up_kwargs = {k: self._upcast(v, len(args) + i) for i, (k, v) in enumerate(kwargs.items())}
        out_shape = _MATMUL_OUT_SHAPES.get(func)
        if out_shape is not None:
            # The fp32 result only lives until it is rounded: compute it into a reused buffer.
            result = _WORKSPACE.buffer(_OUT_SLOT, out_shape(*up_args))
            return _round(func.overloadpacket.out(*up_args, **up_kwargs, out=result))
        out = func(*up_args, **up_kwargs)
        if isinstance(out, torch.Tensor):
            return _round(out)
        names = [r.name for r in func._schema.returns]
        return type(out)(o if name in FP32_BY_CONTRACT else _round(o) for o, name in zip(out, names, strict=True))

    def _upcast(self, value: Any, slot: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype == _EMULATED_DTYPE:
            return _WORKSPACE.upcast(value, slot)
        return value


@contextlib.contextmanager
def emulated_fp16() -> Iterator[EmulatedFp16]:
    """Emulate fp16 tensor-core numerics for the ops in :data:`EMULATED_OPS` inside this block.

    Wrap the whole training step (forward, ``backward()``, optimizer and GradScaler calls); fp32 and bf16
    ops pass through untouched. Yields the active mode (its ``calls`` counter). Nesting is harmless.
    """
    with EmulatedFp16() as mode:
        yield mode


def release_buffers() -> None:
    """Free this thread's fp32 input buffers (fp32 copies of the largest fp16 operands seen), e.g. once
    an fp16 arm has finished. The next emulated op allocates them again."""
    _WORKSPACE.release()


def _wants_emulation(func: OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """True when ``func`` gets at least one float16 CPU tensor and every other floating tensor is float16
    too (or fp32 by contract). Mixed dtypes go to the native kernel, which raises just as it would."""
    arguments = func._schema.arguments
    named = [(arguments[i].name, a) for i, a in enumerate(args)] + list(kwargs.items())
    seen_fp16 = False
    for name, value in named:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if name in FP32_BY_CONTRACT:
            continue
        if value.dtype != _EMULATED_DTYPE or value.device.type != "cpu":
            return False
        seen_fp16 = True
    return seen_fp16


_OUT_SLOT = -1
"""Workspace slot of the fp32 result buffer (input slots are argument positions, so never negative)."""
_MATMUL_OUT_SHAPES: dict[OpOverload, Callable[..., tuple[int, ...]]] = {
    _aten.mm.default: lambda a, b: (a.shape[0], b.shape[1]),
    _aten.addmm.default: lambda _, a, b: (a.shape[0], b.shape[1]),
    _aten.bmm.default: lambda a, b: (a.shape[0], a.shape[1], b.shape[2]),
    _aten.baddbmm.default: lambda _, a, b: (a.shape[0], a.shape[1], b.shape[2]),
}
"""Result shapes of the matmuls whose fp32 result is computed into a reused buffer (``out=``): their
results can be as large as a weight (a weight gradient), and a fresh one costs page faults every step."""

_COMPOSITE: dict[OpOverload, bool] = {}


def _is_composite(func: OpOverload) -> bool:
    """Whether ``func`` is implemented by decomposition (CompositeImplicitAutograd), cached per op."""
    composite = _COMPOSITE.get(func)
    if composite is None:
        composite = func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)
        _COMPOSITE[func] = composite
    return composite


def _has_fp16_cpu_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether a float16 CPU tensor is among the arguments (or inside a list argument, as for einsum)."""
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.Tensor) and item.dtype == _EMULATED_DTYPE and item.device.type == "cpu":
                return True
    return False


_MISSING_KERNEL_MESSAGES = (
    "not implemented for 'Half'",  # a kernel without a Half instantiation
    "could not create a primitive descriptor",  # oneDNN has no fp16 primitive on this CPU (e.g. its LSTM)
    "with arguments from the 'CPU' backend",  # no CPU kernel at all (a CUDA-only op)
)
"""How PyTorch says an op has no usable CPU kernel for its fp16 inputs."""


def missing_fp16_kernel(exc: BaseException) -> bool:
    """Whether ``exc`` says the op has no usable CPU kernel for fp16 (not a shape or dtype error of the call)."""
    text = str(exc)
    return any(message in text for message in _MISSING_KERNEL_MESSAGES)


def _no_fp16_kernel_error(func: OpOverload, exc: BaseException, detail: str = "") -> Exception:
    """The one-sentence error for an op with fp16 CPU inputs that neither the emulation nor this CPU computes
    (``detail``: what the emulation lacks). A ``NotImplementedError`` stays one, so a caller that computes such ops
    otherwise (the CUDA op policy's fp32-and-round fallback) still recognises it."""
    message = (
        f"{func.name()} has no CPU kernel for fp16 inputs and mpaudit's fp16 emulation does not compute it{detail}, "
        "so the fp16 arm cannot run on this CPU (--fp16-cpu native calls the same missing kernel): audit fp16 on a GPU."
    )
    return NotImplementedError(message) if isinstance(exc, NotImplementedError) else RuntimeError(message)


def _round(value: Any) -> Any:
    """fp32 result -> fp16, round to nearest even (a tensor core's output conversion)."""
    if isinstance(value, torch.Tensor) and value.dtype == _COMPUTE_DTYPE:
        return value.to(_EMULATED_DTYPE)
    return value


def _reduced_fp32_precision() -> str | None:
    """The fp32 matmul/conv precision setting when it allows bf16 compute, else None."""
    settings = [torch.get_float32_matmul_precision()]
    mkldnn = torch.backends.mkldnn
    for backend in ("matmul", "conv"):
        settings.append(str(getattr(getattr(mkldnn, backend, None), "fp32_precision", "")))
    return next((s for s in settings if s in _REDUCED_FP32_PRECISIONS), None)


class _Workspace:
    """Reusable fp32 buffers for the upcast inputs, one per argument slot and thread.

    A fresh fp32 copy of a large weight costs page faults on every step (several times the conversion
    itself); copying into a buffer kept from the previous call, or the previous step's mode, avoids them.
    A buffer is only read by the op it was filled for, which returns new tensors, so reuse is safe.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def upcast(self, tensor: torch.Tensor, slot: int) -> torch.Tensor:
        """``tensor`` as fp32 with the same sizes and strides, in this thread's buffer for ``slot``."""
        span = _storage_span(tensor)
        if span is None:  # overlapping (expanded) views: a plain, fresh copy
            return tensor.to(_COMPUTE_DTYPE)
        view = self._flat(slot, span).as_strided(tensor.size(), tensor.stride())
        view.copy_(tensor)
        return view

    def buffer(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised contiguous fp32 tensor of ``shape`` in this thread's buffer for ``slot``."""
        return self._flat(slot, math.prod(shape)).view(shape)

    def _flat(self, slot: int, numel: int) -> torch.Tensor:
        buffers: dict[int, torch.Tensor] = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(slot)
        if buffer is None or buffer.numel() < numel:
            # Never an inference tensor, so the buffer can be refilled outside inference_mode later.
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=_COMPUTE_DTYPE)
            buffers[slot] = buffer
        return buffer[:numel]

    def release(self) -> None:
        """Drop this thread's buffers."""
        self._local.__dict__.pop("buffers", None)


_WORKSPACE = _Workspace()


def _storage_span(tensor: torch.Tensor) -> int | None:
    """Elements spanned by a non-overlapping, dense view (a permutation of a contiguous layout), else None."""
    if tensor.numel() == 0:
        return None
    sizes_strides = sorted((st, sz) for sz, st in zip(tensor.size(), tensor.stride(), strict=True) if sz != 1)
    expected = 1
    for stride, size in sizes_strides:
        if stride != expected:
            return None
        expected *= size
    return expected
