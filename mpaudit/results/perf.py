"""Speed and memory results: plain frozen dataclasses that the report, the gate and ``compare`` read.

No torch here, so a saved report can be re-rendered from JSON alone. Serialised by
:mod:`mpaudit.results.codec`; numbers that follow from others (median, IQR, TFLOP/s, verdict, activation saving)
are computed properties, written for readers outside Python but never stored twice.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from pydantic import computed_field
from pydantic.dataclasses import dataclass

from mpaudit.results.codec import RESULT_CONFIG, JsonFloat
from mpaudit.vocab import BASELINE, SpeedVerdict

STABLE_IQR_FRACTION = 0.05
"""An arm's step time counts as stable when its interquartile range is below this fraction of its median
(the same 5% rule ``torch.utils.benchmark``'s adaptive timing uses to stop)."""

BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "autocast_cache", "other")
"""Memory categories. ``parameters`` includes the model's buffers; ``activations`` are tensors the step
created and autograd saved for backward; ``autocast_cache`` holds autocast's low-precision copies of the
weights; ``other`` is everything else (the batch, activation gradients, optimizer scratch, the loss)."""

TERA = 1e12

def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _iqr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0 if xs else math.nan
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


@dataclass(frozen=True, config=RESULT_CONFIG)
class SpeedResult:
    """Step time of one arm (``bf16``, or ``bf16+compile`` for a compiled arm) from interleaved rounds.

    ``times_s`` holds one full training step per round, in round order: round ``i`` of every arm ran
    back to back, so arms can be compared pair by pair. Median and IQR follow from it.
    """

    arm: str
    times_s: tuple[JsonFloat, ...]
    batch_size: int | None
    flops_per_step: JsonFloat | None
    """Matmul/conv/attention FLOPs of one step (forward and backward) counted by FlopCounterMode."""
    peak_tflops: JsonFloat | None = None
    """The device's dense peak TFLOP/s for this arm's matmul dtype (known GPUs only)."""
    peak_source: str | None = None
    compiled: bool = False
    error: str | None = None
    """Why the arm could not be timed (for instance a torch.compile failure); None when it was."""
    notes: tuple[str, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def step_s_median(self) -> JsonFloat:
        return _median(self.times_s)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def step_s_iqr(self) -> JsonFloat:
        return _iqr(self.times_s)

    @property
    def relative_iqr(self) -> float:
        """IQR over median: below :data:`STABLE_IQR_FRACTION` the timing is stable."""
        median = self.step_s_median
        return self.step_s_iqr / median if median > 0 else math.nan

    @property
    def stable(self) -> bool:
        return self.relative_iqr < STABLE_IQR_FRACTION

    @computed_field  # type: ignore[prop-decorator]
    @property
    def steps_timed(self) -> int:
        return len(self.times_s)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def samples_per_s(self) -> JsonFloat | None:
        median = self.step_s_median
        return self.batch_size / median if self.batch_size and median > 0 else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def achieved_tflops(self) -> JsonFloat | None:
        median = self.step_s_median
        return self.flops_per_step / median / TERA if self.flops_per_step and median > 0 else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def peak_fraction(self) -> JsonFloat | None:
        """Achieved over the device's dense peak for this dtype; None where the peak is unknown (CPU)."""
        achieved = self.achieved_tflops
        return achieved / self.peak_tflops if achieved is not None and self.peak_tflops else None


@dataclass(frozen=True, config=RESULT_CONFIG)
class Speedup:
    """How much faster ``arm`` steps than ``baseline``: ratio of median step times (>1: faster), with a
    bootstrap confidence interval over paired rounds. ``note`` names a likely cause when it looks wrong."""

    arm: str
    baseline: str
    ratio: JsonFloat
    ci_low: JsonFloat
    ci_high: JsonFloat
    rounds: int
    confidence: float = 0.95
    note: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def verdict(self) -> SpeedVerdict:
        """``faster`` / ``slower`` when the whole interval is above / below 1, else ``same`` (within noise)."""
        if self.ci_low > 1.0:
            return "faster"
        if self.ci_high < 1.0:
            return "slower"
        return "same"


@dataclass(frozen=True, config=RESULT_CONFIG)
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

    @computed_field  # type: ignore[prop-decorator]
    @property
    def activation_bytes(self) -> int:
        return self.breakdown.get("activations", 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tracked_peak_bytes(self) -> int:
        """The peak the storage tracker saw; equals ``peak_bytes`` on CPU."""
        return sum(self.at_peak.values())


def activation_savings(memory: Mapping[str, MemoryResult], baseline: str = BASELINE) -> dict[str, float]:
    """Per non-baseline arm, the fraction of the baseline's activation memory it saves (0.5 = half)."""
    base = memory.get(baseline)
    if base is None or base.error or base.activation_bytes <= 0:
        return {}
    return {
        name: 1.0 - result.activation_bytes / base.activation_bytes
        for name, result in memory.items()
        if name != baseline and not result.error
    }
