"""``report.html``: a self-contained page rendered by jinja2 (autoescape on) from the result alone."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import plotly.io
import plotly.offline

from mpaudit.arms import stores_half_weights
from mpaudit.ci.gaps import result_direction
from mpaudit.ci.verdict import verdicts
from mpaudit.numerics.causes import group_by_cause
from mpaudit.numerics.fp8 import GEMM_OPERANDS, GEMMS
from mpaudit.numerics.rules import Thresholds, update_losses
from mpaudit.report import layers_view
from mpaudit.report.charts import all_charts, arm_line
from mpaudit.report.snippets import fp8_filter_snippets, snippet
from mpaudit.report.templates import ENV
from mpaudit.results.model import POOR_SQNR_DB, AuditResult
from mpaudit.text import fmt, recipe_text
from mpaudit.vocab import BASELINE, MAX, MIN, UNKNOWN

DIRECTION_TEXT = {MIN: "lower is better", MAX: "higher is better", UNKNOWN: "direction unknown"}
"""How a metric's direction is written under its name."""

PLOTLY_CDN = "https://cdn.plot.ly/plotly-{version}.min.js"



def script_json(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``</script>``, ``<!--`` or line separators escape."""
    text = plotly.io.json.to_json_plotly(data)
    return (
        text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    )


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    return plotly.offline.get_plotlyjs()


def _rows(result: AuditResult) -> list[dict[str, Any]]:
    """One summary row per arm: status, final loss, metrics and their delta vs fp32, speed, loss scale."""
    base = result.baseline
    rows = []
    for name, arm in result.arms.items():
        deltas: dict[str, str] = {}
        for metric, value in arm.metrics.items():
            if base is None or name == BASELINE or metric not in base.metrics:
                deltas[metric] = ""
                continue
            d = value - base.metrics[metric]
            direction = result_direction(result, metric)
            worse = direction != UNKNOWN and (d > 0 if direction == MIN else d < 0)
            deltas[metric] = ("worse " if worse and abs(d) > 0 else "") + f"{d:+.4g}"
        sp = result.speedups.get(name)
        saving = result.activation_savings.get(name)
        timed = arm.speed is not None and arm.speed.error is None
        rows.append({
            "name": name, "arm": arm, "final_loss": fmt(arm.final_loss), "deltas": deltas,
            "step_ms": fmt(arm.speed.step_s_median * 1e3, 3) if timed and arm.speed
            else fmt(arm.train_step_s * 1e3, 3) if arm.observed and arm.train_step_s is not None else "–",
            "step_iqr_ms": fmt(arm.speed.step_s_iqr * 1e3, 2) if timed and arm.speed else "",
            "speedup": f"{sp.ratio:.2f}× ({sp.ci_low:.2f}–{sp.ci_high:.2f})" if sp else "",
            "verdict": sp.verdict if sp else "",
            "speedup_note": sp.note if sp and sp.note else "",
            "peak_mib": fmt(arm.memory.peak_bytes / 2**20, 3) if arm.memory and not arm.memory.error else "–",
            "act_saving": f"{saving:.0%}" if saving is not None else "",
            "max_batch": result.max_batch.get(name, ""),
        })
    return rows


def _recommendation_rows(result: AuditResult) -> list[dict[str, Any]]:
    """One row per verified recommendation: the arm before and after the change, and the code that applies it."""
    rows = []
    linears = linear_layers(result)
    for rec in result.recommendations:
        before = result.arms.get(rec.arm)
        after = result.verification.get(rec.verified_arm) if rec.verified_arm else None
        if after is None and rec.verified_arm:
            after = result.arms.get(rec.verified_arm)  # the other float8 recipe, trained as an arm of the audit
        fp8 = rec.exclude_from_fp8 or rec.fp8_recipe is not None
        rows.append({"rec": rec, "before": before, "after": after, "snippet": snippet(rec, linears),
                     "fp8_snippets": fp8_filter_snippets(rec, linears) if fp8 else {}})
    return rows


def linear_layers(result: AuditResult) -> list[str]:
    """The model's Linear layers as the result knows them (float8 arms' converted and excluded layers, the fp32 arm's
    float8 cast statistics), in the order first seen."""
    seen: list[str] = []
    for arm in [*result.arms.values(), *result.verification.values()]:
        seen += [*arm.fp8_layers, *arm.exclude_from_fp8, *(arm.fp8_casts.all_layers() if arm.fp8_casts else [])]
    return list(dict.fromkeys(seen))


def _fp8_rows(result: AuditResult) -> tuple[list[dict[str, Any]], int]:
    """Per Linear layer and GEMM, for each float8 recipe the fp32 arm predicted and each float8 arm that trained it:
    the flushed and saturated shares of the GEMM's two operands, predicted (fp32's tensors) and measured (the arm's).
    Only GEMMs where an operand loses at least the warning share are listed (a large model has hundreds); the second
    number counts the GEMMs left out."""
    base = result.arms.get(BASELINE)
    reference = base.fp8_casts if base is not None else None
    limits = _thresholds(result)
    rows: list[dict[str, Any]] = []
    quiet = 0
    trained = {arm.fp8_recipe: (name, arm) for name, arm in result.arms.items()
               if arm.fp8_recipe is not None and arm.fp8_casts is not None}
    recipes = list(dict.fromkeys([*(reference.recipes if reference is not None else []), *trained]))
    for recipe in recipes:
        predicted = reference.losses(recipe) if reference is not None else {}
        name, arm = trained.get(recipe, (None, None))
        measured = arm.fp8_casts.losses(recipe) if arm is not None and arm.fp8_casts is not None else {}
        for layer in dict.fromkeys([*predicted, *measured]):
            for gemm in GEMMS:
                p, m = predicted.get(layer, {}).get(gemm), measured.get(layer, {}).get(gemm)
                losses = [g for g in (p, m) if g is not None]
                if not losses:
                    continue
                if (max(g.flush for g in losses) < limits.fp8_underflow_warning
                        and max(g.saturation for g in losses) < limits.fp8_saturation_warning):
                    quiet += 1
                    continue
                cells = []
                for operand in GEMM_OPERANDS[gemm]:
                    ps = p.operands.get(operand) if p is not None else None
                    ms = m.operands.get(operand) if m is not None else None
                    either = ps or ms
                    fmt_name = either.format if either is not None else ""
                    cells.append({"operand": operand, "format": fmt_name,
                                  "predicted": ps.flush_fraction if ps is not None else None,
                                  "measured": ms.flush_fraction if ms is not None else None,
                                  "saturated": max([s.saturation_fraction for s in (ps, ms) if s is not None],
                                                   default=None)})
                rows.append({"recipe": recipe, "arm": name, "layer": layer, "gemm": gemm, "cells": cells})
    return rows, quiet


def _thresholds(result: AuditResult) -> Thresholds:
    """The thresholds the result's flags were raised under."""
    try:
        return Thresholds.from_mapping(result.config.get("thresholds") or {})
    except Exception:  # a result written with thresholds this mpaudit does not know
        return Thresholds()


def _lost_update_rows(result: AuditResult) -> list[dict[str, Any]]:
    """Per traced layer of each half-weight arm (``bf16-pure``): the share of its sampled updates measured lost,
    beside the share fp32's updates predict."""
    base = result.arms.get(BASELINE)
    reference = base.trace if base is not None else None
    error_at = _thresholds(result).update_lost_error
    rows = []
    for name, arm in result.arms.items():
        if not stores_half_weights(name) or arm.trace is None:
            continue
        for layer, loss in update_losses(arm.trace, reference).items():
            rows.append({"arm": name, "layer": layer, "measured": loss.measured, "unchanged": loss.unchanged,
                         "predicted": loss.predicted, "sampled": loss.sampled,
                         "error": loss.measured >= error_at})
    return rows


def render_html(result: AuditResult, *, plotlyjs: str = "inline") -> str:
    """The report page. ``plotlyjs="inline"`` embeds plotly.js (works offline); ``"cdn"`` links it."""
    if plotlyjs not in ("inline", "cdn"):
        raise ValueError("plotlyjs must be 'inline' or 'cdn'")
    metrics = list(dict.fromkeys(m for arm in result.arms.values() for m in arm.metrics))
    template = ENV.get_template("report.html.j2")
    fp8_rows, fp8_quiet = _fp8_rows(result)
    charts = all_charts(result)
    return template.render(
        verdicts=verdicts(result),
        flag_groups=group_by_cause(result.flags),
        charts=charts,
        r=result,
        rows=_rows(result),
        recommendation_rows=_recommendation_rows(result),
        half_weight_arms=[name for name in result.arms if stores_half_weights(name)],
        lost_update_rows=_lost_update_rows(result),
        fp8_rows=fp8_rows,
        fp8_quiet=fp8_quiet,
        fp8_flush_error=_thresholds(result).fp8_underflow_error,
        fp8_flush_warning=_thresholds(result).fp8_underflow_warning,
        fp8_arms=[(name, arm) for name, arm in result.arms.items() if arm.fp8_recipe is not None],
        poor_sqnr_db=POOR_SQNR_DB,
        metrics=metrics,
        fmt=fmt,
        charts_json=script_json(charts),
        layers_json=script_json({**layers_view.explorer_data(result),
                                 "colors": {name: arm_line(name)["color"] or "#888" for name in result.arms}}),
        layers_shown=layers_view.shown_layers(result),
        heatmap_cap=layers_view.MAX_HEATMAP_ROWS,
        plotly_inline=_plotly_js() if plotlyjs == "inline" else None,
        plotly_cdn=PLOTLY_CDN.format(version=plotly.offline.get_plotlyjs_version()),
        directions={m: result_direction(result, m) for m in metrics},
        direction_text=DIRECTION_TEXT,
        recipe=recipe_text(result.config),
    )
