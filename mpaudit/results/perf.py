"""Speed and memory results: plain frozen dataclasses that the report, the gate and ``compare`` read.

No torch here, so a saved report can be re-rendered from JSON alone. Every class has ``to_dict()`` and
``from_dict()``; numbers that follow from others (median, IQR, TFLOP/s, verdict, activation saving)
are properties, written into ``to_dict()`` for readers outside Python but never stored twice.
Non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mpaudit.results.codec import decode_float, encode_float

STABLE_IQR_FRACTION = 0.05
"""An arm's step time counts as stable when its interquartile range is below this fraction of its median
(the same 5% rule ``torch.utils.benchmark``'s adaptive timing uses to stop)."""

VERDICTS = ("faster", "same", "slower")
"""A speedup's verdict: its confidence interval lies above 1, contains 1 (same within noise), or lies below 1."""

BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "autocast_cache", "other")
"""Memory categories. ``parameters`` includes the model's buffers; ``activations`` are tensors the step
created and autograd saved for backward; ``autocast_cache`` holds autocast's low-precision copies of the
weights; ``other`` is everything else (the batch, activation gradients, optimizer scratch, the loss)."""

TERA = 1e12

def _dec_opt(x: Any) -> float | None:
    return None if x is None else decode_float(x)


def _plain(obj: Any) -> Any:
    """JSON-ready data: stored fields, then the derived properties named in ``_derived``."""
    if hasattr(obj, "__dataclass_fields__"):
        out = {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
        for name in getattr(type(obj), "_derived", ()):
            out[name] = _plain(getattr(obj, name))
        return out
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return encode_float(obj)
    return obj


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _iqr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0 if xs else math.nan
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


@dataclass(frozen=True)
class SpeedResult:
    """Step time of one arm (``bf16``, or ``bf16+compile`` for a compiled arm) from interleaved rounds.

    ``times_s`` holds one full training step per round, in round order: round ``i`` of every arm ran
    back to back, so arms can be compared pair by pair. Median and IQR follow from it.
    """

    arm: str
    times_s: tuple[float, ...]
    batch_size: int | None
    flops_per_step: float | None
    """Matmul/conv/attention FLOPs of one step (forward and backward) counted by FlopCounterMode."""
    peak_tflops: float | None = None
    """The device's dense peak TFLOP/s for this arm's matmul dtype (known GPUs only)."""
    peak_source: str | None = None
    compiled: bool = False
    error: str | None = None
    """Why the arm could not be timed (for instance a torch.compile failure); None when it was."""
    notes: tuple[str, ...] = ()

    _derived = ("step_s_median", "step_s_iqr", "steps_timed", "samples_per_s", "achieved_tflops", "peak_fraction")

    @property
    def steps_timed(self) -> int:
        return len(self.times_s)

    @property
    def step_s_median(self) -> float:
        return _median(self.times_s)

    @property
    def step_s_iqr(self) -> float:
        return _iqr(self.times_s)

    @property
    def relative_iqr(self) -> float:
        """IQR over median: below :data:`STABLE_IQR_FRACTION` the timing is stable."""
        median = self.step_s_median
        return self.step_s_iqr / median if median > 0 else math.nan

    @property
    def stable(self) -> bool:
        return self.relative_iqr < STABLE_IQR_FRACTION

    @property
    def samples_per_s(self) -> float | None:
        median = self.step_s_median
        return self.batch_size / median if self.batch_size and median > 0 else None

    @property
    def achieved_tflops(self) -> float | None:
        median = self.step_s_median
        return self.flops_per_step / median / TERA if self.flops_per_step and median > 0 else None

    @property
    def peak_fraction(self) -> float | None:
        """Achieved over the device's dense peak for this dtype; None where the peak is unknown (CPU)."""
        achieved = self.achieved_tflops
        return achieved / self.peak_tflops if achieved is not None and self.peak_tflops else None

    def to_dict(self) -> dict[str, Any]:
        return dict(_plain(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeedResult:
        flops = d.get("flops_per_step")
        return cls(
            arm=str(d["arm"]),
            times_s=tuple(decode_float(t) for t in d.get("times_s", ())),
            batch_size=None if d.get("batch_size") is None else int(d["batch_size"]),
            flops_per_step=_dec_opt(flops),
            peak_tflops=_dec_opt(d.get("peak_tflops")),
            peak_source=d.get("peak_source"),
            compiled=bool(d.get("compiled", False)),
            error=d.get("error"),
            notes=tuple(d.get("notes", ())),
        )


@dataclass(frozen=True)
class Speedup:
    """How much faster ``arm`` steps than ``baseline``: ratio of median step times (>1: faster), with a
    bootstrap confidence interval over paired rounds. ``note`` names a likely cause when it looks wrong."""

    arm: str
    baseline: str
    ratio: float
    ci_low: float
    ci_high: float
    rounds: int
    confidence: float = 0.95
    note: str | None = None

    _derived = ("verdict",)

    @property
    def verdict(self) -> str:
        """``faster`` / ``slower`` when the whole interval is above / below 1, else ``same`` (within noise)."""
        if self.ci_low > 1.0:
            return "faster"
        if self.ci_high < 1.0:
            return "slower"
        return "same"

    def to_dict(self) -> dict[str, Any]:
        return dict(_plain(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Speedup:
        return cls(
            arm=str(d["arm"]),
            baseline=str(d["baseline"]),
            ratio=decode_float(d["ratio"]),
            ci_low=decode_float(d["ci_low"]),
            ci_high=decode_float(d["ci_high"]),
            rounds=int(d["rounds"]),
            confidence=float(d.get("confidence", 0.95)),
            note=d.get("note"),
        )


@dataclass(frozen=True)
class MemoryResult:
    """Peak memory of one training step of an arm, and what it was made of.

    ``breakdown`` gives each category's high-water mark during the step (categories peak at different
    moments: activations at the end of forward, gradients and optimizer state at the optimizer step);
    ``at_peak`` gives the composition at the moment of the tracked peak and sums to it.
    """

    arm: str
    peak_bytes: int
    breakdown: dict[str, int]
    at_peak: dict[str, int]
    method: str
    """How ``peak_bytes`` was measured: ``storage_tracker`` (live tensor storages, each counted once) or
    ``cuda_allocator`` (``torch.cuda.max_memory_allocated``, with the tracker giving the breakdown)."""
    batch_size: int | None
    batch_scaling: tuple[tuple[int, int], ...] = ()
    """``(fixed, batch-dependent)`` tracked bytes at the moments of the step that could set the peak at
    another batch size (a Pareto frontier); ``max_batch_for_budget`` extrapolates from them."""
    reserved_bytes: int | None = None
    """CUDA only: the most memory the caching allocator held from the driver (what ``nvidia-smi`` shows)."""
    error: str | None = None
    notes: tuple[str, ...] = ()

    _derived = ("activation_bytes", "tracked_peak_bytes")

    @property
    def activation_bytes(self) -> int:
        return self.breakdown.get("activations", 0)

    @property
    def tracked_peak_bytes(self) -> int:
        """The peak the storage tracker saw; equals ``peak_bytes`` on CPU."""
        return sum(self.at_peak.values())

    def to_dict(self) -> dict[str, Any]:
        return dict(_plain(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemoryResult:
        return cls(
            arm=str(d["arm"]),
            peak_bytes=int(d["peak_bytes"]),
            breakdown={str(k): int(v) for k, v in d["breakdown"].items()},
            at_peak={str(k): int(v) for k, v in d.get("at_peak", {}).items()},
            method=str(d["method"]),
            batch_size=None if d.get("batch_size") is None else int(d["batch_size"]),
            batch_scaling=tuple((int(f), int(v)) for f, v in d.get("batch_scaling", ())),
            reserved_bytes=None if d.get("reserved_bytes") is None else int(d["reserved_bytes"]),
            error=d.get("error"),
            notes=tuple(d.get("notes", ())),
        )


def activation_savings(memory: Mapping[str, MemoryResult], baseline: str = "fp32") -> dict[str, float]:
    """Per non-baseline arm, the fraction of the baseline's activation memory it saves (0.5 = half)."""
    base = memory.get(baseline)
    if base is None or base.error or base.activation_bytes <= 0:
        return {}
    return {
        name: 1.0 - result.activation_bytes / base.activation_bytes
        for name, result in memory.items()
        if name != baseline and not result.error
    }


@dataclass(frozen=True)
class Performance:
    """Everything the speed and memory phases measured for one audit, keyed by arm."""

    speed: dict[str, SpeedResult] = field(default_factory=dict)
    speedups: dict[str, Speedup] = field(default_factory=dict)
    memory: dict[str, MemoryResult] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    _derived = ("activation_savings",)

    @property
    def activation_savings(self) -> dict[str, float]:
        return activation_savings(self.memory)

    def to_dict(self) -> dict[str, Any]:
        return dict(_plain(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Performance:
        return cls(
            speed={k: SpeedResult.from_dict(v) for k, v in d.get("speed", {}).items()},
            speedups={k: Speedup.from_dict(v) for k, v in d.get("speedups", {}).items()},
            memory={k: MemoryResult.from_dict(v) for k, v in d.get("memory", {}).items()},
            notes=tuple(d.get("notes", ())),
        )
