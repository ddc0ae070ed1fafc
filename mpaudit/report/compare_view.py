"""Views of a comparison (``mpaudit compare``): a terminal table and a Markdown pull-request comment.

They read a :class:`~mpaudit.ci.compare.Comparison` and nothing else; ``--json`` is
:func:`mpaudit.ci.compare.to_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mpaudit.ci.compare import (
    EXIT_REGRESSION,
    ArmRow,
    Comparison,
    MemoryRow,
    MetricRow,
    SpeedRow,
    gap_text,
    ratio_text,
)
from mpaudit.report.markdown import md_escape, md_table
from mpaudit.text import byte_size, fmt
from mpaudit.vocab import BASELINE


def _verdict_line(c: Comparison) -> str:
    if not c.comparable:
        return "not comparable: no arm in common (exit 2)"
    n = len(c.regressions)
    if n:
        return f"{n} regression{'s' if n != 1 else ''} (exit 1)"
    return "no regression (exit 0)"


def _growth_text(m: MetricRow) -> str:
    g = m.growth
    if m.lower_is_better is None:
        return "direction unknown"
    if g is None:
        return "–"
    return "same" if g == 0 else f"{fmt(abs(g), 3)} {'worse' if g > 0 else 'better'}"


def _metric_cells(m: MetricRow) -> list[str]:
    fp32 = " → ".join(fmt(g.baseline) if g else "–" for g in (m.base, m.new))
    gaps = [gap_text(g) if g else "–" for g in (m.base, m.new)]
    lower = m.lower_is_better
    better = "" if lower is None else " (lower is better)" if lower else " (higher is better)"
    return [m.arm, m.metric + better, fp32, *gaps, _growth_text(m), m.limit_text, m.outcome or "–"]


_METRIC_HEADERS = ["arm", "metric", "fp32 base → new", "gap base", "gap new", "growth", "allowed", "verdict"]


def _status_cells(row: ArmRow) -> list[str]:
    status = row.base_status if row.base_status == row.new_status else f"{row.base_status} → {row.new_status}"
    skipped = ("–" if row.base_skipped is None and row.new_skipped is None
               else f"{row.base_skipped if row.base_skipped is not None else '–'}/{row.base_steps} → "
                    f"{row.new_skipped if row.new_skipped is not None else '–'}/{row.new_steps}")
    flags = (f"+{len(row.flags_appeared)} / -{len(row.flags_disappeared)}"
             if row.flags_appeared or row.flags_disappeared else "–")
    return [row.arm, status, skipped, flags]


_STATUS_HEADERS = ["arm", "status", "fp16 skipped steps", "flags new / gone"]


def _speed_cells(row: SpeedRow) -> list[str]:
    change = f"{row.change:+.0%}" if math.isfinite(row.change) else "–"
    return [row.name, ratio_text(row.base), ratio_text(row.new), change,
            row.source + ("" if row.gated else ", not gated")]


_SPEED_HEADERS = ["speedup vs fp32", "base", "new", "change", "source"]


def _memory_cells(row: MemoryRow) -> list[str]:
    def one(peak: int, frac: float | None) -> str:
        return byte_size(peak) + (f" ({frac:.0%} of fp32)" if frac is not None and row.arm != BASELINE else "")

    return [row.arm, one(row.base_peak_bytes, row.base_fraction), one(row.new_peak_bytes, row.new_fraction)]


_MEMORY_HEADERS = ["peak memory", "base", "new"]


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def _label(identity: Mapping[str, Any]) -> str:
    sha = identity.get("task_sha256")
    parts = [str(identity.get("created") or "undated"), f"sha256 {sha[:8]}" if sha else ""]
    return " ".join(p for p in parts if p)


def to_text(c: Comparison) -> str:
    """A plain-text report for the terminal: tables of status, gaps, speed and memory, then the verdicts."""
    out = [f"mpaudit compare: {c.task}  (base {_label(c.base)}  →  new {_label(c.new)})", ""]
    if c.arms:
        out += [_text_table(_STATUS_HEADERS, [_status_cells(r) for r in c.arms]), ""]
    metric_rows = [_metric_cells(m) for r in c.arms for m in r.metrics]
    if metric_rows:
        out += ["Gap to fp32 (arm − fp32; base → new):", _text_table(_METRIC_HEADERS, metric_rows), ""]
    if c.speed:
        out += [_text_table(_SPEED_HEADERS, [_speed_cells(r) for r in c.speed]), ""]
    if c.memory:
        out += [_text_table(_MEMORY_HEADERS, [_memory_cells(r) for r in c.memory]), ""]
    for title, items in (("REGRESSIONS", c.regressions), ("IMPROVEMENTS", c.improvements), ("NOTES", c.notes)):
        if items:
            out += [f"{title} ({len(items)})", *(f"  - {x}" for x in items), ""]
    out.append(f"result: {_verdict_line(c)}")
    return "\n".join(out) + "\n"


def to_markdown(c: Comparison) -> str:
    """GitHub-flavoured Markdown for a pull-request comment: the verdict first, then the tables."""
    icon = "❌" if c.exit_code == EXIT_REGRESSION else "⚠️" if not c.comparable else "✅"
    out = [f"### {icon} mpaudit compare: {md_escape(c.task)}: {_verdict_line(c)}", "",
           f"base {md_escape(_label(c.base))} → new {md_escape(_label(c.new))}", ""]
    if c.regressions:
        out += ["**Regressions**", "", *(f"- {md_escape(x)}" for x in c.regressions), ""]
    if c.improvements:
        out += ["**Improvements**", "", *(f"- {md_escape(x)}" for x in c.improvements), ""]
    if c.arms:
        out += [md_table(_STATUS_HEADERS, [_status_cells(r) for r in c.arms]), ""]
    metric_rows = [_metric_cells(m) for r in c.arms for m in r.metrics]
    if metric_rows:
        out += ["Gap to fp32 (arm − fp32), base → new:", "", md_table(_METRIC_HEADERS, metric_rows), ""]
    if c.speed:
        out += [md_table(_SPEED_HEADERS, [_speed_cells(r) for r in c.speed]), ""]
    if c.memory:
        out += [md_table(_MEMORY_HEADERS, [_memory_cells(r) for r in c.memory]), ""]
    if c.notes:
        out += ["<details><summary>Notes</summary>", "", *(f"- {md_escape(x)}" for x in c.notes), "", "</details>",
                ""]
    return "\n".join(out)
