"""torchao's emulated float8 GEMM on a CPU, bit for bit, at a quarter of the cost of its dequantisation.

Where no float8 units exist, torchao's ``Float8TrainingTensor`` multiplies with
``torch.mm(a._data.float() / a._scale, b._data.float() / b._scale)``. On a CPU the float8-to-fp32 conversion is a
scalar loop (about 2.5 ns an element on two cores, four times a plain copy) and every operand is dequantised into a
freshly allocated buffer whose pages fault in on first touch: on the benchmark MLP that costs more than the matmuls.

:func:`fast_float8_emulation` computes the same thing faster while it is active, for CPU operands only:

- the float8 bytes are widened to int16 and their bits moved into an fp16 layout (e5m2 is the top byte of an fp16;
  e4m3fn becomes ``value * 2**-8`` in fp16, subnormals included), converted to fp32 (a vectorised, exact
  conversion), scaled back by ``2**8`` (exact) and divided by the tensor's scale with the same division kernel
  torchao's expression uses, so every dequantised element has the same bits (NaN stays NaN);
- the buffers are kept while the context is active (two fp32 operands and two int16 work buffers, each as large
  as the largest operand seen): the training step enters it once, so its GEMMs share them and only the first
  faults pages in (holding them from step to step saved another 5% on the benchmark MLP, but would keep that
  memory for the whole process);
- the matmul is the same ``torch.mm`` on operands of the same strides, so the product has the same bits;
- torchao's preprocessing of the operands for ``torch._scaled_mm`` (layout copies its emulation never reads) is
  skipped;
- a tensorwise amax (``torch.max(torch.abs(x))``) is taken by one ``torch.aminmax`` over the tensor in memory
  order: the same value, without the temporary ``abs`` and without the full reduction over a transposed weight,
  which takes thirty times longer than over a contiguous one on a CPU.

Operands that are not two-dimensional row- or column-major CPU tensors, tensors that ``torch.compile`` is tracing,
and every real (non-emulated) GEMM go to torchao's own implementation. ``tests/test_fp8_emulation.py`` checks the
results bit for bit against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

FP16_FROM_E4M3 = 2.0**8
"""e4m3fn bits placed in an fp16 (exponent field one bit wider, same mantissa) read as ``value / 2**8``."""
E4M3_NAN_BITS = 0x3F80
"""The e4m3fn NaN's exponent and mantissa (``0x7F``) once moved into the fp16 layout."""
SIGN16 = -0x8000
"""The int16 whose bits are the fp16 sign bit alone."""

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclasses.dataclass
class EmulationCounts:
    """GEMMs run here and GEMMs handed to torchao's own implementation while the context was active."""

    fast: int = 0
    torchao: int = 0


class _Workspace(threading.local):
    """Buffers reused across GEMMs: fp32 for the two operands, int16 for the bit manipulation."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(name, None)  # free the small one before allocating the large one
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    def clear(self) -> None:
        self.buffers.clear()


_workspace = _Workspace()
_lock = threading.Lock()
_depth = 0
_originals: dict[Any, Callable[..., Any]] = {}
_counts = EmulationCounts()


def _dense_2d(data: torch.Tensor) -> bool:
    return data.dim() == 2 and (data.is_contiguous() or data.t().is_contiguous())


def _eager_cpu(t: torch.Tensor) -> bool:
    """A plain CPU tensor outside ``torch.compile``'s tracing (fake and functional tensors go to torchao)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()


def _fast_path(a: Any, b: Any) -> bool:
    """Whether the GEMM of these two Float8TrainingTensors is emulated on the CPU in a layout handled here."""
    from torchao.float8.float8_training_tensor import choose_scaled_mm_config

    config = choose_scaled_mm_config(a._gemm_input_role, a._linear_mm_config, b._gemm_input_role,
                                     b._linear_mm_config)
    return bool(config.emulate) and all(
        _eager_cpu(t._data) and t._data.dtype in _FP8_DTYPES and _dense_2d(t._data) for t in (a, b))


def dequantize(data: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """``data.float() / scale``, bit for bit, in the workspace buffer ``name`` (valid until the next call with that
    name): ``data`` is a 2-D row- or column-major float8 CPU tensor, ``scale`` broadcasts against it."""
    n = data.numel()
    raw = data.view(torch.uint8).as_strided((n,), (1,))  # the bytes in memory order, whatever the layout
    bits = _workspace.get("bits", n, torch.int16)
    out = _workspace.get(name, n, torch.float32)
    bits.copy_(raw)
    nan = False
    if data.dtype == torch.float8_e5m2:
        bits.bitwise_left_shift_(8)  # e5m2 is the high byte of an fp16: inf, NaN and subnormals included
        out.copy_(bits.view(torch.float16))
    else:
        sign = _workspace.get("sign", n, torch.int16)
        torch.bitwise_left_shift(bits, 8, out=sign).bitwise_and_(SIGN16)
        bits.bitwise_left_shift_(7).bitwise_and_(E4M3_NAN_BITS)  # exponent and mantissa
        nan = n > 0 and int(bits.max()) == E4M3_NAN_BITS
        if nan:
            nan_mask = bits == E4M3_NAN_BITS
        bits.bitwise_or_(sign)
        out.copy_(bits.view(torch.float16)).mul_(FP16_FROM_E4M3)
        if nan:
            out.masked_fill_(nan_mask, float("nan"))
    return out.as_strided(data.shape, data.stride()).div_(scale)


def _mm(a: Any, b: Any) -> torch.Tensor:
    return torch.mm(dequantize(a._data, a._scale, "a"), dequantize(b._data, b._scale, "b")).to(a._orig_dtype)


def _float8_mm(aten_op: Any, args: Any, kwargs: Any = None) -> torch.Tensor:
    a, b = args[0], args[1]
    if not _fast_path(a, b):
        _counts.torchao += 1
        return _originals[aten_op](aten_op, args, kwargs)
    _counts.fast += 1
    return _mm(a, b)


def _float8_addmm(aten_op: Any, args: Any, kwargs: Any = None) -> torch.Tensor:
    bias, a, b = args[0], args[1], args[2]
    if not _fast_path(a, b) or bias.dtype != a._orig_dtype:
        _counts.torchao += 1
        return _originals[aten_op](aten_op, args, kwargs)
    _counts.fast += 1
    return _mm(a, b) + bias


def _amax(x: torch.Tensor, reduce_amax: bool = False, device_mesh: Any = None, scaling_granularity: Any = None,
          axiswise_dim: int | None = None) -> torch.Tensor:
    """torchao's ``tensor_to_amax``, the same value: tensorwise amax of a CPU tensor stored densely in row- or
    column-major order from its minimum and maximum; everything else by torchao."""
    from torchao.float8.config import ScalingGranularity

    original = _originals[_AMAX]
    if scaling_granularity is None:
        scaling_granularity = ScalingGranularity.TENSORWISE
    handled = (scaling_granularity is ScalingGranularity.TENSORWISE and not reduce_amax and _eager_cpu(x)
               and x.numel() > 0 and (x.is_contiguous() or _dense_2d(x)))
    if not handled:
        return original(x, reduce_amax, device_mesh, scaling_granularity, axiswise_dim)
    if not x.is_contiguous():
        x = x.t()
    with torch.no_grad():
        low, high = torch.aminmax(x)
        return torch.maximum(high, low.neg()).abs()  # abs: +0.0 for an all-zero tensor, as torch.abs gives


_AMAX = "tensor_to_amax"


def _replacements() -> dict[Any, Callable[..., Any]]:
    aten = torch.ops.aten
    return {aten.mm.default: _float8_mm, aten.matmul.default: _float8_mm, aten.addmm.default: _float8_addmm}


@contextlib.contextmanager
def fast_float8_emulation() -> Iterator[EmulationCounts]:
    """While active, torchao's emulated float8 GEMMs on CPU tensors run through :func:`dequantize` (same bits,
    less time); the workspace is freed when the outermost context exits. Re-entrant. Yields the process's running
    :class:`EmulationCounts` (reset when the outermost context is entered)."""
    global _depth, _counts
    from torchao.float8 import float8_utils
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE

    with _lock:
        if _depth == 0:
            _counts = EmulationCounts()
            for op, fn in _replacements().items():
                _originals[op] = FLOAT8_OPS_TABLE[op]
                FLOAT8_OPS_TABLE[op] = fn
            _originals[_AMAX] = float8_utils.tensor_to_amax
            float8_utils.tensor_to_amax = _amax
        _depth += 1
        counts = _counts
    try:
        yield counts
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                float8_utils.tensor_to_amax = _originals.pop(_AMAX)
                FLOAT8_OPS_TABLE.update(_originals)
                _originals.clear()
                _workspace.clear()


__all__ = ["EmulationCounts", "dequantize", "fast_float8_emulation"]
