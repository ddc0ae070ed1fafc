"""Metric direction: known by name (whole words), declared by the task or the command line, recorded in the result;
every judge (gate, verdict, --verify's ungated rule, compare, views) reads it the same way; unknown is never guessed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_TASK
from factories import make_arm, make_result
from mpaudit.ci.compare import compare, to_dict
from mpaudit.ci.gaps import (
    FINAL_LOSS,
    direction_by_name,
    judged_metric,
    lower_is_better,
    metric_direction,
    parse_metric_directions,
    ungated_drop,
    worse_by,
)
from mpaudit.ci.gate import check_gated_metrics, evaluate_gate
from mpaudit.ci.verdict import verdict
from mpaudit.cli import EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE, app
from mpaudit.errors import UsageError
from mpaudit.report.compare_view import to_text
from mpaudit.report.html import render_html
from mpaudit.report.markdown import summary_markdown
from mpaudit.results.model import ArmResult, AuditResult, Fingerprints
from mpaudit.vocab import NOT_SAFE, SAFE

runner = CliRunner()
arm = make_arm

LOWER = ["loss", "eval_loss", "val_loss", "test_loss", "valLoss", "final_loss", "perplexity", "val_ppl", "error",
         "top1_err", "mae", "mse", "rmse", "mape", "smape", "wer", "test_wer", "cer", "ter", "nll", "bpc", "bpd",
         "fid", "kid", "latency", "dice_loss", "accuracy_error", "eval/mae", "RMSE"]
HIGHER = ["accuracy", "val_accuracy", "eval_acc", "test_f1", "f1", "F1-macro", "top5_accuracy", "top-5 accuracy",
          "top1", "precision", "recall", "auc", "AUROC", "ap", "ap50", "map", "mAP@0.5", "mIoU", "r2", "bleu",
          "bleu_4", "rouge_l", "rougeLsum", "iou", "dice", "psnr", "ssim", "exact_match", "lower_precision_score",
          "neg_mean_squared_error", "neg_log_loss"]
UNKNOWN_NAMES = ["score", "lower", "heatmap", "quality", "metric", "error_reduction", "accuracy_drop", "powerlaw"]


@pytest.mark.parametrize("name", LOWER)
def test_lower_is_better_names(name: str) -> None:
    assert direction_by_name(name) == "min"


@pytest.mark.parametrize("name", HIGHER)
def test_higher_is_better_names(name: str) -> None:
    assert direction_by_name(name) == "max"


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_names_that_say_nothing_or_disagree_are_unknown(name: str) -> None:
    # whole words only: "lower" holds "wer", "heatmap" holds "map", "powerlaw" holds "wer" — none of them count
    assert direction_by_name(name) == "unknown"
    assert lower_is_better(name) is None


def test_declared_beats_recorded_beats_the_name() -> None:
    assert metric_direction("accuracy", {"accuracy": "min"}, {"accuracy": "max"}) == "min"
    assert metric_direction("accuracy", None, {"accuracy": "min"}) == "min"
    assert metric_direction("score", {}, {"score": "max"}) == "max"
    assert metric_direction("mae", {}, {"mae": "unknown"}) == "min"  # a recorded unknown lets the name speak
    assert metric_direction(FINAL_LOSS, {FINAL_LOSS: "max"}) == "min"  # the training loss is always a loss


def test_worse_by_refuses_to_guess() -> None:
    assert worse_by("mae", 0.5, 0.4) == pytest.approx(0.1)
    assert worse_by("score", 0.5, 0.4, {"score": "max"}) == pytest.approx(-0.1)
    with pytest.raises(UsageError, match="--metric-direction score=min"):
        worse_by("score", 0.5, 0.4)


def test_parse_metric_directions() -> None:
    assert parse_metric_directions(["mae=min", " bleu = MAX "]) == {"mae": "min", "bleu": "max"}
    for bad in ["mae", "mae=lower", "=min", "mae=up"]:
        with pytest.raises(UsageError, match="METRIC=min or METRIC=max"):
            parse_metric_directions([bad])


# ----------------------------------------------------------------------------------------------- the gate


@pytest.mark.parametrize("metric", ["mae", "rmse", "wer"])
def test_gate_on_a_lower_is_better_metric(metric: str) -> None:
    """The issue's case: an arm whose error rose fails, an arm whose error fell passes."""
    arms = {"fp32": arm("fp32", **{metric: 0.3711}), "bf16": arm("bf16", **{metric: 0.3652}),
            "fp16": arm("fp16", **{metric: 0.74})}
    gate = evaluate_gate(arms, {metric: 0.01}, None)
    by_arm = {c.arm: c for c in gate.checks}
    assert by_arm["bf16"].passed and "better by 0.005" in by_arm["bf16"].message
    assert "lower is better" in by_arm["bf16"].message
    assert not by_arm["fp16"].passed and "rose by 0.3689" in by_arm["fp16"].message


def test_gate_on_an_unknown_direction_is_a_usage_error_until_declared() -> None:
    arms = {"fp32": arm("fp32", score=0.5), "bf16": arm("bf16", score=0.6)}
    with pytest.raises(UsageError, match=r"--metric-direction score=min \(or =max\).*METRICS"):
        evaluate_gate(arms, {"score": 0.01}, None)
    with pytest.raises(UsageError, match="cannot tell"):
        check_gated_metrics(["score"], ["score"])
    assert not evaluate_gate(arms, {"score": 0.01}, None, directions={"score": "min"}).passed
    assert evaluate_gate(arms, {"score": 0.01}, None, directions={"score": "max"}).passed


def test_a_gated_metric_the_task_does_not_return_lists_the_real_ones() -> None:
    with pytest.raises(UsageError, match="'acuracy', which evaluate\\(\\) does not return; the metrics are: "
                                         "accuracy, f1"):
        check_gated_metrics(["acuracy"], ["accuracy", "f1"])
    with pytest.raises(UsageError, match="no evaluate"):
        check_gated_metrics(["accuracy"], [])


def _printed(a: ArmResult, weights: str) -> ArmResult:
    return replace(a, fingerprints=Fingerprints(weights=weights, batches="b"))


def test_mismatched_fingerprints_fail_every_check() -> None:
    arms = {"fp32": _printed(arm("fp32", accuracy=0.9), "w1"), "bf16": _printed(arm("bf16", accuracy=0.95), "w2")}
    gate = evaluate_gate(arms, {"accuracy": 0.5}, 1.0)
    assert len(gate.checks) == 2 and not any(c.passed for c in gate.checks)
    assert all("did not start from identical weights" in c.message for c in gate.checks)
    # the seed replicates are paired by seed: a mismatch within a replicate voids the comparison too
    same = {"fp32": _printed(arm("fp32", accuracy=0.9), "w"), "bf16": _printed(arm("bf16", accuracy=0.9), "w")}
    reps = {"fp32": [_printed(arm("fp32", accuracy=0.9), "r1")], "bf16": [_printed(arm("bf16", accuracy=0.9), "r2")]}
    assert evaluate_gate(same, {"accuracy": 0.5}, None).passed
    assert not evaluate_gate(same, {"accuracy": 0.5}, None, reps).passed
    assert not make_result(*same.values(), replicates=reps).fingerprints_match


# --------------------------------------------------------------------- without a gate: verdict and --verify


def test_unknown_primary_metric_is_judged_by_nothing_the_final_loss_decides() -> None:
    base, fp16 = arm("fp32", loss=1.0, score=0.9), arm("fp16", loss=1.0, score=0.1)
    result = make_result(base, fp16)
    assert judged_metric(base) == FINAL_LOSS and ungated_drop(fp16, base) is None
    v = verdict(result, "fp16")
    assert v.level == SAFE and "final_loss" in v.reasons[0]
    # declared (recorded in the result), the score decides
    declared = make_result(base, fp16, metric_directions={"score": "max"})
    assert verdict(declared, "fp16").level == NOT_SAFE
    assert judged_metric(base, {"score": "max"}) == "score"


def test_views_mark_an_unknown_direction() -> None:
    result = make_result(arm("fp32", score=0.9), arm("bf16", score=0.1), metric_directions={"score": "unknown"})
    assert "direction unknown" in summary_markdown(result)
    html = render_html(result, plotlyjs="cdn")
    assert "direction unknown" in html
    assert 'class="num worse"' not in html  # a delta in an unknown direction is neither worse nor better
    mae = make_result(arm("fp32", mae=0.37), arm("bf16", mae=0.74))
    assert "lower is better" in summary_markdown(mae) and "worse" in summary_markdown(mae)


# ---------------------------------------------------------------------------------------------- compare


def _pair(metric: str, gaps: tuple[float, float], recorded: tuple[str | None, str | None] = (None, None),
          ) -> tuple[AuditResult, AuditResult]:
    out = []
    for gap, direction in zip(gaps, recorded, strict=True):
        out.append(make_result(arm("fp32", **{metric: 0.5}), arm("bf16", **{metric: 0.5 + gap}),
                               metric_directions={metric: direction} if direction else None))
    return out[0], out[1]


def test_compare_judges_mae_the_right_way_round() -> None:
    base, new = _pair("mae", (0.0, 0.2))
    c = compare(base, new, {"mae": 0.05})
    assert c.exit_code == 1 and "mae" in c.regressions[0]
    row = next(a for a in to_dict(c)["arms"] if a["arm"] == "bf16")["metrics"][0]
    assert row["direction"] == "min" and row["lower_is_better"] is True and row["growth"] == pytest.approx(0.2)
    better_base, better_new = _pair("mae", (0.2, 0.0))
    assert compare(better_base, better_new, {"mae": 0.05}).exit_code == 0


def test_compare_does_not_gate_an_unknown_direction() -> None:
    base, new = _pair("score", (0.0, -0.4))
    with pytest.raises(UsageError, match="--tolerance score"):
        compare(base, new, {"score": 0.05})
    c = compare(base, new)
    assert c.exit_code == 0 and any("direction of score is unknown" in n for n in c.notes)
    assert "direction unknown" in to_text(c)
    declared = compare(base, new, {"score": 0.05}, directions={"score": "max"})
    assert declared.exit_code == 1
    recorded = compare(*_pair("score", (0.0, -0.4), ("max", "max")), {"score": 0.05})
    assert recorded.exit_code == 1


def test_compare_with_directions_recorded_differently_shows_without_judging() -> None:
    base, new = _pair("score", (0.0, -0.4), ("max", "min"))
    c = compare(base, new)
    assert c.exit_code == 0 and any("Base records score as max and new as min" in n for n in c.notes)
    with pytest.raises(UsageError):
        compare(base, new, {"score": 0.05})
    assert compare(base, new, {"score": 0.05}, directions={"score": "max"}).exit_code == 1


# ----------------------------------------------------------------------------------------- command line


def _saved(tmp_path: Path, result: AuditResult) -> str:
    path = tmp_path / "report.json"
    path.write_text(result.to_json())
    return str(path)


def test_cli_gate_on_mae(tmp_path: Path) -> None:
    saved = _saved(tmp_path, make_result(arm("fp32", mae=0.3711), arm("bf16", mae=0.3652)))
    ok = runner.invoke(app, ["gate", saved, "--max-drop", "mae=0.001"])
    assert ok.exit_code == EXIT_OK, ok.output
    assert "PASS bf16 mae = 0.3652 vs fp32 0.3711 (lower is better): better by" in ok.output
    worse = _saved(tmp_path, make_result(arm("fp32", mae=0.37), arm("fp16", mae=0.74)))
    failed = runner.invoke(app, ["gate", worse, "--max-drop", "mae=0.01"])
    assert failed.exit_code == EXIT_GATE_FAILED and "GATE FAILED: fp16 mae" in failed.output


def test_cli_gate_with_a_misspelled_metric_exits_2_and_lists_the_real_ones(tmp_path: Path) -> None:
    saved = _saved(tmp_path, make_result(arm("fp32", accuracy=0.9), arm("bf16", accuracy=0.9)))
    result = runner.invoke(app, ["gate", saved, "--max-drop", "acuracy=0.01"])
    assert result.exit_code == EXIT_USAGE
    assert "'acuracy', which evaluate() does not return; the metrics are: accuracy" in result.output
    typo = runner.invoke(app, ["gate", saved, "--max-drop", "accuracy=0.01", "--metric-direction", "acc=max"])
    assert typo.exit_code == EXIT_USAGE and "--metric-direction names metric 'acc'" in typo.output


def test_cli_gate_on_an_unknown_direction_exits_2_until_declared(tmp_path: Path) -> None:
    saved = _saved(tmp_path, make_result(arm("fp32", score=0.9), arm("bf16", score=0.5)))
    result = runner.invoke(app, ["gate", saved, "--max-drop", "score=0.01"])
    assert result.exit_code == EXIT_USAGE and "--metric-direction score=min" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1  # one sentence
    declared = runner.invoke(app, ["gate", saved, "--max-drop", "score=0.01", "--metric-direction", "score=max"])
    assert declared.exit_code == EXIT_GATE_FAILED, declared.output
    recorded = _saved(tmp_path, make_result(arm("fp32", score=0.9), arm("bf16", score=0.5),
                                            metric_directions={"score": "min"}))
    assert runner.invoke(app, ["gate", recorded, "--max-drop", "score=0.01"]).exit_code == EXIT_OK


def test_cli_gate_on_mismatched_fingerprints_exits_2(tmp_path: Path) -> None:
    result = make_result(_printed(arm("fp32", accuracy=0.9), "w1"), _printed(arm("bf16", accuracy=0.9), "w2"))
    out = runner.invoke(app, ["gate", _saved(tmp_path, result), "--max-drop", "accuracy=0.5"])
    assert out.exit_code == EXIT_USAGE
    assert "error: every gate check failed: the arms did not start from identical weights" in out.output


def test_cli_compare_takes_metric_direction(tmp_path: Path) -> None:
    base, new = _pair("score", (0.0, -0.4))
    (tmp_path / "b.json").write_text(base.to_json())
    (tmp_path / "n.json").write_text(new.to_json())
    args = ["compare", str(tmp_path / "b.json"), str(tmp_path / "n.json"), "--tolerance", "score=0.05"]
    assert runner.invoke(app, args).exit_code == EXIT_USAGE
    assert runner.invoke(app, [*args, "--metric-direction", "score=max"]).exit_code == 1


# ------------------------------------------------------------------------------ the task declares, run records


SCORE_TASK = TINY_TASK.replace('return {"accuracy": correct / total}',
                               'return {"score": correct / total, "mae": 1 - correct / total}')


def test_run_records_every_metrics_direction_declared_or_by_name(write_task: Callable[..., Path],
                                                                 tmp_path: Path) -> None:
    path = write_task(SCORE_TASK + '\nMETRICS = {"score": "max"}\n')
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--arms", "fp32,bf16", "--out",
                                 str(out), "--max-drop", "score=0.5", "--max-drop", "mae=0.5", "-q"])
    assert result.exit_code == EXIT_OK, result.output
    saved = AuditResult.from_json((out / "report.json").read_text())
    assert saved.metric_directions == {"score": "max", "mae": "min"}
    assert saved.config["metric_directions"] == {}
    # the command line overrides the task's declaration
    flipped = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--arms", "fp32,bf16", "--out",
                                  str(out), "--metric-direction", "score=min", "-q"])
    assert flipped.exit_code == EXIT_OK, flipped.output
    assert AuditResult.from_json((out / "report.json").read_text()).metric_directions["score"] == "min"


def test_run_refuses_an_undeclared_unknown_gate_before_training(write_task: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    path = write_task(SCORE_TASK)
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--out", str(out),
                                 "--max-drop", "score=0.01", "-q"])
    assert result.exit_code == EXIT_USAGE and "--metric-direction score=min" in result.output
    assert not (out / "report.json").exists()
    typo = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--out", str(out),
                               "--max-drop", "mea=0.01", "-q"])
    assert typo.exit_code == EXIT_USAGE and "the metrics are: score, mae" in typo.output
    # without a gate it runs; the verdict judges the final loss, the report marks the score's direction unknown
    ungated = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--out", str(out), "-q"])
    assert ungated.exit_code == EXIT_OK, ungated.output
    saved = AuditResult.from_json((out / "report.json").read_text())
    assert saved.metric_directions == {"score": "unknown", "mae": "min"}
    assert "direction unknown" in (out / "report.html").read_text()


def test_run_with_mismatched_fingerprints_writes_the_report_and_exits_2_even_quiet(
        write_task: Callable[..., Path], tmp_path: Path) -> None:
    # build_model returns the same module every time: bf16 starts from the weights fp32 trained
    path = write_task(TINY_TASK.replace(
        "def build_model():\n    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
        "_MODEL = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))\n"
        "def build_model():\n    return _MODEL"))
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--arms", "fp32,bf16", "--out",
                                 str(out), "--max-drop", "accuracy=1", "-q"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "error: every gate check failed: the arms did not start from identical weights" in result.output
    saved = AuditResult.from_json((out / "report.json").read_text())  # never lose the results
    assert not saved.fingerprints_match and not saved.gate.passed
    # no gate: exit 0, but the warning shows even under --quiet
    ungated = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "3", "--arms", "fp32,bf16", "--out",
                                  str(out), "-q"])
    assert ungated.exit_code == EXIT_OK and "WARNING" in ungated.output and "same initial weights" in ungated.output
