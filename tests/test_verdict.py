"""Every verdict level, and the one "no gate given" rule shared by the verdict and ``--verify``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from factories import make_arm, make_result
from mpaudit.ci.gaps import UNGATED_RELATIVE_DROP, ungated_drop
from mpaudit.ci.recommend import ungated_ok
from mpaudit.ci.verdict import verdict, verdicts
from mpaudit.results.model import Flag, Recommendation
from mpaudit.vocab import BASELINE_LEVEL, NOT_SAFE, SAFE, SAFE_WITH_CHANGES


def test_fp32_is_the_baseline_and_a_matching_arm_is_safe() -> None:
    result = make_result(make_arm("fp32", accuracy=0.90), make_arm("bf16", accuracy=0.899))
    levels = {name: v.level for name, v in verdicts(result).items()}
    assert levels == {"fp32": BASELINE_LEVEL, "bf16": SAFE}
    assert "within 2% on accuracy" in verdict(result, "bf16").reasons[0]


@pytest.mark.parametrize("status", ["diverged", "failed"])
def test_an_arm_that_did_not_finish_is_not_safe(status: str) -> None:
    result = make_result(make_arm("fp32", accuracy=0.9), make_arm("fp16", status, error="loss became nan"))
    v = verdict(result, "fp16")
    assert v.level == NOT_SAFE and v.reasons[0] == f"{status}: loss became nan"


def test_a_failed_gate_is_not_safe_and_a_passed_one_is_safe() -> None:
    arms = (make_arm("fp32", accuracy=0.90), make_arm("bf16", accuracy=0.88))
    failed = make_result(*arms, max_drop={"accuracy": 0.01})
    assert verdict(failed, "bf16").level == NOT_SAFE
    assert verdict(failed, "bf16").reasons[0].startswith("gate failed: bf16 accuracy")
    assert verdict(make_result(*arms, max_drop={"accuracy": 0.05}), "bf16").level == SAFE


def test_without_a_gate_a_clear_drop_is_not_safe() -> None:
    result = make_result(make_arm("fp32", accuracy=0.90), make_arm("fp16", accuracy=0.80))
    v = verdict(result, "fp16")
    assert v.level == NOT_SAFE and "more than 2% worse" in v.reasons[0]


def test_an_error_flag_makes_an_arm_that_matches_fp32_safe_with_changes() -> None:
    flag = Flag(layer="fc1", arm="fp16", kind="forward_overflow", severity="error", evidence={},
                recommendation="keep `fc1` in fp32")
    result = make_result(make_arm("fp32", accuracy=0.9), make_arm("fp16", accuracy=0.9), flags=[flag])
    v = verdict(result, "fp16")
    assert v.level == SAFE_WITH_CHANGES and "forward_overflow at fc1" in v.reasons[0]


def test_a_failing_arm_with_a_verified_fix_is_safe_with_changes() -> None:
    result = make_result(make_arm("fp32", accuracy=0.9), make_arm("fp16", "diverged", error="nan"))
    fix = Recommendation(arm="fp16", keep_fp32=["fc1"], verified_arm="fp16+keep", passed=True,
                         metrics={"accuracy": 0.9}, runs_used=1, reason="keeping `fc1` in fp32: trains as fp32")
    v = verdict(replace(result, recommendations=[fix]), "fp16")
    assert v.level == SAFE_WITH_CHANGES and v.reasons[0].startswith("verified by training: keeping `fc1`")


def test_without_evaluate_the_verdict_and_verify_judge_the_final_loss_alike() -> None:
    """A task without evaluate(): the final training loss decides, for the verdict and for --verify."""
    base = make_arm("fp32", loss=1.00)
    close, far = make_arm("fp16", loss=1.00 + UNGATED_RELATIVE_DROP / 2), make_arm("bf16", loss=1.5)
    result = make_result(base, close, far)
    assert verdict(result, "fp16").level == SAFE and ungated_ok(close, base)
    assert "within 2% on final_loss" in verdict(result, "fp16").reasons[0]
    assert verdict(result, "bf16").level == NOT_SAFE and not ungated_ok(far, base)
    assert "final_loss" in (ungated_drop(far, base) or "")


def test_lower_is_better_metrics_are_judged_the_right_way_round() -> None:
    result = make_result(make_arm("fp32", eval_loss=1.0), make_arm("bf16", eval_loss=0.9),
                         make_arm("fp16", eval_loss=1.1))
    assert verdict(result, "bf16").level == SAFE
    assert verdict(result, "fp16").level == NOT_SAFE
