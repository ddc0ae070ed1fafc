"""``summary.md``: the verdict of one audit in GitHub-flavoured Markdown, short enough for a PR comment.

Per arm: status, the primary metric's gap to fp32 (with its 95% interval when ``--seeds`` was used),
the speedup when measured and fp16's skipped steps; then the gate and its failing checks, fp32's noise
floor, and the worst flags. Every piece of user-supplied text (task, metric and layer names, error
messages, recommendations) goes through :func:`md_escape`, so a ``|`` or newline cannot break a table and
a ``<`` cannot inject HTML. ``append_step_summary`` adds it to ``$GITHUB_STEP_SUMMARY`` on GitHub Actions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpaudit.arms import BASELINE
from mpaudit.ci.compare import FINAL_LOSS, MAX_ERROR_CHARS, fp32_noise, gap_to_fp32
from mpaudit.ci.gate import lower_is_better
from mpaudit.errors import UsageError
from mpaudit.report.html import fmt
from mpaudit.results.model import ArmResult, AuditResult, Flag

DEFAULT_MAX_FLAGS = 10
"""Flags listed in the summary, worst first; the rest are counted and left to report.html."""

SEVERITY_ORDER = ("error", "warning", "info")
"""Flag severities, worst first; unknown severities sort after these."""

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


def _cut(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _status(arm: ArmResult) -> str:
    text = arm.status + (f" ({arm.fp16_mode})" if arm.fp16_mode else "")
    return text + (f": {_cut(arm.error)}" if arm.error else "")


def _gap_cell(result: AuditResult, name: str, metric: str) -> str:
    """The arm's value and its gap to fp32 (mean over seeds, 95% CI when more than one), worse/better."""
    arm = result.arms[name]
    value = arm.final_loss if metric == FINAL_LOSS else arm.metrics.get(metric)
    if name == BASELINE:
        return fmt(value)
    gap = gap_to_fp32(result, name, metric)
    if gap is None:
        return fmt(value) + (" (no gap: fp32 or this arm did not finish)" if value is not None else "")
    worse = gap.delta > 0 if (metric == FINAL_LOSS or lower_is_better(metric)) else gap.delta < 0
    word = "" if gap.delta == 0 else (", worse" if worse else ", better")
    text = f"{fmt(gap.value)} ({gap.delta:+.4g}{word}"
    if gap.seeds > 1:
        text += f"; 95% CI {gap.low:+.3g}..{gap.high:+.3g} over {gap.seeds} seeds"
    return text + ")"


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


def _severity_rank(flag: Flag) -> int:
    return SEVERITY_ORDER.index(flag.severity) if flag.severity in SEVERITY_ORDER else len(SEVERITY_ORDER)


def _flag_lines(flags: Sequence[Flag], max_flags: int) -> list[str]:
    if not flags:
        return []
    worst = sorted(flags, key=_severity_rank)[:max_flags]  # stable: the rules' order within a severity
    title = f"**Flags:** {len(flags)}" + (f", the {len(worst)} worst:" if len(worst) < len(flags) else ":")
    rows = [[f.severity, f.layer, f.arm, f.kind, f.recommendation] for f in worst]
    return [title, "", md_table(["severity", "layer", "arm", "kind", "recommendation"], rows)]


def _headline(result: AuditResult) -> str:
    bad = [a for a in result.arms.values() if a.status != "ok"]
    if result.gate.given:
        verdict = "✅ gate passed" if result.gate.passed else "❌ gate failed"
    else:
        verdict = "⚠️ " + ", ".join(f"{a.name} {a.status}" for a in bad) if bad else "no gate given"
    return f"### mpaudit: {md_escape(result.task)}: {verdict}"


def _footer(result: AuditResult) -> str:
    env = result.env
    device = env.get("device", "?") + (f" ({env['device_name']})" if env.get("device_name") else "")
    parts = [f"mpaudit {result.mpaudit_version or env.get('mpaudit_version', '?')}",
             f"torch {env.get('torch_version', '?')}", device, f"{result.config.get('steps', '?')} steps",
             f"seeds {', '.join(str(s) for s in result.seeds)}"]
    if result.distributed is not None:
        d = result.distributed
        parts.append(f"{d.parallel.upper()} × {d.world_size} ranks ({d.backend})")
    if env.get("task_sha256"):
        parts.append(f"task sha256 {str(env['task_sha256'])[:12]}")
    return "<sub>" + md_escape(" · ".join(parts)) + "</sub>"


def summary_markdown(result: AuditResult, max_flags: int = DEFAULT_MAX_FLAGS) -> str:
    """The PR-comment / job-summary view of one result: verdict per arm, gate, noise floor, worst flags."""
    metric = result.primary_metric or FINAL_LOSS
    direction = "lower" if metric == FINAL_LOSS or lower_is_better(metric) else "higher"
    headers = ["arm", "status", f"{metric} (gap to fp32; {direction} is better)"]
    with_speed, with_skips = _has_speed(result), any(a.loss_scale for a in result.arms.values())
    if with_speed:
        headers.append("speedup vs fp32")
    if with_skips:
        headers.append("fp16 skipped steps")
    rows = []
    for name, arm in result.arms.items():
        row = [name, _status(arm), _gap_cell(result, name, metric)]
        row += [_speed_cell(result, name)] if with_speed else []
        row += [_skipped_cell(arm)] if with_skips else []
        rows.append(row)
    out = [_headline(result), "", md_table(headers, rows), "", *_gate_lines(result), "",
           _noise_line(result, metric), ""]
    policy = _policy_lines(result)
    if policy:
        out += [*policy, ""]
    flags = _flag_lines(result.flags, max_flags)
    if flags:
        out += [*flags, ""]
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
