"""``--verify``: keep-list and loss-scale recommendations, each trained as an extra arm before it is given."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mpaudit
from conftest import OVERFLOW_TASK, TINY_TASK
from factories import make_arm
from mpaudit.arms import ARMS
from mpaudit.ci.recommend import Criteria, rank_layers, rank_lost_updates, recommend
from mpaudit.ci.verdict import SAFE_WITH_CHANGES, verdict
from mpaudit.cli import app
from mpaudit.numerics.layerstats import TensorStats, TraceSummary
from mpaudit.report.html import render_html
from mpaudit.report.snippets import snippet
from mpaudit.results.model import ArmResult, AuditResult, Flag, Recommendation

STEPS = 20
GATE = {"accuracy": 0.05}

# Gradients 1e-12 times too small: Adam (eps tiny, so scale-invariant) still learns in fp32, but at
# GradScaler's default 2^16 the fp16 gradients flush to zero and the fp16 arm does not learn.
UNDERFLOW_TASK = TINY_TASK.replace(
    "return nn.functional.cross_entropy(model(x), y)", "return nn.functional.cross_entropy(model(x), y) * 1e-12"
).replace("torch.optim.AdamW(model.parameters(), lr=1e-2)", "torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-30)")


def _write(tmp: Path, source: str, name: str) -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(scope="module")
def overflow_result(tmp_path_factory: pytest.TempPathFactory) -> AuditResult:
    path = _write(tmp_path_factory.mktemp("overflow"), OVERFLOW_TASK, "overflow.py")
    return mpaudit.audit(path, arms=("fp32", "fp16"), steps=STEPS, bench=False, max_drop=GATE, verify=True)


def test_overflow_keep_list_is_the_minimal_set_and_passes_the_gate(overflow_result: AuditResult) -> None:
    assert not overflow_result.gate.passed  # the fp16 arm as is fails
    (rec,) = overflow_result.recommendations
    # `amp` alone is not enough: its fp32 output (~1e6) is cast to fp16 by fc2's matmul under autocast and
    # overflows there; keeping fc2 too carries it in fp32 until `down` brings it back into fp16's range.
    assert rec.arm == "fp16" and rec.keep_fp32 == ["amp", "fc2"] and rec.init_scale is None
    assert rec.passed
    # add amp (fails), add fc2 (passes), drop amp (fails): dropping fc2 leaves {amp}, already known to fail
    assert rec.runs_used == 3
    after = overflow_result.verification[rec.verified_arm or ""]
    base = overflow_result.arms["fp32"]
    assert after.status == "ok"
    assert abs(after.metrics["accuracy"] - base.metrics["accuracy"]) <= GATE["accuracy"]
    assert after.fingerprints == base.fingerprints
    assert set(overflow_result.arms) == {"fp32", "fp16"}  # extra arms live apart from `arms`


def test_failing_arm_with_a_passing_recommendation_is_safe_with_changes(overflow_result: AuditResult) -> None:
    v = verdict(overflow_result, "fp16")
    assert v.level == SAFE_WITH_CHANGES
    assert "`amp`, `fc2`" in v.reasons[0]


def test_recommendations_round_trip_through_json(overflow_result: AuditResult) -> None:
    back = AuditResult.from_json(overflow_result.to_json())
    assert back.recommendations == overflow_result.recommendations
    assert back.verification.keys() == overflow_result.verification.keys()
    assert back.to_json() == overflow_result.to_json()
    d = overflow_result.to_dict()["recommendations"][0]
    assert set(d) == {"arm", "keep_fp32", "init_scale", "fp32_master", "update_rounding", "exclude_from_fp8",
                      "fp8_recipe", "verified_arm", "passed", "metrics", "runs_used", "reason"}
    assert d["fp32_master"] == [] and d["update_rounding"] is None


def test_html_shows_the_recommendation_and_a_snippet_escaped(overflow_result: AuditResult) -> None:
    html = render_html(overflow_result, plotlyjs="cdn")
    assert 'id="recommendations"' in html
    assert "mpaudit.keep_fp32(model, [&#39;amp&#39;, &#39;fc2&#39;])" in html
    (rec,) = overflow_result.recommendations
    evil = replace(overflow_result, recommendations=[replace(rec, keep_fp32=["<script>x</script>"])])
    assert "<script>x</script>" not in render_html(evil, plotlyjs="cdn")


def test_underflowing_gradients_get_a_verified_loss_scale(tmp_path: Path) -> None:
    path = _write(tmp_path, UNDERFLOW_TASK, "underflow.py")
    result = mpaudit.audit(path, arms=("fp32", "fp16"), steps=STEPS, bench=False, verify=True)
    base, fp16 = result.arms["fp32"], result.arms["fp16"]
    assert fp16.metrics["accuracy"] < base.metrics["accuracy"] - 0.05  # fp16 as is does not learn
    rec = result.recommendations[0]
    assert rec.init_scale is not None and rec.init_scale > 2.0**16 and rec.keep_fp32 == []
    assert rec.passed and rec.runs_used == 1
    after = result.verification[rec.verified_arm or ""]
    assert after.loss_scale is not None and after.loss_scale.history[0] == rec.init_scale
    assert after.metrics["accuracy"] == pytest.approx(base.metrics["accuracy"], abs=0.02)
    assert f"init_scale=2**{int(rec.init_scale).bit_length() - 1}" in snippet(rec)


def test_clean_model_gets_no_recommendation_and_no_extra_arm(tiny_task: Path) -> None:
    result = mpaudit.audit(tiny_task, arms=("fp32", "bf16"), steps=10, bench=False, verify=True)
    assert result.recommendations == [] and result.verification == {}
    assert "nothing to recommend" in render_html(result, plotlyjs="cdn")


def test_the_budget_bounds_the_extra_runs(overflow_result: AuditResult) -> None:
    failing = overflow_result.arms["fp16"]
    calls: list[str] = []

    def train(arm: mpaudit.arms.Arm) -> mpaudit.ArmResult:  # every try fails like the arm itself did
        calls.append(arm.name)
        return replace(failing, name=arm.name)

    criteria = Criteria(baseline=overflow_result.arms["fp32"], max_drop=GATE)
    recs, extra = recommend([ARMS["fp32"], ARMS["fp16"]], overflow_result.arms, overflow_result.flags, criteria,
                            train, budget=1)
    assert len(calls) == 1
    assert [r.passed for r in recs] == [False]
    assert "budget ran out" in recs[0].reason and sum(r.runs_used for r in recs) == 1
    assert set(extra) == {recs[0].verified_arm}  # the last keep-list tried, kept as evidence


def test_layers_with_error_flags_rank_first() -> None:
    flags = [
        Flag("b", "fp16", "precision_loss", "warning", {}, ""),
        Flag("a", "fp16", "forward_overflow", "error", {"first_inf_step": 0}, ""),
        Flag("c", "fp16", "forward_overflow", "error", {}, ""),
        Flag("z", "bf16", "forward_overflow", "error", {}, ""),
    ]
    assert rank_layers("fp16", flags, None, None, {"d": -3.0, "b": 10.0}) == ["a", "c", "b", "d"]


def test_cli_has_the_verify_options(tiny_task: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    assert "--verify" in help_text and "--verify-budget" in help_text
    bad = runner.invoke(app, ["run", str(tiny_task), "--verify", "--verify-budget", "0", "--no-bench"])
    assert bad.exit_code == 2 and "--verify-budget must be at least 1" in bad.output


# ------------------------------------------------------------------------------- honest claims, fair budget


def _fake(passing: Callable[[mpaudit.arms.Arm], bool], calls: list[str]) -> Callable[[mpaudit.arms.Arm], ArmResult]:
    """A trainer that runs nothing: the arm reaches fp32's accuracy when ``passing(arm)``, else falls far behind."""

    def train(arm: mpaudit.arms.Arm) -> ArmResult:
        calls.append(arm.name + ":" + ",".join(arm.keep_fp32))
        return make_arm(arm.name, accuracy=0.9 if passing(arm) else 0.5)

    return train


def _roots(*layers: str) -> list[Flag]:
    return [Flag(layer=layer, arm="fp16", kind="forward_overflow", severity="error", evidence={"first_inf_step": 0},
                 recommendation=f"keep `{layer}` in fp32") for layer in layers]


FAILING = {"fp32": make_arm("fp32", accuracy=0.9), "fp16": make_arm("fp16", "diverged", error="nan", accuracy=0.1)}


def test_a_keep_list_is_called_minimal_only_when_every_removal_was_trained_and_failed() -> None:
    calls: list[str] = []
    train = _fake(lambda arm: {"a", "b"} <= set(arm.keep_fp32), calls)
    criteria = Criteria(baseline=FAILING["fp32"])
    (rec,), _ = recommend([ARMS["fp32"], ARMS["fp16"]], FAILING, _roots("a", "b", "c"), criteria, train, budget=8)
    assert rec.passed and rec.keep_fp32 == ["a", "b"]
    assert "minimal: removing any one of them fails, each removal trained" in rec.reason
    assert "fp16+keep:b" in calls  # {a} was tried while adding; {b} only to show minimality

    calls.clear()
    (short,), _ = recommend([ARMS["fp32"], ARMS["fp16"]], FAILING, _roots("a", "b", "c"), criteria, train, budget=2)
    assert short.passed and short.keep_fp32 == ["a", "b"] and "; minimal:" not in short.reason
    assert "sufficient, not shown minimal: 1 of 2 removals trained; --verify-budget ran out" in short.reason


def test_the_budget_goes_to_the_diverged_arm_first_and_never_to_a_gap_within_noise() -> None:
    results = {
        "fp32": make_arm("fp32", accuracy=0.90),
        "bf16": make_arm("bf16", accuracy=0.85),
        "fp16": make_arm("fp16", "diverged", error="nan", accuracy=0.1),
    }
    calls: list[str] = []
    criteria = Criteria(baseline=results["fp32"], max_drop={"accuracy": 0.01})
    recs, _ = recommend([ARMS["fp32"], ARMS["bf16"], ARMS["fp16"]], results,
                        [*_roots("a"), Flag(layer="x", arm="bf16", kind="precision_loss", severity="warning",
                                            evidence={}, recommendation="keep `x` in fp32")],
                        criteria, _fake(lambda arm: True, calls), budget=1)
    assert calls == ["fp16+keep:a"]
    assert [(r.arm, r.passed) for r in recs] == [("fp16", True), ("bf16", False)]
    assert "budget ran out" in recs[1].reason
    # with fp32's seed noise known, a gap within it is not searched at all
    noisy = [make_arm("fp32", accuracy=0.80), make_arm("fp32", accuracy=0.95)]
    criteria = Criteria(baseline=results["fp32"], baseline_replicates=noisy)
    calls.clear()
    (rec,), _ = recommend([ARMS["fp32"], ARMS["bf16"]], results, [], criteria, _fake(lambda arm: True, calls))
    assert calls == [] and rec.arm == "bf16" and "within fp32's seed noise" in rec.reason


def test_no_message_says_none() -> None:
    calls: list[str] = []
    recs, _ = recommend([ARMS["fp32"], ARMS["fp16"]], FAILING, _roots("a"), Criteria(baseline=FAILING["fp32"]),
                        _fake(lambda arm: False, calls), budget=0)
    recs += recommend([ARMS["fp32"], ARMS["fp16"]], FAILING, [], Criteria(baseline=FAILING["fp32"]),
                      _fake(lambda arm: False, calls), budget=2)[0]
    for rec in recs:
        assert "None" not in rec.reason and rec.reason


# ------------------------------------------------------------------------------- bf16-pure: lost updates


def _update_trace(zeros: dict[str, float], n: int = 1000) -> TraceSummary:
    """A trace whose layers' sampled updates are exactly zero in the given shares (the rest 2^-5 of the weight)."""
    stats = {}
    for layer, share in zeros.items():
        values = np.full(n, 2.0**-5)
        values[: round(share * n)] = 0.0
        stats[(layer, "update:weight")] = TensorStats.from_array(values)
    return TraceSummary(stats=stats, steps=(0,), loss_scales=(None,), layers=tuple(zeros))


PURE = replace(make_arm("bf16-pure", accuracy=0.5), trace=_update_trace({"a": 0.9, "b": 0.5, "c": 0.2, "d": 0.0}))
HALF = {"fp32": replace(make_arm("fp32", accuracy=0.9), trace=_update_trace(dict.fromkeys("abcd", 0.0))),
        "bf16-pure": PURE}


def _fake_half(passing: Callable[[mpaudit.arms.Arm], bool],
               calls: list[str]) -> Callable[[mpaudit.arms.Arm], ArmResult]:
    def train(arm: mpaudit.arms.Arm) -> ArmResult:
        calls.append(arm.name + (":" + ",".join(arm.fp32_master) if arm.fp32_master else ""))
        assert arm.weights_dtype == "bfloat16" and not arm.keep_fp32  # a half-weight arm's fixes, never autocast's
        return replace(make_arm(arm.name, accuracy=0.9 if passing(arm) else 0.5), weights_dtype=arm.weights_dtype,
                       update_rounding=arm.update_rounding, fp32_master=list(arm.fp32_master))

    return train


def test_lost_updates_rank_the_fp32_master_candidates() -> None:
    assert rank_lost_updates(PURE.trace, HALF["fp32"].trace) == ["a", "b", "c"]  # none lost at d: not a candidate
    assert rank_lost_updates(None, None) == []


def test_stochastic_rounding_is_tried_first_and_one_run_suffices() -> None:
    calls: list[str] = []
    recs, extra = recommend([ARMS["fp32"], ARMS["bf16-pure"]], HALF, [], Criteria(baseline=HALF["fp32"]),
                            _fake_half(lambda arm: True, calls))
    assert calls == ["bf16-pure+sr"]
    (rec,) = recs
    assert rec.passed and rec.update_rounding == "stochastic" and rec.fp32_master == [] and rec.runs_used == 1
    assert rec.verified_arm == "bf16-pure+sr" and set(extra) == {"bf16-pure+sr"}
    assert rec.reason == "stochastically rounded bf16 updates: bf16-pure trains as well as fp32"


def test_then_kahan_then_the_smallest_fp32_master_list_with_an_honest_claim() -> None:
    calls: list[str] = []
    only_kahan = _fake_half(lambda arm: arm.update_rounding == "kahan", calls)
    recs, _ = recommend([ARMS["fp32"], ARMS["bf16-pure"]], HALF, [], Criteria(baseline=HALF["fp32"]), only_kahan)
    assert calls == ["bf16-pure+sr", "bf16-pure+kahan"]
    assert [(r.update_rounding, r.passed) for r in recs] == [("stochastic", False), ("kahan", True)]
    assert "still does not pass (accuracy 0.5)" in recs[0].reason

    calls.clear()
    needs_ab = _fake_half(lambda arm: {"a", "b"} <= set(arm.fp32_master), calls)
    recs, extra = recommend([ARMS["fp32"], ARMS["bf16-pure"]], HALF, [], Criteria(baseline=HALF["fp32"]), needs_ab,
                            budget=8)
    assert calls == ["bf16-pure+sr", "bf16-pure+kahan", "bf16-pure+master:a", "bf16-pure+master:a,b",
                     "bf16-pure+master:b"]
    master = recs[-1]
    assert master.passed and master.fp32_master == ["a", "b"] and master.update_rounding is None
    assert master.keep_fp32 == [] and master.runs_used == 3
    assert "an fp32 master copy of `a`, `b`" in master.reason
    assert "minimal: removing any one of them fails, each removal trained" in master.reason
    assert extra["bf16-pure+master"].fp32_master == ["a", "b"]

    calls.clear()
    (_, _, short), _ = recommend([ARMS["fp32"], ARMS["bf16-pure"]], HALF, [], Criteria(baseline=HALF["fp32"]),
                                 needs_ab, budget=4)
    assert short.passed and short.fp32_master == ["a", "b"] and "; minimal:" not in short.reason
    assert "sufficient, not shown minimal: 1 of 2 removals trained; --verify-budget ran out" in short.reason


def test_a_half_weight_search_stops_where_the_budget_does() -> None:
    calls: list[str] = []
    recs, _ = recommend([ARMS["fp32"], ARMS["bf16-pure"]], HALF, [], Criteria(baseline=HALF["fp32"]),
                        _fake_half(lambda arm: False, calls), budget=1)
    assert calls == ["bf16-pure+sr"]
    assert [(r.update_rounding, r.passed) for r in recs] == [("stochastic", False), ("kahan", False)]
    assert "--verify-budget ran out before it was trained" in recs[1].reason and recs[1].verified_arm is None


def test_snippets_apply_master_copies_and_update_rounding() -> None:
    sr = Recommendation(arm="bf16-pure", update_rounding="stochastic", passed=True)
    code = snippet(sr)
    assert "model = model.to(torch.bfloat16)" in code
    assert "optimizer = mpaudit.bf16_optimizer(model, build_optimizer, rounding='stochastic')" in code
    assert "bf16_stochastic_round=True" in code  # torchao's AdamW, where installed, rounds the same way
    master = snippet(Recommendation(arm="bf16-pure", fp32_master=["encoder.0", "head"], passed=True))
    assert "mpaudit.bf16_optimizer(model, build_optimizer, fp32_master=['encoder.0', 'head'])" in master
    assert "torchao" not in master
    kahan = snippet(Recommendation(arm="bf16-pure", update_rounding="kahan", passed=True))
    assert "rounding='kahan'" in kahan
    for text in (code, master, kahan):
        compile(text, "<snippet>", "exec")  # valid Python
