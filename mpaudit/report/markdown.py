"""``summary.md``: the verdict of one audit in GitHub-flavoured Markdown, short enough for a PR comment.

It leads with one line per arm: its verdict, the number that was judged (the gated metric, else the primary
metric, else the final training loss) and its gap to fp32, the root cause of its trouble and the verified fix
when ``--verify`` found one. Then a table where every row uses the same aggregate (the mean over seeds, ± the
standard deviation when ``--seeds`` > 1), the gate, fp32's noise floor, and the root-cause flags (errors and
warnings by default, consequences counted beside their cause). Every piece of user-supplied text (task, metric
and layer names, error messages, recommendations) goes through :func:`md_escape`, so a ``|`` or newline cannot
break a table and a ``<`` cannot inject HTML. ``append_step_summary`` adds it to ``$GITHUB_STEP_SUMMARY`` on
GitHub Actions.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpaudit.ci.gaps import (
    FINAL_LOSS,
    fp32_noise,
    gap_to_fp32,
    judged_metric,
    lower_is_better,
    metric_value,
    result_direction,
)
from mpaudit.ci.verdict import Verdict, root_cause, verdicts
from mpaudit.errors import UsageError
from mpaudit.numerics.causes import group_by_cause
from mpaudit.results.model import ArmResult, AuditResult, Flag
from mpaudit.text import cut, fmt, recipe_text
from mpaudit.vocab import BASELINE, ERROR, OK, SEVERITIES, severity_rank

DEFAULT_MAX_FLAGS = 10
"""Flags listed in the summary, worst first; the rest are counted and left to report.html."""

DEFAULT_MIN_SEVERITY = "warning"
"""The least severe flags the summary lists (``--min-severity``); the others are counted."""

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
"""The file GitHub Actions renders on a job's summary page; set by the runner in every step."""

_MD_ESCAPES = {
    "\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "|": "\\|", "~": "\\~",
    "&": "&amp;", "<": "&lt;", ">": "&gt;", "@": "&#64;",
}
"""Backslash-escape Markdown's inline syntax and ``|`` (table cells); entity-escape HTML; ``@`` so a name
in a report cannot mention (notify) a GitHub user."""


def md_escape(text: Any) -> str:
    """User text as literal Markdown inline text, safe inside a table cell: one line, no markup, no HTML."""
    s = "".join(_MD_ESCAPES.get(ch, ch) for ch in str(text))
    return "<br>".join(part for part in s.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GFM table; every cell is escaped with :func:`md_escape`."""
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _status(arm: ArmResult) -> str:
    text = arm.status + (f" ({arm.fp16_mode})" if arm.fp16_mode else "")
    text += f" ({arm.fp8_mode} float8, {arm.fp8_recipe})" if arm.fp8_mode else ""
    return text + (f": {cut(arm.error)}" if arm.error else "")


def judged_metrics(result: AuditResult) -> list[str]:
    """The numbers the verdict judged: the gated metrics, else the primary metric, else the final loss."""
    if result.gate.given:
        gated = list(result.gate.max_drop)
        return gated + ([FINAL_LOSS] if result.gate.max_loss_gap is not None else [])
    base = result.baseline
    if base is None:
        return [result.primary_metric or FINAL_LOSS]
    return [judged_metric(base, result.metric_directions)]


def _aggregate(result: AuditResult, name: str, metric: str) -> str:
    """The arm's value of ``metric``: the mean over its seeds that finished, ± their standard deviation."""
    values = [v for run in result.runs(name) if run.status == OK
              for v in [metric_value(run, metric)] if v is not None and math.isfinite(v)]
    if not values:
        value = metric_value(result.arms[name], metric)
        return fmt(value)
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.fmean(values))} ± {fmt(statistics.stdev(values), 2)}"


def _gap_cell(result: AuditResult, name: str, metric: str) -> str:
    """The arm's value (the same aggregate in every row) and its gap to fp32 (paired over seeds, 95% CI when more
    than one), worse/better."""
    value = _aggregate(result, name, metric)
    if name == BASELINE or result.arms[name].observed:
        return value
    gap = gap_to_fp32(result, name, metric)
    if gap is None:
        base = result.baseline
        if result.arms[name].status != OK and base is not None:
            return f"{value} (did not finish; fp32 {_aggregate(result, BASELINE, metric)})"
        return value + " (no gap: fp32 did not finish)"
    lower = lower_is_better(metric, result.metric_directions)
    worse = None if lower is None else (gap.delta > 0 if lower else gap.delta < 0)
    word = "" if gap.delta == 0 or worse is None else (", worse" if worse else ", better")
    text = f"{value} ({gap.delta:+.4g}{word}"
    if gap.seeds > 1:
        text += f"; 95% CI {gap.low:+.3g}..{gap.high:+.3g}"
    return text + ")"


def _fix(result: AuditResult, name: str) -> str | None:
    """The verified fix of an arm, in words, with what it reached."""
    rec = next((r for r in result.recommendations if r.arm == name and r.passed), None)
    if rec is None:
        return None
    parts = []
    if rec.keep_fp32:
        parts.append("keep " + ", ".join(f"`{p}`" for p in rec.keep_fp32) + " in fp32")
    if rec.init_scale is not None:
        parts.append(f"GradScaler init_scale 2^{math.log2(rec.init_scale):g}")
    if rec.fp32_master:
        parts.append("fp32 master weights for " + ", ".join(f"`{p}`" for p in rec.fp32_master))
    if rec.update_rounding is not None:
        parts.append(f"{rec.update_rounding} rounding of bf16 updates")
    if rec.exclude_from_fp8:
        parts.append("keep " + ", ".join(f"`{p}`" for p in rec.exclude_from_fp8) + " out of float8 (exclude_from_fp8)")
    if rec.fp8_recipe is not None:
        parts.append(f"{rec.fp8_recipe} scaling")
    metric = next(iter(rec.metrics), None)
    reached = f" ({metric} {fmt(rec.metrics[metric])} in `{rec.verified_arm}`)" if metric is not None else ""
    return " and ".join(parts) + reached


def _arm_line(result: AuditResult, name: str, verdict: Verdict) -> str:
    """``- **fp16: not safe**: accuracy 0.06 vs fp32 0.98 (-0.91, worse); root cause: ...; verified fix: ...``"""
    parts = []
    for metric in judged_metrics(result):
        parts.append(f"{metric} {_gap_cell(result, name, metric)}")
    arm = result.arms[name]
    if arm.status != OK:
        parts.insert(0, _status(arm))
    roots = [f for f in result.flags if f.arm == name and f.caused_by is None and f.severity == ERROR]
    if roots:
        parts.append("root cause: " + root_cause(roots[0]).split(": ", 1)[0])
    line = f"- **{md_escape(name)}: {verdict.level}**: " + md_escape("; ".join(parts))
    fix = _fix(result, name)
    return line + (f"; **verified fix:** {md_escape(fix)}" if fix is not None else "")


def _speed_cell(result: AuditResult, name: str) -> str:
    """Benchmark speedup with its interval when the result has one, else the training-loop ratio."""
    speedup = (getattr(result, "speedups", None) or {}).get(name)
    if speedup is not None:
        text = f"{speedup.ratio:.3g}×"
        if getattr(speedup, "ci_low", None) is not None and getattr(speedup, "ci_high", None) is not None:
            text += f" (95% CI {speedup.ci_low:.3g}–{speedup.ci_high:.3g})"
        verdict = getattr(speedup, "verdict", None)
        return text + (f" {verdict}" if verdict else "")
    base, arm = result.arms.get(BASELINE), result.arms[name]
    if name == BASELINE or base is None or base.speed is None or arm.speed is None:
        return "–"
    b, a = base.speed.step_s_median, arm.speed.step_s_median
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        return "–"
    return f"{b / a:.3g}× (training loop, no interval)"


def _skipped_cell(arm: ArmResult) -> str:
    if arm.loss_scale is None:
        return ""
    return f"{arm.loss_scale.skipped} of {arm.steps}"


def _has_speed(result: AuditResult) -> bool:
    return bool(getattr(result, "speedups", None)) or any(a.speed for a in result.arms.values())


def _gate_lines(result: AuditResult) -> list[str]:
    gate = result.gate
    if result.observed:
        return ["**Gate:** not applicable: an observed run has no fp32 arm to gate against."]
    if not gate.given:
        return ["**Gate:** none given (add `--max-drop METRIC=DELTA` to fail CI on a precision regression)."]
    limits = [f"{m}={v}" for m, v in gate.max_drop.items()]
    if gate.max_loss_gap is not None:
        limits.append(f"max-loss-gap={gate.max_loss_gap:g}")
    asked = md_escape(", ".join(limits))
    if gate.passed:
        return [f"**Gate:** ✅ passed, {len(gate.checks)} checks ({asked})."]
    lines = [f"**Gate:** ❌ failed, {len(gate.failures)} of {len(gate.checks)} checks ({asked}):", ""]
    return lines + [f"- {md_escape(check.message)}" for check in gate.failures]


def _noise_line(result: AuditResult, metric: str) -> str:
    floor = fp32_noise(result, metric)
    if floor is None:
        return "**Noise floor:** no noise estimate (run with `--seeds K`)."
    k = result.gate.noise_k
    auto = f"; `auto` allows {k:g}σ = {fmt(k * floor.std)}" if k else ""
    return (f"**Noise floor:** fp32 {md_escape(metric)} σ = {fmt(floor.std, 3)} over {floor.n} seeds "
            f"(range {fmt(floor.min)}..{fmt(floor.max)}){auto}.")


def _policy_lines(result: AuditResult) -> list[str]:
    """Which autocast op lists a CPU run's arms followed (on a GPU, CUDA autocast's own, nothing to say)."""
    if not str(result.env.get("device", "")).startswith("cpu"):
        return []
    by_policy: dict[str, list[str]] = {}
    for arm in result.arms.values():
        if arm.autocast_policy:
            by_policy.setdefault(arm.autocast_policy, []).append(arm.name)
    what = {"cuda": "CUDA autocast's op lists, each op in the dtype a GPU gives it",
            "cpu": "CPU autocast's op lists (exp, softmax, sum, layer_norm, pow, norm in half precision, unlike a GPU)"}
    return [f"**Op policy:** {md_escape(', '.join(names))} followed {what.get(policy, md_escape(policy))} "
            f"(`--autocast-policy {md_escape(policy)}`)." for policy, names in by_policy.items()]


def _flag_lines(flags: Sequence[Flag], max_flags: int, min_severity: str) -> list[str]:
    """The root-cause flags at least ``min_severity`` severe, worst first, each with the count of what follows
    from it; the rest are counted."""
    if not flags:
        return []
    limit = severity_rank(min_severity)
    groups = [(root, rest) for root, rest in group_by_cause(flags) if severity_rank(root.severity) <= limit]
    # sorted is stable: within a severity the rules' order (forward order) stays
    shown = sorted(groups, key=lambda g: severity_rank(g[0].severity))[:max_flags]
    listed = sum(1 + len(rest) for _, rest in shown)
    rest_count = len(flags) - listed
    title = f"**Flags:** {len(flags)}; the {len(shown)} root cause{'s' if len(shown) != 1 else ''} at least " \
            f"{min_severity}-severe" + (f" (and what follows from them); {rest_count} more in report.html:"
                                        if rest_count else " and what follows from them:")
    if not shown:
        return [f"**Flags:** {len(flags)}, none at least {min_severity}-severe (see report.html)."]
    rows = [[f.severity, f.arm, f.kind, f.layer + (f" ({f.site.op} at {f.site.short_source})" if f.site else ""),
             f.recommendation, str(len(rest)) if rest else ""] for f, rest in shown]
    return [title, "", md_table(["severity", "arm", "kind", "where", "recommendation", "follows from it"], rows)]


def _headline(result: AuditResult) -> str:
    bad = [a for a in result.arms.values() if a.status != OK]
    if result.gate.given:
        verdict = "✅ gate passed" if result.gate.passed else "❌ gate failed"
    elif result.observed and not bad:
        verdict = "observed run"
    else:
        verdict = "⚠️ " + ", ".join(f"{a.name} {a.status}" for a in bad) if bad else "no gate given"
    return f"### mpaudit: {md_escape(result.task)}: {verdict}"


def _footer(result: AuditResult) -> str:
    env = result.env
    device = env.get("device", "?") + (f" ({env['device_name']})" if env.get("device_name") else "")
    parts = [f"mpaudit {result.mpaudit_version or env.get('mpaudit_version', '?')}",
             f"torch {env.get('torch_version', '?')}", device, f"{result.config.get('steps', '?')} steps"]
    if result.seeds:
        parts.append(f"seeds {', '.join(str(s) for s in result.seeds)}")
    recipe = recipe_text(result.config)
    if recipe:
        parts.append(f"recipe: {recipe}")
    if result.distributed is not None:
        d = result.distributed
        parts.append(f"{d.parallel.upper()} × {d.world_size} ranks ({d.backend})")
    if env.get("task_sha256"):
        parts.append(f"task sha256 {str(env['task_sha256'])[:12]}")
    return "<sub>" + md_escape(" · ".join(parts)) + "</sub>"


def summary_markdown(result: AuditResult, max_flags: int = DEFAULT_MAX_FLAGS,
                     min_severity: str = DEFAULT_MIN_SEVERITY) -> str:
    """The PR-comment / job-summary view of one result: a verdict line per arm, the table, gate, noise floor,
    root-cause flags."""
    if min_severity not in SEVERITIES:
        raise UsageError(f"--min-severity must be one of {', '.join(SEVERITIES)}, not {min_severity!r}.")
    judged = judged_metrics(result)[0]
    metric = judged if result.gate.given else (result.primary_metric or judged)  # an unknown direction shows
    direction = {"min": "lower is better", "max": "higher is better"}.get(result_direction(result, metric),
                                                                           "direction unknown, not judged")
    seeds = len(result.seeds)
    aggregate = f"mean ± sd over {seeds} seeds; " if seeds > 1 else ""
    gap = "" if result.observed else "gap to fp32; "
    headers = ["arm", "verdict", "status", f"{metric} ({aggregate}{gap}{direction})"]
    levels = verdicts(result)
    with_speed, with_skips = _has_speed(result), any(a.loss_scale for a in result.arms.values())
    if with_speed:
        headers.append("speedup vs fp32")
    if with_skips:
        headers.append("fp16 skipped steps")
    rows = []
    for name, arm in result.arms.items():
        row = [name, levels[name].level, _status(arm), _gap_cell(result, name, metric)]
        row += [_speed_cell(result, name)] if with_speed else []
        row += [_skipped_cell(arm)] if with_skips else []
        rows.append(row)
    lines = [_arm_line(result, name, v) for name, v in levels.items() if name != BASELINE or result.arms[name].observed]
    out = [_headline(result), ""]
    if result.observed:
        out += [f"**Observed run** ({md_escape(', '.join(result.arms))}): mpaudit watched the user's own training "
                "loop; no fp32 arm was trained beside it, so this is not a matched comparison and nothing is gated.",
                ""]
    out += [*lines, "", md_table(headers, rows), "", *_gate_lines(result), ""]
    if not result.observed:
        out += [_noise_line(result, metric), ""]
    policy = _policy_lines(result)
    if policy:
        out += [*policy, ""]
    flags = _flag_lines(result.flags, max_flags, min_severity)
    if flags:
        out += [*flags, ""]
    notes = [f"- {md_escape(name)}: {md_escape(note)}" for name, arm in result.arms.items() for note in arm.notes]
    if notes:
        out += ["**Notes on the arms:**", "", *notes, ""]
    failure = result.distributed.failure if result.distributed is not None else None
    if failure is not None:
        where = f" in {failure.arm}" if failure.arm else ""
        out += [f"**Rank {failure.rank} failed{md_escape(where)}:** {md_escape(failure.error)}. The job stopped; "
                "the arms above are those finished before it.", ""]
    if result.warnings:
        out += ["**Warnings:**", "", *(f"- {md_escape(w)}" for w in result.warnings), ""]
    out.append(_footer(result))
    return "\n".join(out) + "\n"


def append_step_summary(markdown: str) -> Path | None:
    """Append ``markdown`` to the file ``$GITHUB_STEP_SUMMARY`` names (GitHub Actions); None when unset.

    UsageError when the variable names a file that cannot be written.
    """
    target = os.environ.get(STEP_SUMMARY_ENV)
    if not target:
        return None
    path = Path(target)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    except OSError as exc:
        raise UsageError(f"${STEP_SUMMARY_ENV} names {path}, which cannot be appended to: {exc.strerror}.") from None
    return path
