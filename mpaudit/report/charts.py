"""Plotly figures built from the result (never from live torch objects)."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mpaudit.report import layers_view
from mpaudit.results.model import AuditResult
from mpaudit.vocab import BASELINE

ARM_COLORS = {"fp32": "#1f77b4", "bf16": "#2ca02c", "fp16": "#d62728", "bf16-pure": "#9467bd", "fp8": "#ff7f0e",
              "fp8-rowwise": "#8c564b", "mxfp8": "#e377c2"}
ARM_DASHES = {"fp32": "solid", "bf16": "dash", "fp16": "dot", "bf16-pure": "dashdot", "fp8": "longdash",
              "fp8-rowwise": "longdashdot", "mxfp8": "longdash"}
"""Each arm's line style, so curves that coincide stay visible: fp32 wide and solid underneath, the others dashed
or dotted on top of it."""
ARM_WIDTHS = {"fp32": 4.0, "bf16": 2.5, "fp16": 2.5, "bf16-pure": 2.5, "fp8": 2.5, "fp8-rowwise": 2.5, "mxfp8": 2.5}


def arm_line(name: str) -> dict[str, Any]:
    """The plotly line of an arm's curve: its colour, dash and width (``fp16+keep`` is drawn like ``fp16``)."""
    family = name.split("+")[0]
    return {"color": ARM_COLORS.get(family), "dash": ARM_DASHES.get(family, "dashdot"),
            "width": ARM_WIDTHS.get(family, 2.0)}


def _finite_or_none(xs: list[float]) -> list[float | None]:
    return [x if math.isfinite(x) else None for x in xs]


def loss_curves(result: AuditResult) -> go.Figure:
    """Training loss per step, every arm on one axis (fp32 wide and solid, the others dashed on top, so identical
    curves stay visible), and below it each arm's difference to fp32 step by step; non-finite losses leave gaps
    and are marked."""
    base = result.arms.get(BASELINE)
    others = [(n, a) for n, a in result.arms.items() if n != BASELINE and a.loss]
    diff = base is not None and bool(base.loss) and bool(others)
    fig = make_subplots(rows=2 if diff else 1, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.68, 0.32] if diff else None)
    for name, arm in result.arms.items():
        if not arm.loss:
            continue
        steps = list(range(1, len(arm.loss) + 1))
        fig.add_trace(go.Scatter(x=steps, y=_finite_or_none(arm.loss), mode="lines", name=name, legendgroup=name,
                                 line=arm_line(name)), row=1, col=1)
        bad = [s for s, v in zip(steps, arm.loss, strict=True) if not math.isfinite(v)]
        if bad:
            fig.add_trace(
                go.Scatter(x=bad, y=[0.02] * len(bad), mode="markers", name=f"{name}: non-finite loss",
                           legendgroup=name, marker={"symbol": "x", "color": ARM_COLORS.get(name), "size": 8},
                           xaxis="x", yaxis="y3")
            )
    if diff and base is not None:
        for name, arm in others:
            n = min(len(arm.loss), len(base.loss))
            delta = [a - b if math.isfinite(a) and math.isfinite(b) else None
                     for a, b in zip(arm.loss[:n], base.loss[:n], strict=True)]
            fig.add_trace(go.Scatter(x=list(range(1, n + 1)), y=delta, mode="lines", name=f"{name} − fp32",
                                     legendgroup=name, showlegend=False, line=arm_line(name)), row=2, col=1)
        fig.add_hline(y=0, line={"color": ARM_COLORS[BASELINE], "width": 1}, row=2, col=1)
        fig.update_yaxes(title_text="arm − fp32", zeroline=False, row=2, col=1)
    fig.update_xaxes(title_text="optimizer step", row=2 if diff else 1, col=1)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_layout(
        title="Training loss per step" + (" and each arm's difference to fp32" if diff else ""),
        yaxis3={"overlaying": "y", "visible": False, "range": [0, 1]},
        height=520 if diff else 380, margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.14 if diff else -0.2},
    )
    return fig


def loss_scale(result: AuditResult) -> go.Figure | None:
    """The fp16 GradScaler scale per step (log axis) with skipped steps marked; None without an fp16 arm."""
    fig = go.Figure()
    any_arm = False
    for name, arm in result.arms.items():
        ls = arm.loss_scale
        if ls is None or not ls.history:
            continue
        any_arm = True
        steps = list(range(1, len(ls.history) + 1))
        fig.add_trace(go.Scatter(x=steps, y=ls.history, mode="lines", name=f"{name} loss scale",
                                 line={"shape": "hv", "color": ARM_COLORS.get(name)}))
        if ls.skipped_steps:
            fig.add_trace(go.Scatter(
                x=[s + 1 for s in ls.skipped_steps], y=[ls.history[s] for s in ls.skipped_steps],
                mode="markers", name=f"{name} skipped step ({ls.skipped})",
                marker={"symbol": "x", "size": 8, "color": "black"},
            ))
    if not any_arm:
        return None
    fig.update_layout(
        title="fp16 loss scale (GradScaler)", xaxis_title="optimizer step", yaxis_title="scale",
        yaxis_type="log", height=320, margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def noise_band(result: AuditResult) -> go.Figure | None:
    """Each arm's mean delta vs fp32 (with its 95% interval) against fp32's seed-noise band (±k·σ)."""
    floors = result.gate.noise_floor
    checks = [c for c in result.gate.checks if c.metric in floors and c.delta is not None]
    if not checks:
        return None
    k = result.gate.noise_k or 0.0
    fig = go.Figure()
    labels = [f"{c.arm} {c.metric}" for c in checks]
    for label, c in zip(labels, checks, strict=True):
        sigma = floors[c.metric].std
        fig.add_trace(go.Bar(x=[label], y=[2 * k * sigma], base=[-k * sigma], name=f"±{k:g}σ fp32 noise",
                             marker={"color": "rgba(120,120,120,0.25)"}, showlegend=label == labels[0],
                             hoverinfo="skip"))
    err_plus = [(c.delta_high - c.delta) if c.delta_high is not None and c.delta is not None else 0 for c in checks]
    err_minus = [(c.delta - c.delta_low) if c.delta_low is not None and c.delta is not None else 0 for c in checks]
    fig.add_trace(go.Scatter(
        x=labels, y=[c.delta for c in checks], mode="markers", name="mean delta vs fp32 (95% CI)",
        marker={"size": 11, "color": ["#1a7f37" if c.passed else "#c62828" for c in checks]},
        error_y={"type": "data", "array": err_plus, "arrayminus": err_minus, "visible": True, "color": "#333"},
    ))
    fig.update_layout(title="Delta vs fp32 against the seed-noise band", yaxis_title="metric delta (arm − fp32)",
                      barmode="overlay", height=340, margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def speed_bars(result: AuditResult) -> go.Figure | None:
    """Median step time per arm with its interquartile range as error bars (the measurement phase)."""
    rows = [(n, a.speed) for n, a in result.arms.items() if a.speed is not None and a.speed.error is None]
    rows += [(n, s) for n, s in result.compiled.items() if s.error is None]
    if not rows:
        return None
    names = [n for n, _ in rows]
    med = [s.step_s_median * 1e3 for _, s in rows]
    q1 = [s.step_s_median * 1e3 - _quantile(s.times_s, 0.25) * 1e3 for _, s in rows]
    q3 = [_quantile(s.times_s, 0.75) * 1e3 - s.step_s_median * 1e3 for _, s in rows]
    fig = go.Figure(go.Bar(
        x=names, y=med, marker={"color": [ARM_COLORS.get(n.split("+")[0], "#888") for n in names]},
        error_y={"type": "data", "array": q3, "arrayminus": q1, "visible": True, "color": "#333"},
        hovertemplate="%{x}: %{y:.3g} ms median<extra></extra>",
    ))
    fig.update_layout(title="Step time (median, bars show the interquartile range)", yaxis_title="ms per step",
                      height=320, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


def memory_bars(result: AuditResult) -> go.Figure | None:
    """Each category's high-water mark during one training step, stacked per arm."""
    from mpaudit.results.perf import BREAKDOWN_KEYS

    mems = {n: a.memory for n, a in result.arms.items() if a.memory is not None and a.memory.error is None}
    if not mems:
        return None
    fig = go.Figure()
    for key in BREAKDOWN_KEYS:
        fig.add_trace(go.Bar(name=key.replace("_", " "), x=list(mems),
                             y=[m.breakdown.get(key, 0) / 2**20 for m in mems.values()]))
    fig.update_layout(
        barmode="stack", yaxis_title="MiB", height=360, margin={"l": 60, "r": 20, "t": 60, "b": 40},
        title={"text": "Memory of one training step: each category at its largest (MiB)<br><sub>categories peak at "
                       "different moments (activations after forward, optimizer state at the step), so a stack can "
                       "exceed the step's peak</sub>"},
    )
    return fig


def _quantile(xs: Any, p: float) -> float:
    ordered = sorted(xs)
    if not ordered:
        return math.nan
    pos = p * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def all_charts(result: AuditResult) -> dict[str, dict[str, Any]]:
    """Every chart of the report as plotly JSON (``{"data": ..., "layout": ...}``), keyed by div id."""
    figs = {
        "chart-loss": loss_curves(result), "chart-scale": loss_scale(result), "chart-noise": noise_band(result),
        "chart-speed": speed_bars(result), "chart-memory": memory_bars(result),
        "chart-heatmap": layers_view.heatmap(result),
    }
    return {key: fig.to_plotly_json() for key, fig in figs.items() if fig is not None}
