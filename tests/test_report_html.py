"""report.html: self-contained, escapes everything the user supplied, renders from JSON alone."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

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
    assert "forward_overflow" in html and '<td class="mono">amp</td>' in html  # the flags table names the layer


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
