"""``compare``: did a change make an arm's gap to fp32 grow, an arm diverge, an error flag appear, a speedup shrink?"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import mpaudit
from conftest import OVERFLOW_TASK, TINY_TASK
from factories import make_arm, make_result
from mpaudit.ci.compare import compare, to_dict
from mpaudit.errors import ResultError, UsageError
from mpaudit.report.compare_view import to_markdown, to_text
from mpaudit.results.io import load_result
from mpaudit.results.model import ArmResult, AuditResult, Flag
from mpaudit.results.perf import MemoryResult, Speedup

arm = make_arm


def result(*arms: ArmResult, replicates: dict[str, list[ArmResult]] | None = None, flags: Sequence[Flag] = (),
           sha: str = "a" * 64, **env: Any) -> AuditResult:
    return make_result(*arms, replicates=replicates, flags=flags, env={"task_sha256": sha, **env})


def accuracy_pair(fp32: float, bf16: float, **env: Any) -> AuditResult:
    return result(arm("fp32", accuracy=fp32), arm("bf16", accuracy=bf16), **env)


# ------------------------------------------------------------------------------------ real runs, round trip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """report.json of the tiny task (main) and of the same file after a change that overflows fp16 (PR)."""
    out = {}
    for label, source in (("main", TINY_TASK), ("pr", OVERFLOW_TASK)):
        folder = tmp_path_factory.mktemp(label)
        task = folder / "model.py"
        task.write_text(source)
        res = mpaudit.audit(task, bench=False, steps=20, arms=("fp32", "bf16", "fp16"))
        out[label] = folder / "report.json"
        out[label].write_text(res.to_json())
    return out


def test_same_result_is_exit_0(runs: dict[str, Path]) -> None:
    base = load_result(runs["main"])
    c = compare(base, load_result(runs["main"]), {"accuracy": 0.0})
    assert c.comparable and c.exit_code == 0
    assert c.regressions == [] and c.improvements == []
    assert any("Same task file" in n for n in c.notes)
    assert "no regression (exit 0)" in to_text(c)
    assert [r.arm for r in c.arms] == ["fp32", "bf16", "fp16"]


def test_change_that_breaks_fp16_is_a_regression_and_the_new_task_hash_is_reported(runs: dict[str, Path]) -> None:
    c = compare(load_result(runs["main"]), load_result(runs["pr"]), {"accuracy": 0.05})
    assert c.exit_code == 1
    assert c.regressions[0].startswith("fp16 accuracy: the gap to fp32 grew by")
    assert any(r.startswith("fp16: new error flag forward_overflow") for r in c.regressions)  # found by tracing
    assert "beyond the allowed 0.05" in c.regressions[0]
    assert any("The task file changed" in n for n in c.notes)
    assert any("fp16 skipped" in n for n in c.notes)
    text, md = to_text(c), to_markdown(c)
    n = len(c.regressions)
    assert f"REGRESSIONS ({n})" in text and f"result: {n} regression" in text and "(exit 1)" in text
    assert md.startswith("### ❌ mpaudit compare") and "fp16 accuracy: the gap to fp32 grew" in md


# ------------------------------------------------------------------------------------------------- gaps


def test_the_gap_to_fp32_matters_not_the_absolute_metric() -> None:
    base = accuracy_pair(0.90, 0.89)
    everything_lower = accuracy_pair(0.80, 0.79)  # a harder data set: every arm lost 10 points, the gap is the same
    c = compare(base, everything_lower, {"accuracy": 0.005})
    assert c.exit_code == 0, c.regressions
    row = c.arms[1].metrics[0]
    assert (row.arm, row.metric) == ("bf16", "accuracy")
    assert row.growth == pytest.approx(0.0, abs=1e-12)

    bf16_fell_behind = accuracy_pair(0.90, 0.85)
    c = compare(base, bf16_fell_behind, {"accuracy": 0.005})
    assert c.exit_code == 1
    assert c.regressions == [
        "bf16 accuracy: the gap to fp32 grew by 0.04 (-0.01 → -0.05), beyond the allowed 0.005."
    ]


def test_a_loss_metric_regresses_when_the_arm_rises_above_fp32() -> None:
    base = result(arm("fp32", eval_loss=0.30), arm("bf16", eval_loss=0.31))
    c = compare(base, result(arm("fp32", eval_loss=0.30), arm("bf16", eval_loss=0.40)), {"eval_loss": 0.05})
    assert c.exit_code == 1 and "bf16 eval_loss" in c.regressions[0]
    c = compare(base, result(arm("fp32", eval_loss=0.30), arm("bf16", eval_loss=0.20)), {"eval_loss": 0.05})
    assert c.exit_code == 0 and "bf16 eval_loss" in c.improvements[0]


def test_auto_tolerance_is_k_sigma_of_the_larger_noise_floor() -> None:
    def seeded(fp32: tuple[float, float], bf16: tuple[float, float]) -> AuditResult:
        return result(arm("fp32", accuracy=fp32[0]), arm("bf16", accuracy=bf16[0]),
                      replicates={"fp32": [arm("fp32", accuracy=fp32[1])], "bf16": [arm("bf16", accuracy=bf16[1])]})

    noisy_base = seeded((0.90, 0.92), (0.90, 0.92))  # fp32 σ = 0.01414
    quiet_new_small_drop = seeded((0.90, 0.90), (0.87, 0.87))
    c = compare(noisy_base, quiet_new_small_drop, {"accuracy": "auto"}, noise_k=3.0)
    row = c.arms[1].metrics[0]
    assert row.allowed == pytest.approx(3 * 0.0141421, rel=1e-4)
    assert "σ=0.0141 over 2 seeds in base" in row.limit_text
    assert any("fp32 seed noise σ, base → new: accuracy 0.0141 (2 seeds) → 0 (2 seeds)" in n for n in c.notes)
    assert c.exit_code == 0
    quiet_new_big_drop = seeded((0.90, 0.90), (0.85, 0.85))
    assert compare(noisy_base, quiet_new_big_drop, {"accuracy": "auto"}).exit_code == 1
    # without --tolerance the primary metric is gated the same way
    assert compare(noisy_base, quiet_new_big_drop).exit_code == 1


def test_without_seeds_or_tolerance_the_gap_is_shown_and_no_noise_estimate_is_said() -> None:
    c = compare(accuracy_pair(0.90, 0.90), accuracy_pair(0.90, 0.70))
    assert c.exit_code == 0
    assert c.arms[1].metrics[0].growth == pytest.approx(0.20)
    assert c.arms[1].metrics[0].allowed is None
    assert any(n.startswith("No noise estimate (run with --seeds K)") for n in c.notes)
    with pytest.raises(UsageError, match="needs a noise estimate"):
        compare(accuracy_pair(0.9, 0.9), accuracy_pair(0.9, 0.9), {"accuracy": "auto"})


def test_bad_tolerances_are_usage_errors() -> None:
    pair = accuracy_pair(0.9, 0.9)
    with pytest.raises(UsageError, match="accurcy"):
        compare(pair, pair, {"accurcy": 0.01})
    with pytest.raises(UsageError):
        compare(pair, pair, {"accuracy": -0.1})


# -------------------------------------------------------------------------------------- status and flags


def test_an_arm_that_diverges_in_new_is_a_regression() -> None:
    base = result(arm("fp32", accuracy=0.9), arm("fp16", accuracy=0.9))
    broken = result(arm("fp32", accuracy=0.9),
                    arm("fp16", status="diverged", error="loss became non-finite at step 7", accuracy=float("nan")))
    c = compare(base, broken)
    assert c.exit_code == 1
    assert c.regressions == ["fp16 diverged in new (it was ok in base): loss became non-finite at step 7."]
    fixed = compare(broken, base)
    assert fixed.exit_code == 0 and fixed.improvements == ["fp16 finished ok in new (it diverged in base)."]


def _flag(severity: str, layer: str = "encoder.amp", kind: str = "forward_overflow") -> Flag:
    return Flag(layer=layer, arm="fp16", kind=kind, severity=severity, evidence={"max_abs": 7e4},
                recommendation="keep this layer in fp32")


def test_an_error_flag_that_appears_is_a_regression_a_warning_is_a_note() -> None:
    arms = (arm("fp32", accuracy=0.9), arm("fp16", accuracy=0.9))
    base = result(*arms, flags=[_flag("warning", kind="gradient_underflow")])
    c = compare(base, result(*arms, flags=[_flag("warning", kind="gradient_underflow"), _flag("error")]))
    assert c.exit_code == 1
    assert c.regressions == ["fp16: new error flag forward_overflow on layer encoder.amp (keep this layer in fp32)."]
    assert c.arms[1].flags_appeared == [_flag("error")]

    c = compare(base, result(*arms, flags=[_flag("warning", kind="gradient_underflow"), _flag("warning")]))
    assert c.exit_code == 0
    assert any("warning forward_overflow on encoder.amp appeared" in n for n in c.notes)

    c = compare(result(*arms, flags=[_flag("error")]), result(*arms))
    assert c.exit_code == 0 and "is gone" in c.improvements[0]


# ------------------------------------------------------------------------------------------ speed, memory


def _with_speedup(res: AuditResult, ratio: float, low: float, high: float, **env: Any) -> AuditResult:
    speedup = Speedup(arm="bf16", baseline="fp32", ratio=ratio, ci_low=low, ci_high=high, rounds=10)
    return replace(res, env={**res.env, **env}, speedups={"bf16": speedup})


def test_a_speedup_that_shrank_beyond_tolerance_is_a_regression() -> None:
    pair = accuracy_pair(0.9, 0.9)
    c = compare(_with_speedup(pair, 1.8, 1.7, 1.9), _with_speedup(pair, 1.2, 1.1, 1.3))
    assert c.exit_code == 1
    assert c.regressions[0].startswith("bf16 speedup fell (1.8× (95% CI 1.7–1.9) → 1.2× (95% CI 1.1–1.3), -33%)")
    assert c.speed[0].source == "benchmark" and c.speed[0].change == pytest.approx(-1 / 3)

    overlapping = compare(_with_speedup(pair, 1.8, 1.2, 2.4), _with_speedup(pair, 1.5, 1.1, 2.0))
    assert overlapping.exit_code == 0, "a shrink inside timing noise is not a regression"
    other_machine = compare(_with_speedup(pair, 1.8, 1.7, 1.9), _with_speedup(pair, 1.2, 1.1, 1.3, device_name="H100"))
    assert other_machine.exit_code == 0
    assert any("different machines" in n for n in other_machine.notes)


def test_without_speed_or_memory_the_comparison_is_skipped_with_a_note() -> None:
    pair = accuracy_pair(0.9, 0.9)
    c = compare(pair, pair)
    assert c.speed == [] and c.memory == []
    assert any(n.startswith("Speed not compared: base and new have no benchmark speedups") for n in c.notes)
    assert any(n.startswith("Peak memory not compared: base and new record no peak memory") for n in c.notes)


def _memory_pair(fp32_bytes: int, bf16_bytes: int) -> AuditResult:
    def with_memory(name: str, peak: int) -> ArmResult:
        mem = MemoryResult(arm=name, peak_bytes=peak, breakdown={}, at_peak={}, method="storage_tracker",
                           batch_size=32)
        return replace(arm(name, accuracy=0.9), memory=mem)

    return result(with_memory("fp32", fp32_bytes), with_memory("bf16", bf16_bytes))


def test_a_mixed_precision_arm_that_saves_less_memory_is_a_regression() -> None:
    c = compare(_memory_pair(100_000, 60_000), _memory_pair(100_000, 90_000))
    assert c.exit_code == 1
    assert c.regressions[0].startswith("bf16 peak memory 58.6 KiB (60% of fp32) → 87.9 KiB (90% of fp32)")
    # both arms grew together (a bigger model): the saving is the same, nothing regressed
    assert compare(_memory_pair(100_000, 60_000), _memory_pair(200_000, 120_000)).exit_code == 0


# --------------------------------------------------------------------------------------- reading, exit 2


def test_nothing_in_common_is_exit_2() -> None:
    c = compare(result(arm("bf16", accuracy=0.9)), result(arm("fp16", accuracy=0.9)))
    assert not c.comparable and c.exit_code == 2
    assert "no arm in common" in c.notes[-1]
    assert "not comparable" in to_text(c) and "not comparable" in to_markdown(c)


def test_unreadable_files_and_unknown_schemas_are_result_errors(tmp_path: Path) -> None:
    cases = {"missing.json": None, "garbage.json": "{not json", "future.json": '{"schema_version": 99, "arms": {}}',
             "none.json": '{"task": "x", "arms": {}}', "noarms.json": '{"schema_version": 1, "task": "x"}'}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ResultError):
            load_result(path)


def test_a_minimal_schema_1_file_without_optional_keys_is_read_and_compared(tmp_path: Path) -> None:
    minimal = {"schema_version": 1, "task": "model",
               "arms": {"fp32": {"status": "ok", "metrics": {"accuracy": 0.9}},
                        "bf16": {"status": "ok", "metrics": {"accuracy": 0.88}}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(minimal))
    old = load_result(path)
    assert old.arms["bf16"].name == "bf16" and old.flags == [] and old.arms["bf16"].speed is None
    c = compare(old, accuracy_pair(0.9, 0.80), {"accuracy": 0.05})
    assert c.exit_code == 1 and c.regressions[0].startswith("bf16 accuracy: the gap to fp32 grew by 0.08")
    assert any("base records no task_sha256" in n for n in c.notes)


def test_task_hash_change_is_reported_never_refused() -> None:
    c = compare(accuracy_pair(0.9, 0.9, task_sha256="1" * 64), accuracy_pair(0.9, 0.9, task_sha256="2" * 64))
    assert c.comparable and c.exit_code == 0
    assert any("The task file changed (sha256 111111111111 → 222222222222)" in n for n in c.notes)


def test_to_dict_is_strict_json_with_the_verdict() -> None:
    broken = result(arm("fp32", accuracy=0.9), arm("bf16", status="diverged", accuracy=float("nan")))
    c = compare(accuracy_pair(0.9, 0.9), broken)
    data = json.loads(json.dumps(to_dict(c), allow_nan=False))
    assert data["exit_code"] == 1 and data["comparable"] is True
    assert data["regressions"] == c.regressions
    assert data["arms"][1]["new_status"] == "diverged"


def test_replicates_without_names_are_read() -> None:
    seeded = result(arm("fp32", accuracy=0.9), arm("bf16", accuracy=0.9),
                    replicates={"fp32": [arm("fp32", accuracy=0.91)], "bf16": [arm("bf16", accuracy=0.91)]})
    data = json.loads(seeded.to_json())
    for runs in data["replicates"].values():
        for run in runs:
            del run["name"]
    back = AuditResult.from_json(json.dumps(data))
    assert back.replicates["bf16"][0].name == "bf16"
    assert replace(back, created="") == replace(AuditResult.from_json(seeded.to_json()), created="")
