"""The per-layer part of the report: a what-if heatmap (layers × formats) and a histogram explorer.

Both read the traces in the result. The heatmap shows the reference arm (fp32 when traced): activations
as they are, gradients at the fp16 arm's loss scale (what fp16 training would see). With more than
:data:`MAX_HEATMAP_ROWS` layers, the heatmap and the explorer keep the layers with the largest fractions
(``layers.csv`` has them all), so a page for a 500-layer model stays small and responsive.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

from mpaudit.numerics.formats import FORMATS, HIST_MIN_EXP, what_if
from mpaudit.numerics.layerstats import ACTIVATION, GRAD_OUTPUT, GRAD_PREFIX, TraceSummary
from mpaudit.results.model import AuditResult
from mpaudit.vocab import BASELINE

MAX_HEATMAP_ROWS = 300
"""Layers shown in the heatmap and the histogram explorer; the rest are counted and left to layers.csv."""

HEATMAP_SATURATION_PCT = 10.0
"""Heatmap colours saturate at this percentage, so a 0.5% flush rate is still visible (hover shows exact %)."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("fp16", "flush"), ("fp16", "subnormal"), ("fp16", "overflow"),
    ("e4m3", "flush"), ("e4m3", "overflow"), ("e5m2", "flush"), ("e5m2", "overflow"),
)
"""(format, what) columns of the heatmap; bf16 is left out: it has fp32's range, so its columns are zero."""

EXPLORER_ROLES = (ACTIVATION, GRAD_OUTPUT, GRAD_PREFIX + "weight")
"""Tensors the histogram explorer can show per layer: output, output gradient, weight gradient."""


def plotly_text(text: str) -> str:
    """User text for a plotly label: plotly reads a few HTML tags in labels, so escape them to show as text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def reference_arm(result: AuditResult) -> str | None:
    """The arm whose trace the heatmap shows: fp32 when traced, else the first traced arm."""
    traced = [n for n, a in result.arms.items() if a.trace is not None and a.trace.stats]
    if not traced:
        return None
    return BASELINE if BASELINE in traced else traced[0]


def fp16_scale_log2(result: AuditResult) -> int:
    """log2 of the fp16 arm's median loss scale over its traced steps (0 when there is no fp16 trace)."""
    arm = result.arms.get("fp16")
    k = arm.trace.scale_log2 if arm is not None and arm.trace is not None else None
    return k or 0


def _rows(trace: TraceSummary, role: str, shift: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    for layer in trace.layers:
        stats = trace.get(layer, role)
        if stats is None or stats.count == 0:
            continue
        values = []
        for fmt, what in COLUMNS:
            w = what_if(stats.hist, FORMATS[fmt], shift)
            values.append(100.0 * getattr(w, what))
        rows[layer] = values
    return rows


def shown_layers(result: AuditResult) -> tuple[list[str], int]:
    """The layers the page shows (forward order, capped at MAX_HEATMAP_ROWS by largest fraction) and the total."""
    ref = reference_arm(result)
    if ref is None:
        return [], 0
    trace = result.arms[ref].trace
    assert trace is not None
    act = _rows(trace, ACTIVATION, 0)
    grad = _rows(trace, GRAD_OUTPUT, fp16_scale_log2(result) if ref != "fp16" else 0)
    layers = [lay for lay in trace.layers if lay in act or lay in grad]
    if len(layers) <= MAX_HEATMAP_ROWS:
        return layers, len(layers)
    worst = sorted(layers, key=lambda lay: -max(act.get(lay, [0]) + grad.get(lay, [0])))[:MAX_HEATMAP_ROWS]
    keep = set(worst)
    return [lay for lay in layers if lay in keep], len(layers)


def heatmap(result: AuditResult) -> go.Figure | None:
    """Layers (rows, forward order) × format what-ifs (columns), for activations and output gradients."""
    ref = reference_arm(result)
    layers, _ = shown_layers(result)
    if ref is None or not layers:
        return None
    trace = result.arms[ref].trace
    assert trace is not None
    shift = fp16_scale_log2(result) if ref != "fp16" else 0
    panels = [
        ("activations", _rows(trace, ACTIVATION, 0)),
        (f"output gradients (×2^{shift})", _rows(trace, GRAD_OUTPUT, shift)),
    ]
    cols = [f"{fmt}<br>{what}" for fmt, what in COLUMNS]
    fig = go.Figure()
    for i, (title, rows) in enumerate(panels):
        z = [rows.get(lay, [math.nan] * len(COLUMNS)) for lay in layers]
        fig.add_trace(go.Heatmap(
            z=[[min(v, HEATMAP_SATURATION_PCT) if not math.isnan(v) else None for v in r] for r in z],
            customdata=[[round(v, 4) if not math.isnan(v) else None for v in r] for r in z],
            x=cols, y=[plotly_text(lay) for lay in layers],
            xaxis=f"x{i + 1}", yaxis="y",
            zmin=0, zmax=HEATMAP_SATURATION_PCT, colorscale="Reds", showscale=i == 0,
            colorbar={"title": "% of values", "ticksuffix": "%"},
            hovertemplate="%{y}<br>%{x}: %{customdata}%<extra>" + title + "</extra>",
        ))
    height = min(4000, max(340, 180 + 16 * len(layers)))
    fig.update_layout(
        title=f"What-if per layer ({ref} arm): % of nonzero values that would flush / be subnormal / overflow",
        height=height, margin={"l": 160, "r": 20, "t": 130, "b": 20},
        xaxis={"domain": [0, 0.47], "title": "activations", "tickangle": 0, "side": "top"},
        xaxis2={"domain": [0.53, 1.0], "title": f"output gradients at the fp16 loss scale 2^{shift}", "tickangle": 0,
                "side": "top"},
        yaxis={"autorange": "reversed", "type": "category"},
    )
    return fig


def _sparse(hist: Any) -> list[int]:
    """A histogram as ``[first_bin, counts...]`` with the empty ends trimmed (compact in the page)."""
    counts = [int(c) for c in hist]
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return [0]
    return [nonzero[0], *counts[nonzero[0]: nonzero[-1] + 1]]


def explorer_data(result: AuditResult) -> dict[str, Any]:
    """Per shown layer, arm and role, the log2-magnitude histogram; plus the format ranges to draw as bands."""
    layers, total = shown_layers(result)
    arms: dict[str, dict[str, dict[str, list[int]]]] = {}
    scales: dict[str, int | None] = {}
    for name, arm in result.arms.items():
        if arm.trace is None:
            continue
        scales[name] = arm.trace.scale_log2
        per_layer: dict[str, dict[str, list[int]]] = {}
        for layer in layers:
            for role in EXPLORER_ROLES:
                stats = arm.trace.get(layer, role)
                if stats is not None and stats.count:
                    per_layer.setdefault(layer, {})[role] = _sparse(stats.hist)
        arms[name] = per_layer
    formats = [
        {"name": f.name, "max_log2": math.log2(f.max), "min_normal_exp": f.min_normal_exp,
         "min_subnormal_exp": f.min_subnormal_exp}
        for f in FORMATS.values()
    ]
    return {"layers": layers, "total_layers": total, "arms": arms, "scales": scales, "min_exp": HIST_MIN_EXP,
            "roles": list(EXPLORER_ROLES), "formats": formats}
