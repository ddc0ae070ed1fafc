"""The terminal view of one result (``mpaudit run`` without ``-q``): a table of the arms, the root-cause flags with
what follows from them folded underneath, and the recommendations."""

from __future__ import annotations

from rich.table import Table

from mpaudit.ci.verdict import root_cause
from mpaudit.numerics.causes import group_by_cause
from mpaudit.results.model import AuditResult
from mpaudit.text import fmt
from mpaudit.vocab import ERROR

MAX_ROOTS = 5
"""Root-cause error flags printed; the rest are counted (the report lists them all)."""
MAX_FOLDED = 4
"""Consequences named under a root; the rest are counted."""


def summary_table(result: AuditResult) -> Table:
    """One row per arm: status, steps, final loss, metrics, step time, speedup, peak memory, skipped steps."""
    metrics = list(dict.fromkeys(m for a in result.arms.values() for m in a.metrics))
    table = Table(title=f"mpaudit: {result.task}", title_justify="left")
    for col in ["arm", "status", "steps", "final loss", *metrics, "step ms", "speedup (95% CI)", "peak MiB", "skipped"]:
        table.add_column(col, justify="left" if col in ("arm", "status") else "right")
    for name, arm in result.arms.items():
        sp = result.speedups.get(name)
        table.add_row(
            name, arm.status if not arm.error else f"{arm.status}: {arm.error}", str(arm.steps), fmt(arm.final_loss),
            *[fmt(arm.metrics.get(m)) for m in metrics],
            fmt(arm.speed.step_s_median * 1e3, 3) if arm.speed and not arm.speed.error else "–",
            f"{sp.ratio:.2f}x ({sp.ci_low:.2f}–{sp.ci_high:.2f}) {sp.verdict}" if sp else "",
            fmt(arm.memory.peak_bytes / 2**20, 3) if arm.memory and not arm.memory.error else "–",
            str(arm.loss_scale.skipped) if arm.loss_scale else "",
        )
    return table


def summary_lines(result: AuditResult) -> list[str]:
    """The error flags that are root causes (each with its consequences folded under it), the recommendations
    and the arms' notes (what the arm did differently from what was asked, e.g. layers left out of float8)."""
    lines: list[str] = []
    groups = [(root, rest) for root, rest in group_by_cause(result.flags) if root.severity == ERROR]
    for root, rest in groups[:MAX_ROOTS]:
        lines.append(f"flag: {root.arm} {root_cause(root)}")
        if rest:
            named = ", ".join(f"{f.kind} at {f.layer}" for f in rest[:MAX_FOLDED])
            more = f" and {len(rest) - MAX_FOLDED} more" if len(rest) > MAX_FOLDED else ""
            lines.append(f"  follows from it: {named}{more}")
    if len(groups) > MAX_ROOTS:
        lines.append(f"... and {len(groups) - MAX_ROOTS} more root-cause error flags (see the report)")
    for rec in result.recommendations:
        change = ", ".join(filter(None, [f"keep {', '.join(rec.keep_fp32)} in fp32" if rec.keep_fp32 else "",
                                         f"init_scale={rec.init_scale:g}" if rec.init_scale else "",
                                         f"fp32_master={', '.join(rec.fp32_master)}" if rec.fp32_master else "",
                                         f"update_rounding={rec.update_rounding}" if rec.update_rounding else "",
                                         f"exclude_from_fp8={', '.join(rec.exclude_from_fp8)}"
                                         if rec.exclude_from_fp8 else "",
                                         f"{rec.fp8_recipe} scaling" if rec.fp8_recipe else ""]))
        if rec.verified_arm is not None:
            how = f"{'verified' if rec.passed else 'not verified'} by training {rec.verified_arm}"
        else:
            how = "not trained"
        lines.append(f"recommendation for {rec.arm}: {change or 'none'} ({how}; {rec.reason})")
    lines += [f"note: {name}: {note}" for name, arm in result.arms.items() for note in arm.notes]
    return lines
