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
"""fp16's heatmap colours saturate at most at this percentage, so a 0.5% flush rate is still visible (hover shows
the exact %)."""

MIN_SATURATION_PCT = 1.0
"""A family's colour scale saturates at least at this percentage, so a layer whose worst cell is 0.01% does not
look as alarming as one at 10%."""

FAMILIES: tuple[tuple[str, float, str], ...] = (("fp16", HEATMAP_SATURATION_PCT, "Reds"), ("fp8", 100.0, "Blues"))
"""Format families of the heatmap, each with its own colour scale: (name, highest saturation %, plotly colorscale).
bf16 shares fp32's range, so it has no column."""

MAX_LABEL_CHARS = 36
"""Heatmap row labels are cut to this many characters (the hover text has the full module path)."""

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


def short_labels(layers: list[str], max_chars: int = MAX_LABEL_CHARS) -> list[str]:
    """Axis labels for module paths: the fewest trailing components that tell the layers apart
    (``…attention.self.query``), cut to ``max_chars`` from the left; the full path stays in the hover text."""
    parts = [layer.split(".") for layer in layers]
    labels = []
    for path in parts:
        k = 1
        while k < len(path) and sum(1 for other in parts if other[-k:] == path[-k:]) > 1:
            k += 1
        label = ".".join(path[-k:])
        if k < len(path) or len(label) > max_chars:
            label = "…" + label[-(max_chars - 1):]
        labels.append(label)
    return labels


def heatmap(result: AuditResult) -> go.Figure | None:
    """Layers (rows, forward order) × format what-ifs (columns), for activations and output gradients.

    Each format family has its own colour scale (fp16 in reds, fp8 in blues), saturating at the family's worst
    cell (at least :data:`MIN_SATURATION_PCT`, at most its ``FAMILIES`` cap): fp8 without scaling flushes a large
    share of most tensors, and on a shared scale that drowns fp16's smaller but decisive fractions."""
    ref = reference_arm(result)
    layers, _ = shown_layers(result)
    if ref is None or not layers:
        return None
    trace = result.arms[ref].trace
    assert trace is not None
    shift = fp16_scale_log2(result) if ref != "fp16" else 0
    panels = [
        ("activations", _rows(trace, ACTIVATION, 0)),
        (f"output gradients at the fp16 loss scale 2^{shift}", _rows(trace, GRAD_OUTPUT, shift)),
    ]
    y = [plotly_text(lay) for lay in layers]
    fig = go.Figure()
    layout: dict[str, Any] = {}
    axis = 0
    gap = 0.02
    total = 2 * len(COLUMNS) + 1  # one column's width between the panels
    start = 0.0
    annotations: list[dict[str, Any]] = []
    for title, rows in panels:
        panel_start = start
        for f, (family, cap, colorscale) in enumerate(FAMILIES):
            idx = [i for i, (fmt, _) in enumerate(COLUMNS) if _family(fmt) == family]
            axis += 1
            values = [[rows.get(lay, [math.nan] * len(COLUMNS))[i] for i in idx] for lay in layers]
            zmax = _saturation(family, panels, cap)
            width = len(idx) / total
            domain = [start + (gap if f else 0), start + width]
            start += width
            name = "x" if axis == 1 else f"x{axis}"
            fig.add_trace(go.Heatmap(
                z=[[min(v, zmax) if not math.isnan(v) else None for v in r] for r in values],
                customdata=[[round(v, 4) if not math.isnan(v) else None for v in r] for r in values],
                x=[_column_label(COLUMNS[i]) for i in idx], y=y, xaxis=name, yaxis="y",
                coloraxis="coloraxis" if f == 0 else "coloraxis2",
                hovertemplate="%{y}<br>" + title + ", %{x}: %{customdata}%<extra></extra>",
            ))
            layout["xaxis" if axis == 1 else f"xaxis{axis}"] = {
                "domain": domain, "side": "top", "tickangle": -50, "tickfont": {"size": 10}, "fixedrange": True,
            }
            layout[f"coloraxis{'' if f == 0 else '2'}"] = {
                "cmin": 0, "cmax": zmax, "colorscale": colorscale,
                "colorbar": {"title": {"text": f"{family} %", "side": "top"}, "ticksuffix": "%", "x": 1.02 + 0.12 * f,
                             "thickness": 12, "len": min(1.0, 300 / _height(layers))},
            }
        annotations.append({"text": f"<b>{title}</b>", "xref": "paper", "yref": "paper", "x": (panel_start + start) / 2,
                            "y": 1.0, "yshift": 92, "showarrow": False, "xanchor": "center", "font": {"size": 12}})
        start += 1 / total
    height = _height(layers)
    fig.update_layout(
        title={"text": f"What-if per layer ({ref} arm)<br><sub>% of nonzero values that would flush / be subnormal / "
                       "overflow in each format</sub>", "y": 0.995, "yanchor": "top", "yref": "container"},
        height=height, margin={"l": 20, "r": 130, "t": 190, "b": 20}, annotations=annotations,
        yaxis={"autorange": "reversed", "type": "category", "automargin": True, "tickmode": "array",
               "tickvals": y, "ticktext": [plotly_text(lab) for lab in short_labels(layers)], "tickfont": {"size": 11}},
        **layout,
    )
    return fig


def _family(fmt: str) -> str:
    return "fp16" if fmt == "fp16" else "fp8"


def _column_label(column: tuple[str, str]) -> str:
    fmt, what = column
    return f"{fmt} {what}"


def _saturation(family: str, panels: list[tuple[str, dict[str, list[float]]]], cap: float) -> float:
    """Where a family's colour scale saturates: its largest cell in either panel, within [MIN_SATURATION_PCT, cap]."""
    idx = [i for i, (fmt, _) in enumerate(COLUMNS) if _family(fmt) == family]
    cells = [row[i] for _, rows in panels for row in rows.values() for i in idx if not math.isnan(row[i])]
    return max(MIN_SATURATION_PCT, min(cap, max(cells, default=0.0)))


def _height(layers: list[str]) -> int:
    return min(4000, max(380, 220 + 16 * len(layers)))


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
