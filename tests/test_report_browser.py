"""The report in a real browser: charts render, no console errors, no network, hostile names stay text."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import mpaudit
from browser import load_page, overflow, screenshot
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


# Hugging Face-style module paths: containers nested five deep with long names, and the layer that overflows fp16
# (as in OVERFLOW_TASK) at the bottom, so the flags, layer-error and recommendation tables carry paths like
# bert_for_sequence_classification.encoder.layer.0.attention.self_attention.amplify_past_the_half_precision_maximum.
LONG_NAMES_TASK = OVERFLOW_TASK.replace(
    '''def build_model():
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 32), amp=Scale(1e6), fc2=nn.Linear(32, 32), down=Scale(1e-6),
        act=nn.ReLU(), head=nn.Linear(32, 3),
    ))''',
    '''def _nest(names, leaf):
    for name in reversed(names):
        leaf = nn.ModuleDict({name: leaf}) if not name.isdigit() else nn.ModuleList([leaf])
    return leaf

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_key_value_projection = nn.Linear(8, 32)
        self.amplify_past_the_half_precision_maximum = Scale(1e6)
        self.output_dense_projection = nn.Linear(32, 32)
        self.scale_back_down_to_unit_range = Scale(1e-6)

    def forward(self, x):
        return self.scale_back_down_to_unit_range(self.output_dense_projection(
            self.amplify_past_the_half_precision_maximum(self.query_key_value_projection(x))))

class LongNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.bert_for_sequence_classification = _nest(["encoder", "layer", "0", "attention", "self_attention"],
                                                      Block())
        self.classification_head_with_a_long_name = nn.Linear(32, 3)

    def forward(self, x):
        block = self.bert_for_sequence_classification["encoder"]["layer"][0]["attention"]["self_attention"]
        return self.classification_head_with_a_long_name(torch.relu(block(x)))

def build_model():
    return LongNames()''',
).replace('return {"accuracy": correct / total}',
          'return {"accuracy": correct / total, "macro_averaged_f1_score_on_the_validation_set": correct / total, '
          '"mean_absolute_error": 1 - correct / total}')

WIDTHS = (900, 1400)
SHOTS_ENV = "MPAUDIT_SCREENSHOTS"
"""Set to a folder to keep the screenshots the overflow test takes (for people judging the page's legibility)."""


@pytest.fixture(scope="module")
def long_names_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The widest report there is: long module paths in every table, three metrics, speed, memory and a memory
    budget in the Arms table, verified recommendations with their code snippet."""
    folder = tmp_path_factory.mktemp("long_names")
    path = folder / "model.py"
    path.write_text(LONG_NAMES_TASK)
    result = mpaudit.audit(path, steps=30, bench_seconds=0.3, memory_budget="64MiB", verify=True, verify_budget=2,
                           max_drop={"accuracy": 0.05})
    layer = ("bert_for_sequence_classification.encoder.layer.0.attention.self_attention."
             "amplify_past_the_half_precision_maximum")
    assert any(f.layer == layer and f.kind == "forward_overflow" for f in result.flags)
    return mpaudit.write_report(result, folder / "out")["html"]


@pytest.mark.parametrize("width", WIDTHS)
def test_report_fits_the_viewport(long_names_report: Path, width: int, tmp_path: Path) -> None:
    """Nothing sticks out past the right edge at 900 and 1400 px: long names wrap, wide tables scroll inside
    their own container, and the page itself never scrolls sideways."""
    shots = Path(os.environ.get(SHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    screenshot(long_names_report, shots / f"report-{width}.png", size=f"{width},6000")
    probe = overflow(long_names_report, width)
    assert probe["inner_width"] == width
    assert probe["offenders"] == [], "\n".join(probe["offenders"][:25])
    assert probe["scroll_width"] <= probe["width"], probe
