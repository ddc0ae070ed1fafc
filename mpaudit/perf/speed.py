"""The speed phase: every arm's real training step, timed in interleaved rounds, with error bars.

Each arm steps a fresh, identically seeded copy of the model and optimizer on one fixed batch (the
first of ``train_loader()``). A step is one optimizer step with the task's recipe: with ``grad_accumulation`` N it
runs that batch N times as its micro-batches (the step the user pays for), clipping and the scheduler included.
After warm-up the arms take turns, one step each per round (A B C A B C ...), so drift on a shared machine
(other jobs, clock changes, heat) hits every arm alike. Rounds go on until every arm's IQR is under 5% of its
median or the time budget is spent, like
``torch.utils.benchmark``'s ``adaptive_autorange``. A speedup is the ratio of median step times with a
bootstrap confidence interval over paired rounds; FLOPs are counted once per arm, outside the timing.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.flop_counter import FlopCounterMode

from mpaudit.arms import Arm
from mpaudit.defaults import DEFAULT_BENCH_SECONDS
from mpaudit.errors import error_text
from mpaudit.results.perf import STABLE_IQR_FRACTION, SpeedResult, Speedup
from mpaudit.run.batches import batch_size, move_to_device
from mpaudit.run.env import dtype_support
from mpaudit.run.prepare import PreparedArm, RunContext, prepare_arm
from mpaudit.run.seeding import seed_everything
from mpaudit.run.task import first_batch
from mpaudit.vocab import BASELINE

WARMUP_ROUNDS = 3
"""Untimed rounds first: the first step allocates optimizer state, picks kernels and (compiled) compiles."""

MIN_ROUNDS = 10
"""Rounds timed before the stability rule may stop the loop, so the IQR rests on enough samples."""

FLOOR_ROUNDS = 3
"""Rounds timed even when the budget is already spent: fewer would give no meaningful IQR or interval."""

BOOTSTRAP_RESAMPLES = 2000
"""Bootstrap resamples of the paired rounds behind each speedup's confidence interval."""

BOOTSTRAP_CHUNK = 250
"""Resamples computed at once, which bounds the bootstrap's memory on long runs."""

CONFIDENCE = 0.95
"""Coverage of the speedup confidence interval."""

COMPILE_SUFFIX = "+compile"
"""Result key suffix of a torch.compile'd arm: ``bf16+compile``."""

LATENCY_BOUND_S = 2e-3
"""A baseline step shorter than this is dominated by per-op overhead (Python, dispatch, kernel launch),
which lower precision cannot shrink."""

CAST_BOUND_FLOPS_PER_PARAM = 6 * 32
"""Below this many counted FLOPs per weight per step (a Linear does 6 per weight per sample, so fewer
than ~32 samples), re-casting every weight to 16 bits each step costs about as much as the math."""

CPU_VECTOR_RATIO = 2.0
"""Most a CPU without matrix units can gain from 16-bit math: AVX512-BF16 / AVX512-FP16 do twice the
multiply-adds per instruction of AVX-512 fp32 FMA, and memory-bound ops move half the bytes."""

CPU_AMX_RATIO = 16.0
"""Most a CPU with AMX tiles can gain: 1024 bf16/fp16 operations per cycle per core (Intel's figure for
Sapphire Rapids AMX) against 64 fp32 operations for AVX-512 with two FMA units."""

GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Dense tensor-core peaks (and the non-tensor fp32 peak) in TFLOP/s, from NVIDIA's product datasheets,
    # which print tensor-core numbers "with sparsity": the dense peaks below are half of those.
    # H100 Tensor Core GPU datasheet: SXM fp32 67, TF32 989*, BF16/FP16 1979*; PCIe fp32 51, TF32 756*,
    # BF16/FP16 1513*. H200 Tensor Core GPU datasheet: SXM as H100 SXM; NVL fp32 60, TF32 835*, BF16/FP16 1671*.
    # A100 Tensor Core GPU datasheet (SXM4 and PCIe alike): fp32 19.5, TF32 312*, BF16/FP16 624*.
    "H100 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
}

Timer = Callable[[], float]
"""A clock in seconds (``time.perf_counter`` by default): the seam tests drive instead of sleeping."""


def gpu_peak(device_name: str) -> tuple[str, dict[str, float]] | None:
    """The row of :data:`GPU_PEAK_TFLOPS` for a CUDA device name (``NVIDIA H100 80GB HBM3``), or None."""
    name = device_name.upper()
    if "H200" in name:
        key = "H200 NVL" if "NVL" in name else "H200 SXM"
    elif "H100" in name:
        if "NVL" in name:
            return None  # H100 NVL clocks differ from both rows; better no fraction than a wrong one
        key = "H100 PCIe" if "PCIE" in name else "H100 SXM"
    elif "A100" in name:
        key = "A100"
    else:
        return None
    return key, GPU_PEAK_TFLOPS[key]


def tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA may run on TF32 tensor cores (then fp32's peak is TF32's)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _dtype_name(arm: Arm) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the format the arm's matmuls run in (keys of :data:`GPU_PEAK_TFLOPS`)."""
    return arm.half_format or "fp32"


def theoretical_ratio(device: torch.device, arm: Arm) -> float | None:
    """The most ``arm`` can speed up a step over fp32 on this hardware, or None when unknown."""
    name = _dtype_name(arm)
    if name == "fp32":
        return None
    if device.type == "cuda":
        row = gpu_peak(torch.cuda.get_device_name(device))
        if row is None:
            return None
        peaks = row[1]
        return peaks[name] / peaks["tf32" if tf32_enabled() else "fp32"]
    if device.type == "cpu":
        get_caps = getattr(torch.cpu, "get_capabilities", None)
        caps: dict[str, Any] = get_caps() if get_caps is not None else {}
        return CPU_AMX_RATIO if caps.get(f"amx_{name}") else CPU_VECTOR_RATIO
    return None


def bootstrap_speedup(
    baseline_s: ArrayLike,
    arm_s: ArrayLike,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(ratio, low, high)``: median(baseline)/median(arm) and its percentile bootstrap interval.

    Rounds are resampled as pairs (the same indices for both arms), so drift that slowed one round for
    every arm cancels instead of widening the interval.
    """
    base = np.asarray(baseline_s, dtype=np.float64)
    other = np.asarray(arm_s, dtype=np.float64)
    if base.shape != other.shape or base.size == 0:
        raise ValueError("bootstrap_speedup needs two equally long, non-empty series of paired rounds")
    ratio = float(np.median(base) / np.median(other))
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, base.size, size=(min(BOOTSTRAP_CHUNK, resamples - start), base.size))
        ratios.append(np.median(base[idx], axis=1) / np.median(other[idx], axis=1))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(ratios), [tail, 1.0 - tail])
    # With few rounds the percentile interval of a median can miss the point estimate by a hair; an
    # interval that excludes its own estimate would only confuse, so it is widened to include it.
    return ratio, min(float(low), ratio), max(float(high), ratio)


def _quantile_sorted(xs: Sequence[float], p: float) -> float:
    """Linear-interpolation quantile of sorted data (``statistics.quantiles(method="inclusive")``)."""
    pos = (len(xs) - 1) * p
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _relative_iqr_sorted(xs: Sequence[float]) -> float:
    median = _quantile_sorted(xs, 0.5)
    return (_quantile_sorted(xs, 0.75) - _quantile_sorted(xs, 0.25)) / median if median > 0 else math.inf


class _StepClock:
    """Times one step, ending it with a device sync the same way for every arm: CUDA events on a GPU, the
    ``timer`` around the call on a CPU (CPU kernels finish before they return, so the step's end is its sync)."""

    def __init__(self, device: torch.device, timer: Timer) -> None:
        self.device = device
        self.timer = timer

    def time(self, step: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = self.timer()
        step()
        return self.timer() - t0


@dataclass
class _Contestant:
    """One timed arm: its prepared model, optimizer and scaler (from :func:`prepare_arm`), and what it measured."""

    key: str
    arm: Arm
    prepared: PreparedArm | None
    compiled: bool
    params: int
    times: list[float] = field(default_factory=list)
    sorted_times: list[float] = field(default_factory=list)
    flops: float | None = None
    error: str | None = None
    skipped: int = 0
    scale: float | None = None


def _prepare(run: RunContext, arm: Arm, seed: int, compiled: bool, backend: str) -> _Contestant:
    """The arm exactly as it trained (:func:`prepare_arm`), compiled when asked; failures become ``error`` (in a
    distributed job they end it: see :func:`measure_speed`)."""
    c = _Contestant(arm.name + (COMPILE_SUFFIX if compiled else ""), arm, None, compiled, 0)
    try:
        c.prepared = prepare_arm(run, arm, seed)
        c.params = sum(p.numel() for p in c.prepared.model.parameters())
    except Exception as exc:
        if run.parallel.active:
            raise
        c.error = error_text(exc)
        return c
    if compiled:
        try:
            c.prepared.trained = torch.compile(c.prepared.trained, backend=backend)  # type: ignore[assignment]
        except Exception as exc:
            if run.parallel.active:
                raise
            c.error = "torch.compile failed: " + error_text(exc)
    return c


def _run_step(c: _Contestant, batch: Any) -> None:
    assert c.prepared is not None
    c.prepared.step(batch)


def measure_speed(
    run: RunContext,
    arms: Sequence[Arm],
    seed: int,
    *,
    budget_s: float = DEFAULT_BENCH_SECONDS,
    compile: bool = False,
    min_rounds: int = MIN_ROUNDS,
    compile_backend: str = "inductor",
    timer: Timer = time.perf_counter,
) -> tuple[dict[str, SpeedResult], dict[str, Speedup]]:
    """Time every arm's real training step in interleaved rounds; return per-arm times and speedups.

    Every arm is set up by :func:`~mpaudit.run.prepare.prepare_arm`, as it trained (keep-lists and loss scales
    included), and steps inside its step context (fp16 emulation on a CPU). Speedups compare each arm with fp32
    in the same mode (``bf16`` with ``fp32``, ``bf16+compile`` with ``fp32+compile``, and ``fp32+compile`` with
    ``fp32``). An arm that fails (a compile error, a raise in the step) gets a result with ``error`` set instead
    of stopping the others. ``timer`` times CPU steps and the budget.

    In a distributed job (``run.parallel``) each rank times its own steps on its own first batch, the ranks
    agree every round on whether to stop (so they take the same number of steps), and a failure raises:
    the ranks could no longer match their collectives.
    """
    parallel, device = run.parallel, run.device
    seed_everything(seed)
    batch = move_to_device(first_batch(run.task, "train_loader", parallel.shard(run.task.train_loader())), device)
    samples = batch_size(batch)
    if samples is not None:  # one timed step is one optimizer step: every micro-batch of it
        samples *= run.recipe.grad_accumulation
    contestants = [_prepare(run, arm, seed, False, compile_backend) for arm in arms]
    if compile:
        contestants += [_prepare(run, arm, seed, True, compile_backend) for arm in arms]
    clock = _StepClock(device, timer)

    def step(c: _Contestant) -> None:
        _run_step(c, batch)

    def count(c: _Contestant) -> None:
        _count_flops(c, batch)

    def timed(c: _Contestant) -> None:
        _timed_step(c, clock, batch)

    def attempt(c: _Contestant, action: Callable[[_Contestant], None]) -> None:
        assert c.prepared is not None
        try:
            with c.prepared.context():
                action(c)
        except Exception as exc:
            if parallel.active:
                raise
            prefix = "torch.compile failed: " if c.compiled and not c.times else ""
            c.error = prefix + error_text(exc)

    for r in range(WARMUP_ROUNDS):
        for c in [c for c in contestants if c.error is None]:
            attempt(c, count if r == 0 and not c.compiled else step)
            if c.prepared is not None and c.prepared.scaler is not None and c.error is None:
                c.scale = c.prepared.scaler.get_scale()  # host sync, outside any timed step
    for c in contestants:
        if c.compiled:
            c.flops = next((e.flops for e in contestants if e.key == c.arm.name), None)

    start = timer()
    rounds = 0
    while True:
        active = [c for c in contestants if c.error is None]
        if not active:
            break
        for c in active:
            attempt(c, timed)
        rounds += 1
        still = [c for c in active if c.error is None]
        stop = _should_stop(still, rounds, timer() - start, budget_s, min_rounds)
        if parallel.all_true(stop, device):  # every rank stops on the same round
            break

    results = {c.key: _speed_result(c, samples, device) for c in contestants}
    return results, _speedups(results, {c.key: c for c in contestants}, device)


def _count_flops(c: _Contestant, batch: Any) -> None:
    """Run one (untimed) step under FlopCounterMode: matmul, conv and attention FLOPs, forward and backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        _run_step(c, batch)
    c.flops = float(counter.get_total_flops())


def _timed_step(c: _Contestant, clock: _StepClock, batch: Any) -> None:
    elapsed = clock.time(lambda: _run_step(c, batch))
    c.times.append(elapsed)
    bisect.insort(c.sorted_times, elapsed)
    scaler = c.prepared.scaler if c.prepared is not None else None
    if scaler is not None:
        scale = scaler.get_scale()  # host sync after the clock stopped: counts steps GradScaler skipped
        if c.scale is not None and scale < c.scale:
            c.skipped += 1
        c.scale = scale


def _should_stop(active: Sequence[_Contestant], rounds: int, elapsed: float, budget_s: float, min_rounds: int) -> bool:
    """Stop once every arm is stable (after ``min_rounds``) or the budget is spent (after the floor)."""
    if rounds < FLOOR_ROUNDS:
        return False
    if elapsed >= budget_s:
        return True
    if rounds < min_rounds:
        return False
    return all(_relative_iqr_sorted(c.sorted_times) < STABLE_IQR_FRACTION for c in active)


def _speed_result(c: _Contestant, samples: int | None, device: torch.device) -> SpeedResult:
    notes: list[str] = []
    peak: float | None = None
    source: str | None = None
    if device.type == "cuda":
        name = _dtype_name(c.arm)
        if name == "fp32":
            on = tf32_enabled()
            notes.append(
                f"TF32 was {'on' if on else 'off'} for fp32 matmuls"
                + ("; the peak fraction is against the TF32 tensor-core peak." if on else ".")
            )
            name = "tf32" if on else "fp32"
        row = gpu_peak(torch.cuda.get_device_name(device))
        if row is not None:
            peak, source = row[1][name], f"NVIDIA {row[0]} dense {name} peak"
    if device.type == "cpu" and _dtype_name(c.arm) == "fp16" and not dtype_support(device)["fp16"]:
        notes.append(
            "This CPU has no native fp16 arithmetic: this is the time of emulated or software fp16, "
            "not of fp16 hardware."
        )
    if c.skipped:
        notes.append(
            f"GradScaler skipped {c.skipped} of {len(c.times)} timed steps (gradient overflow); "
            "a skipped step does no optimizer update, so it is shorter than a real one."
        )
    if c.error is None and len(c.times) >= FLOOR_ROUNDS and _relative_iqr_sorted(c.sorted_times) >= STABLE_IQR_FRACTION:
        notes.append(
            f"Timing did not settle: the IQR is {_relative_iqr_sorted(c.sorted_times):.0%} of the median "
            "when the budget ran out (a busy machine?); a longer --bench-seconds narrows the error bars."
        )
    return SpeedResult(
        arm=c.key,
        times_s=tuple(c.times) if c.error is None else (),
        batch_size=samples,
        flops_per_step=c.flops,
        peak_tflops=peak,
        peak_source=source,
        compiled=c.compiled,
        error=c.error,
        notes=tuple(notes),
    )


def _baseline_key(key: str) -> str | None:
    """The fp32 result each key is compared with, or None for the fp32 eager arm itself."""
    if key == BASELINE:
        return None
    if key == BASELINE + COMPILE_SUFFIX:
        return BASELINE
    return BASELINE + COMPILE_SUFFIX if key.endswith(COMPILE_SUFFIX) else BASELINE


def _speedups(
    results: dict[str, SpeedResult], contestants: dict[str, _Contestant], device: torch.device
) -> dict[str, Speedup]:
    out: dict[str, Speedup] = {}
    for key, result in results.items():
        base_key = _baseline_key(key)
        base = results.get(base_key) if base_key else None
        if base is None or base_key is None or base.error or result.error or not result.times_s:
            continue
        n = min(len(base.times_s), len(result.times_s))
        ratio, low, high = bootstrap_speedup(base.times_s[:n], result.times_s[:n])
        sp = Speedup(arm=key, baseline=base_key, ratio=ratio, ci_low=low, ci_high=high, rounds=n, confidence=CONFIDENCE)
        note = _sanity_note(sp, contestants[key], base, result, device)
        out[key] = replace(sp, note=note) if note else sp
    return out


def _sanity_note(
    sp: Speedup, c: _Contestant, base: SpeedResult, result: SpeedResult, device: torch.device
) -> str | None:
    """A likely cause when a mixed-precision speedup is impossible (above the hardware) or a slowdown."""
    name = _dtype_name(c.arm)
    if name == "fp32":
        return None
    limit = theoretical_ratio(device, c.arm)
    if limit is not None and sp.ci_low > limit:
        return (
            f"{sp.arm} measured {sp.ratio:.2f}x faster than {sp.baseline}, above the {limit:g}x this hardware "
            f"can give {name} over fp32: the {sp.baseline} arm probably hit a slow path (fp32 denormals on a "
            "CPU, a different kernel) or the machine's load changed during the run; rerun before trusting it."
        )
    if sp.verdict != "slower":
        return None
    causes: list[str] = []
    if not dtype_support(device).get(name, True):
        if device.type == "cpu" and name == "fp16":
            causes.append(
                "fp16 is emulated on this CPU (it has no native fp16 arithmetic), so this says nothing about "
                "fp16 on hardware that has it"
            )
        else:
            causes.append(f"this {device.type.upper()} has no native {name} arithmetic, so {name} math is emulated")
    if base.step_s_median < LATENCY_BOUND_S:
        causes.append(
            f"the step is latency-bound ({base.step_s_median * 1e3:.2f} ms): per-op overhead dominates, "
            "lower precision cannot shrink it" + (", and autocast adds cast ops" if c.arm.autocast_dtype else "")
        )
    if (c.arm.autocast_dtype is not None and result.flops_per_step and c.params
            and result.flops_per_step / c.params < CAST_BOUND_FLOPS_PER_PARAM):  # a half-weight arm casts no weight
        causes.append(
            f"casts dominate: only {result.flops_per_step / c.params:.0f} FLOPs per weight per step (a small "
            "batch), while autocast re-casts every weight to 16 bits each step"
        )
    if not causes:
        causes.append("no obvious one; profile a step with torch.profiler to see which ops got slower")
    return f"{sp.arm} is slower than {sp.baseline} ({sp.ratio:.2f}x). Likely cause: " + "; ".join(causes) + "."
