"""Gate arithmetic: which direction is worse, limits, failed and diverged arms, malformed specs."""

from __future__ import annotations

import math

import pytest

from factories import make_arm
from mpaudit.ci.gaps import lower_is_better, t_interval
from mpaudit.ci.gate import evaluate_gate, parse_max_drop
from mpaudit.errors import UsageError
from mpaudit.results.model import ArmResult

arm = make_arm


def test_parse_max_drop() -> None:
    assert parse_max_drop(["accuracy=0.01", " eval_loss = 0.2"]) == {"accuracy": 0.01, "eval_loss": 0.2}
    for bad in ["accuracy", "=0.1", "accuracy=abc", "accuracy=-1", "accuracy=nan"]:
        with pytest.raises(UsageError):
            parse_max_drop([bad])


def test_lower_is_better_by_name() -> None:
    assert lower_is_better("eval_loss") and lower_is_better("perplexity")
    assert not lower_is_better("accuracy") and not lower_is_better("f1")


def test_drop_within_and_beyond_limit() -> None:
    arms = {"fp32": arm("fp32", accuracy=0.90), "bf16": arm("bf16", accuracy=0.895),
            "fp16": arm("fp16", accuracy=0.85)}
    gate = evaluate_gate(arms, {"accuracy": 0.01}, None)
    by_arm = {c.arm: c for c in gate.checks}
    assert by_arm["bf16"].passed and not by_arm["fp16"].passed
    assert not gate.passed
    assert by_arm["fp16"].delta == pytest.approx(-0.05)
    assert "fp16 accuracy = 0.85 vs fp32 0.9" in by_arm["fp16"].message
    assert "0.01" in by_arm["fp16"].message


def test_improvement_passes() -> None:
    arms = {"fp32": arm("fp32", accuracy=0.8), "bf16": arm("bf16", accuracy=0.9)}
    gate = evaluate_gate(arms, {"accuracy": 0.0}, None)
    assert gate.passed


def test_loss_metric_fails_when_it_rises() -> None:
    arms = {"fp32": arm("fp32", eval_loss=0.30), "bf16": arm("bf16", eval_loss=0.25),
            "fp16": arm("fp16", eval_loss=0.50)}
    gate = evaluate_gate(arms, {"eval_loss": 0.1}, None)
    assert [c.passed for c in gate.checks] == [True, False]


def test_max_loss_gap_on_final_training_loss() -> None:
    arms = {"fp32": arm("fp32", loss=0.30), "bf16": arm("bf16", loss=0.32), "fp16": arm("fp16", loss=0.60)}
    gate = evaluate_gate(arms, {}, 0.05)
    assert [(c.arm, c.passed) for c in gate.checks] == [("bf16", True), ("fp16", False)]


def test_failed_or_diverged_arm_fails_the_gate() -> None:
    arms = {"fp32": arm("fp32", accuracy=0.9), "bf16": arm("bf16", status="failed"),
            "fp16": arm("fp16", status="diverged", accuracy=0.9)}
    gate = evaluate_gate(arms, {"accuracy": 0.5}, None)
    assert not any(c.passed for c in gate.checks)
    assert "diverged" in gate.checks[1].message


def test_nonfinite_metric_fails() -> None:
    arms = {"fp32": arm("fp32", accuracy=0.9), "fp16": arm("fp16", accuracy=math.nan)}
    assert not evaluate_gate(arms, {"accuracy": 1.0}, None).passed


def test_missing_baseline_fails_every_check() -> None:
    arms = {"fp32": arm("fp32", status="failed"), "bf16": arm("bf16", accuracy=0.9)}
    gate = evaluate_gate(arms, {"accuracy": 0.1}, None)
    assert not gate.passed and "baseline failed" in gate.checks[0].message


def test_no_gate_given_passes_with_no_checks() -> None:
    gate = evaluate_gate({"fp32": arm("fp32"), "bf16": arm("bf16")}, {}, None)
    assert gate.passed and not gate.given and gate.checks == []


def seeded(name: str, values: list[float], status: str = "ok") -> list[ArmResult]:
    return [arm(name, status=status, accuracy=v) for v in values]


def gate_over_seeds(fp32: list[float], other: list[float], limit: float | str, status: str = "ok"):
    base, mp = seeded("fp32", fp32), seeded("fp16", other, status)
    return evaluate_gate({"fp32": base[0], "fp16": mp[0]}, {"accuracy": limit}, None,
                         {"fp32": base[1:], "fp16": mp[1:]}, noise_k=3.0)


def test_auto_limit_is_k_sigma_of_fp32_seed_noise() -> None:
    fp32 = [0.90, 0.92, 0.91]  # sigma = 0.01 -> limit 0.03
    ok = gate_over_seeds(fp32, [0.89, 0.90, 0.89], "auto")  # mean drop 0.0167
    assert ok.passed
    assert ok.noise_floor["accuracy"].std == pytest.approx(0.01)
    assert ok.checks[0].limit == pytest.approx(0.03)
    bad = gate_over_seeds(fp32, [0.85, 0.86, 0.88], "auto")  # mean drop 0.0467
    assert not bad.passed
    msg = bad.checks[0].message
    assert "3σ of fp32's seed noise" in msg and "σ=0.01" in msg and "3 seeds" in msg
    check = bad.checks[0]
    assert check.delta == pytest.approx(-0.0467, abs=1e-3)
    assert check.delta_low is not None and check.delta_high is not None
    assert check.delta_low < check.delta < check.delta_high


def test_numeric_limit_uses_the_mean_paired_drop_over_seeds() -> None:
    gate = gate_over_seeds([0.90, 0.92, 0.91], [0.90, 0.90, 0.90], 0.02)  # mean drop 0.01
    assert gate.passed and gate.checks[0].seeds == 3
    assert "σ=0.01" in gate.checks[0].message  # the noise floor is shown even with a numeric limit


def test_one_diverged_seed_fails() -> None:
    base, mp = seeded("fp32", [0.9, 0.9]), seeded("fp16", [0.9, 0.9])
    mp[1] = arm("fp16", status="diverged", accuracy=0.3)
    gate = evaluate_gate({"fp32": base[0], "fp16": mp[0]}, {"accuracy": 0.5}, None,
                         {"fp32": base[1:], "fp16": mp[1:]})
    assert not gate.passed


def test_auto_without_seeds_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--seeds 2 or more"):
        evaluate_gate({"fp32": arm("fp32", accuracy=0.9), "bf16": arm("bf16", accuracy=0.9)},
                      {"accuracy": "auto"}, None)
    assert parse_max_drop(["accuracy=auto"]) == {"accuracy": "auto"}


def test_t_interval() -> None:
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean - low == pytest.approx(high - mean)
    assert mean == 2.0
    assert high - mean == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-3)
    assert t_interval([5.0]) == (5.0, 5.0, 5.0)
