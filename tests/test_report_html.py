"""report.html: self-contained, escapes everything the user supplied, renders from JSON alone."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

import mpaudit
from conftest import TINY_TASK
from mpaudit.report import render_html
from mpaudit.results.model import AuditResult

HOSTILE = "</script><img src=x onerror=alert(1)>"


def test_user_supplied_text_is_escaped(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace('return {"accuracy": correct / total}',
                                        f'return {{"accuracy": correct / total, {HOSTILE!r}: 1.0}}'),
                      name="evil<b>.py")
    result = mpaudit.audit(path, bench=False, steps=3, arms=("fp32", "bf16"))
    html = render_html(result)
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown as text in the table
    assert "evil&lt;b&gt;" in html
    # the embedded chart JSON cannot close its script element
    chart_json = re.search(r'<script id="mpaudit-charts" type="application/json">(.*?)</script>', html, re.S)
    assert chart_json is not None and "</" not in chart_json.group(1)


def test_report_is_self_contained_by_default(tiny_task: Path) -> None:
    result = mpaudit.audit(tiny_task, bench=False, steps=3, arms=("fp32", "fp16"))
    html = render_html(result)
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=\"?https?:", html)
    assert html.count("Plotly.newPlot") == 1
    assert 'id="chart-loss"' in html and 'id="chart-scale"' in html
    cdn = render_html(result, plotlyjs="cdn")
    assert re.search(r'<script src="https://cdn.plot.ly/plotly-[\d.]+\.min\.js">', cdn)
    assert len(cdn) < len(html) / 10


def test_renders_from_json_alone(overflow_task: Path) -> None:
    result = mpaudit.audit(overflow_task, bench=False, steps=30, max_drop={"accuracy": 0.05})
    again = AuditResult.from_json(result.to_json())
    html = render_html(again)
    assert "Gate FAILED" in html
    assert "diverged" in html
    assert "forward_overflow" in html and '<td class="mono layer">amp</td>' in html  # the flags table names the layer


def test_clean_model_says_no_layer_flagged(tiny_task: Path) -> None:
    result = mpaudit.audit(tiny_task, bench=False, steps=5, arms=("fp32", "bf16"))
    assert not [f for f in result.flags if f.severity in ("error", "warning")]
    html = render_html(result)
    assert ("No layer flagged." in html) == (not result.flags)


def test_warning_banner_when_fingerprints_differ(tiny_task: Path) -> None:
    from dataclasses import replace

    result = mpaudit.audit(tiny_task, bench=False, steps=2, arms=("fp32", "bf16"))
    result = replace(result, warnings=["The arms did not start from the same initial weights."])
    assert 'role="alert"' in render_html(result)


def test_big_model_page_stays_small(write_task: Callable[..., Path]) -> None:
    from mpaudit.report.layers_view import MAX_HEATMAP_ROWS

    path = write_task(TINY_TASK.replace(
        "return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
        "return nn.Sequential(nn.Linear(8, 8), *[m for _ in range(160) for m in (nn.Linear(8, 8), nn.Tanh())], "
        "nn.Linear(8, 3))"), name="deep.py")
    result = mpaudit.audit(path, bench=False, steps=1, arms=("fp32",))
    assert result.arms["fp32"].trace is not None and len(result.arms["fp32"].trace.layers) == 322
    html = render_html(result)
    assert len(html.encode()) < 10 * 2**20
    assert f"Showing the {MAX_HEATMAP_ROWS} of 322 layers" in html
    assert len(result.layers()) >= 322 * 2  # layers.csv keeps every layer


# ------------------------------------------------------------------------------------------------ legibility


def test_coinciding_loss_curves_stay_visible_with_a_difference_panel(tiny_result: AuditResult) -> None:
    from mpaudit.report.charts import loss_curves

    fig = loss_curves(tiny_result).to_plotly_json()
    lines = {t["name"]: t["line"] for t in fig["data"] if t.get("mode") == "lines"}
    assert len({lines[a]["dash"] for a in ("fp32", "bf16", "fp16")}) == 3  # each arm its own dash
    assert lines["fp32"]["width"] > lines["bf16"]["width"]  # fp32 underneath, wider
    diffs = [t for t in fig["data"] if t["name"].endswith("− fp32")]
    assert [t["name"] for t in diffs] == ["bf16 − fp32", "fp16 − fp32"] and all(t["yaxis"] == "y2" for t in diffs)
    bf16, fp32 = tiny_result.arms["bf16"].loss, tiny_result.arms["fp32"].loss
    assert diffs[0]["y"][3] == pytest.approx(bf16[3] - fp32[3])


def test_heatmap_has_a_colour_scale_per_format_family(overflow_task: Path) -> None:
    from mpaudit.report.layers_view import MIN_SATURATION_PCT, heatmap

    result = mpaudit.audit(overflow_task, bench=False, steps=5, arms=("fp32", "fp16"))
    fig = heatmap(result)
    assert fig is not None
    data = fig.to_plotly_json()
    families = {t["coloraxis"]: t["x"] for t in data["data"]}
    assert set(families) == {"coloraxis", "coloraxis2"}
    assert all(x.startswith("fp16 ") for x in families["coloraxis"])
    assert all(x.startswith(("e4m3 ", "e5m2 ")) for x in families["coloraxis2"])
    fp16_axis, fp8_axis = data["layout"]["coloraxis"], data["layout"]["coloraxis2"]
    assert fp16_axis["colorscale"] != fp8_axis["colorscale"]
    assert MIN_SATURATION_PCT <= fp16_axis["cmax"] <= 10 and MIN_SATURATION_PCT <= fp8_axis["cmax"] <= 100


def test_short_labels_tell_layers_apart() -> None:
    from mpaudit.report.layers_view import short_labels

    layers = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query", "head"]
    labels = short_labels(layers)
    assert len(set(labels)) == 3 and labels[2] == "head"
    assert labels[0].startswith("…") and labels[0].endswith("self.query") and len(labels[0]) <= 36
    assert "0" in labels[0] and "1" in labels[1]


def test_long_names_get_break_opportunities_and_stay_escaped() -> None:
    from mpaudit.report.templates import breakable

    assert str(breakable("bert.encoder.layer.0.attention")) == "bert.<wbr>encoder.<wbr>layer.0.<wbr>attention"
    assert str(breakable("max_abs=1.43e+06", "._/")) == "max_<wbr>abs=1.43e+06"  # never inside a number
    assert str(breakable("<b>.x")) == "&lt;b&gt;.<wbr>x"


def test_histogram_bars_are_grouped_in_arm_colours(tiny_result: AuditResult) -> None:
    html = render_html(tiny_result, plotlyjs="cdn")
    assert 'barmode: "group"' in html and "LX.colors[arm]" in html
    assert '"colors":{"fp32":"#1f77b4","bf16":"#2ca02c","fp16":"#d62728"}' in html
