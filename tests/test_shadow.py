"""Per-layer error attribution: the error a layer introduces versus the error accumulated up to it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import mpaudit
from mpaudit.arms import ARMS
from mpaudit.ci.recommend import rank_layers
from mpaudit.report.html import render_html
from mpaudit.results.model import AuditResult, LayerError
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import load_task
from mpaudit.trace.shadow import layer_errors
from mpaudit.trace.tracer import select_modules

CPU = torch.device("cpu")


def _errors(task_path: Path, arm: str) -> dict[str, LayerError]:
    task = load_task(task_path)
    torch.manual_seed(0)
    model = task.build_model()
    paths = select_modules(model)
    errors = layer_errors(RunContext(task, CPU), model, [ARMS["fp32"], ARMS[arm]], paths)
    assert list(errors) == [arm]  # fp32 is the reference, not compared with itself
    return {e.layer: e for e in errors[arm]}


def test_the_overflowing_layer_is_where_the_error_starts_and_later_layers_only_inherit_it(overflow_task: Path) -> None:
    errors = _errors(overflow_task, "fp16")
    assert list(errors) == ["fc1", "amp", "fc2", "down", "act", "head"]
    fc1, amp, head = errors["fc1"], errors["amp"], errors["head"]
    assert 55 < fc1.sqnr_db < 90 and fc1.drift_sqnr_db == fc1.sqnr_db  # fp16 rounding only, nothing before it
    assert amp.sqnr_db == -math.inf and math.isinf(amp.rel_error)  # 1e6-scale outputs do not fit fp16
    assert head.sqnr_db > 55  # the head itself is fine in fp16 ...
    assert head.drift_sqnr_db == -math.inf  # ... it only receives what broke upstream


def test_bf16_rounding_is_coarser_than_fp16_but_keeps_the_range(tiny_task: Path) -> None:
    fp16, bf16 = _errors(tiny_task, "fp16"), _errors(tiny_task, "bf16")
    for layer in ("0", "2"):  # the two Linear layers
        assert math.isfinite(bf16[layer].sqnr_db) and math.isfinite(fp16[layer].sqnr_db)
        assert bf16[layer].sqnr_db < fp16[layer].sqnr_db - 10  # 8 vs 11 mantissa bits: ~18 dB apart
    assert bf16["2"].drift_sqnr_db <= bf16["2"].sqnr_db + 3  # error accumulates, it does not vanish


def test_a_half_weight_arm_runs_a_bf16_copy_and_leaves_the_fp32_model_alone(tiny_task: Path) -> None:
    pure, bf16 = _errors(tiny_task, "bf16-pure"), _errors(tiny_task, "bf16")
    for layer in ("0", "2"):  # a Linear in bf16 weights and inputs computes what bf16 autocast computes
        assert 30 < pure[layer].sqnr_db < 70 and math.isfinite(pure[layer].drift_sqnr_db)
        assert pure[layer].sqnr_db == bf16[layer].sqnr_db
    task = load_task(tiny_task)
    model = task.build_model()
    layer_errors(RunContext(task, CPU), model, [ARMS["fp32"], ARMS["bf16-pure"]], select_modules(model))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the trained fp32 weights are not cast


def test_layers_the_attribution_blames_rank_first_for_the_keep_list(overflow_task: Path) -> None:
    errors = _errors(overflow_task, "fp16")
    ranked = rank_layers("fp16", [], None, None, {e.layer: e.sqnr_db for e in errors.values()})
    assert set(ranked[:3]) == {"amp", "fc2", "down"}
    assert ranked[3:] == sorted(ranked[3:], key=lambda layer: errors[layer].sqnr_db)


def test_audit_with_verify_records_and_shows_the_attribution(tiny_task: Path) -> None:
    result = mpaudit.audit(tiny_task, arms=("fp32", "bf16"), steps=5, bench=False, verify=True)
    assert [e.layer for e in result.layer_errors["bf16"]] == ["0", "1", "2"]
    back = AuditResult.from_json(result.to_json())
    assert back.layer_errors == result.layer_errors
    html = render_html(result, plotlyjs="cdn")
    assert 'id="layer-errors"' in html and "own SQNR" in html
    plain = mpaudit.audit(tiny_task, arms=("fp32", "bf16"), steps=3, bench=False)
    assert plain.layer_errors == {} and 'id="layer-errors"' not in render_html(plain, plotlyjs="cdn")
