"""The report in a real browser: charts render, no console errors, no network, hostile names stay text."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

import mpaudit
from browser import load_page
from conftest import OVERFLOW_TASK, TINY_TASK

pytestmark = pytest.mark.browser

HOSTILE = "<img src=x onerror=alert(1)>"


def test_report_renders_offline_without_console_errors(write_task: Callable[..., Path], tmp_path: Path) -> None:
    path = write_task(TINY_TASK.replace('return {"accuracy": correct / total}',
                                        f'return {{"accuracy": correct / total, {HOSTILE!r}: 0.5}}'))
    result = mpaudit.audit(path, steps=5, arms=("fp32", "bf16", "fp16"), bench_seconds=0.5)
    paths = mpaudit.write_report(result, tmp_path / "out")
    dom, console = load_page(paths["html"])
    assert console == []  # no errors, no failed fetches (every host resolves to NOTFOUND)
    # loss, loss scale, heatmap, layer histogram, speed and memory: six plotly charts drawn
    assert len(re.findall(r'<div id="chart-(loss|scale|heatmap|hist|speed|memory)"[^>]*class="chart[^"]*js-plotly-plot',
                          dom)) == 6
    assert "<img src=x" not in dom  # the hostile metric name is text, not markup
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom


def test_flagged_hostile_layer_is_listed_as_text(write_task: Callable[..., Path], tmp_path: Path) -> None:
    # the overflowing layer gets a hostile module name: it must show up in the flags table as text
    source = OVERFLOW_TASK.replace("fc1=nn.Linear(8, 32), amp=Scale(1e6),",
                                   "fc1=nn.Linear(8, 32), **{" + repr(HOSTILE) + ": Scale(1e6)},")
    path = write_task(source, name="hostile.py")
    result = mpaudit.audit(path, bench=False, steps=30, arms=("fp32", "fp16"))
    assert any(f.layer == HOSTILE and f.kind == "forward_overflow" and f.severity == "error" for f in result.flags)
    paths = mpaudit.write_report(result, tmp_path / "out")
    dom, console = load_page(paths["html"])
    assert console == []
    assert "<img src=x" not in dom
    flags = dom[dom.index('id="flags"'):dom.index('id="curves"')]
    assert "forward_overflow" in flags and "&lt;img src=x onerror=alert(1)&gt;" in flags
    assert dom.count("<option value=") >= 6 + 3  # the layer picker lists every layer (and the 3 tensor roles)
