"""The report in a real browser: charts render, no console errors, no network, hostile names stay text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import mpaudit
from browser import load_page
from conftest import TINY_TASK

pytestmark = pytest.mark.browser

HOSTILE = "<img src=x onerror=alert(1)>"


def test_report_renders_offline_without_console_errors(write_task: Callable[..., Path], tmp_path: Path) -> None:
    path = write_task(TINY_TASK.replace('return {"accuracy": correct / total}',
                                        f'return {{"accuracy": correct / total, {HOSTILE!r}: 0.5}}'))
    result = mpaudit.audit(path, bench=False, steps=5, arms=("fp32", "bf16", "fp16"))
    paths = mpaudit.write_report(result, tmp_path / "out")
    dom, console = load_page(paths["html"])
    assert console == []  # no errors, no failed fetches (every host resolves to NOTFOUND)
    assert dom.count('class="main-svg"') >= 2 * 2  # loss chart and loss-scale chart both drawn by plotly
    assert "<img src=x" not in dom  # the hostile metric name is text, not markup
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
