"""The speed and memory result types: derived numbers, verdicts, and a lossless JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from mpaudit.results.codec import dumps, from_plain
from mpaudit.results.model import ArmResult, AuditResult
from mpaudit.results.perf import (
    BREAKDOWN_KEYS,
    MemoryResult,
    SpeedResult,
    Speedup,
    activation_savings,
)


def _speed(times: tuple[float, ...] = (0.010, 0.011, 0.012, 0.013, 0.014), **kw: object) -> SpeedResult:
    args: dict[str, object] = {"arm": "bf16", "times_s": times, "batch_size": 32, "flops_per_step": 2e10}
    args.update(kw)
    return SpeedResult(**args)  # type: ignore[arg-type]


def _memory(arm: str, activations: int) -> MemoryResult:
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 100)
    breakdown["activations"] = activations
    return MemoryResult(
        arm=arm,
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        at_peak=dict(breakdown),
        method="storage_tracker",
        batch_size=64,
        batch_scaling=((500, activations), (600, 0)),
    )


def _speedup(low: float, high: float) -> Speedup:
    return Speedup(arm="bf16", baseline="fp32", ratio=(low + high) / 2, ci_low=low, ci_high=high, rounds=20)


def test_speed_numbers_follow_from_the_round_times() -> None:
    r = _speed(peak_tflops=10.0)
    assert r.steps_timed == 5
    assert r.step_s_median == pytest.approx(0.012)
    assert r.step_s_iqr == pytest.approx(0.002)  # inclusive quartiles of 10..14 ms: 11 and 13
    assert r.samples_per_s == pytest.approx(32 / 0.012)
    assert r.achieved_tflops == pytest.approx(2e10 / 0.012 / 1e12)
    assert r.peak_fraction == pytest.approx(2e10 / 0.012 / 1e12 / 10.0)


def test_peak_fraction_is_none_without_a_known_peak() -> None:
    assert _speed().peak_fraction is None
    assert _speed(flops_per_step=None).achieved_tflops is None


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [(1.2, 1.5, "faster"), (0.9, 1.1, "same"), (1.0, 1.3, "same"), (0.5, 0.8, "slower")],
)
def test_verdict_follows_the_confidence_interval(low: float, high: float, verdict: str) -> None:
    assert _speedup(low, high).verdict == verdict


def test_activation_savings_compare_each_arm_with_fp32() -> None:
    memory = {"fp32": _memory("fp32", 1000), "bf16": _memory("bf16", 400), "fp16": _memory("fp16", 500)}
    assert activation_savings(memory) == {"bf16": pytest.approx(0.6), "fp16": pytest.approx(0.5)}
    assert activation_savings({"bf16": memory["bf16"]}) == {}  # no baseline, no saving


def test_results_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _speed().arm = "fp16"  # type: ignore[misc]


def test_round_trip_through_strict_json_keeps_everything() -> None:
    failed = _speed((), arm="fp16+compile", compiled=True, error="torch.compile failed: boom")

    def arm(name: str, memory: MemoryResult) -> ArmResult:
        return ArmResult(name=name, status="ok", loss=[1.0], metrics={}, steps=1, train_s=1.0,
                         speed=_speed(notes=("a note",)), memory=memory)

    result = AuditResult(
        task="t", env={}, config={}, arms={"fp32": arm("fp32", _memory("fp32", 1000)),
                                           "bf16": arm("bf16", _memory("bf16", 400))},
        speedups={"bf16": dataclasses.replace(_speedup(1.1, 1.4), note="why")},
        compiled={"fp16+compile": failed}, perf_notes=["TF32 off"],
    )
    text = result.to_json()  # the NaN median of the failed arm is a string: strict JSON
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = AuditResult.from_json(text)
    assert back.to_json() == text
    assert back.speedups == result.speedups and back.arms["bf16"].memory == result.arms["bf16"].memory
    assert math.isnan(back.compiled["fp16+compile"].step_s_median)
    assert from_plain(SpeedResult, json.loads(dumps(failed))).error == failed.error
    data = json.loads(text)
    assert data["speedups"]["bf16"]["verdict"] == "faster"
    assert data["arms"]["bf16"]["speed"]["steps_timed"] == 5
    assert data["arms"]["bf16"]["memory"]["activation_bytes"] == 400
    assert data["activation_savings"] == {"bf16": pytest.approx(0.6)}
