"""``index.json`` and ``index.html`` of ``mpaudit suite``: one row per workload, built from its saved result.

Both files come from the same rows (:func:`index_rows`), so the page and the JSON never disagree. Per
workload: status (ok / gate failed / error with exit code and stderr tail), per arm its verdict, the primary
metric's gap to fp32 and its step time relative to fp32's, flag counts by severity, the gate, and a
relative link to the workload's own ``report.html``. Every user-supplied string is escaped by jinja2's
autoescape; link targets are also percent-encoded.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mpaudit.ci.gaps import gap_to_fp32, lower_is_better, result_direction
from mpaudit.ci.verdict import verdicts
from mpaudit.report.templates import ENV
from mpaudit.results.codec import dumps_plain
from mpaudit.results.model import ArmResult, AuditResult
from mpaudit.results.suite import SuiteResult, WorkloadRun
from mpaudit.text import fmt
from mpaudit.vocab import BASELINE, SEVERITIES

INDEX_SCHEMA_VERSION = 1
"""Bumped when a key of ``index.json`` changes meaning or moves."""
STEP_SOURCE_BENCH = "measured"
STEP_SOURCE_LOOP = "training loop"
"""Where a step-time ratio comes from: the separate speed measurement (``speed``), or, when that was skipped
(``--no-bench``), the audited training loop itself (``train_step_s``, which includes per-step overhead)."""



def _step_s(arm: ArmResult) -> tuple[float | None, str | None]:
    """An arm's step time in seconds and where it was measured."""
    if arm.speed is not None and arm.speed.error is None and arm.speed.steps_timed:
        return arm.speed.step_s_median, STEP_SOURCE_BENCH
    if arm.train_step_s is not None:
        return arm.train_step_s, STEP_SOURCE_LOOP
    return None, None


def _arm_cells(result: AuditResult) -> dict[str, dict[str, Any]]:
    """Per arm: status, verdict, primary metric and its gap to fp32, step time relative to fp32's."""
    metric = result.primary_metric
    judged = verdicts(result)
    base = result.arms.get(BASELINE)
    base_step, base_source = _step_s(base) if base is not None else (None, None)
    cells: dict[str, dict[str, Any]] = {}
    for name, arm in result.arms.items():
        value = arm.metrics.get(metric) if metric else None
        gap = gap_to_fp32(result, name, metric) if metric and name != BASELINE else None
        step, source = _step_s(arm)
        ratio = None
        if name != BASELINE and step and base_step and source == base_source:
            ratio = step / base_step
        worse = None
        lower = lower_is_better(metric, result.metric_directions) if metric else None
        if gap is not None and gap.delta != 0 and lower is not None:
            worse = gap.delta > 0 if lower else gap.delta < 0
        speedup = result.speedups.get(name)
        cells[name] = {
            "status": arm.status,
            "error": arm.error,
            "fp16_mode": arm.fp16_mode,
            "verdict": judged[name].level,
            "verdict_reasons": judged[name].reasons,
            "metric_value": value,
            "delta": None if gap is None else gap.delta,
            "worse": worse,
            "step_time_ratio": ratio,
            "step_time_source": source if ratio is not None else None,
            "speed_verdict": speedup.verdict if speedup is not None else None,
            "skipped_steps": arm.loss_scale.skipped if arm.loss_scale is not None else None,
        }
    return cells


def _flag_counts(result: AuditResult) -> dict[str, int]:
    counts = Counter(flag.severity for flag in result.flags)
    ordered: dict[str, int] = {s: counts.pop(s, 0) for s in SEVERITIES}
    return {**ordered, **dict(sorted(counts.items()))}


def index_rows(suite: SuiteResult) -> list[dict[str, Any]]:
    """One JSON-ready row per workload (the content of ``index.json``'s ``workloads``)."""
    return [_row(run, suite) for run in suite.runs]


def _row(run: WorkloadRun, suite: SuiteResult) -> dict[str, Any]:
    result = run.result
    html = run.report_html
    row: dict[str, Any] = {
        "name": run.name,
        "task": str(run.task),
        "status": run.status,
        "exit_code": run.exit_code,
        "seconds": run.seconds,
        "error": run.error,
        "stderr_tail": run.stderr_tail if run.error is not None else "",
        "report_html": _relative(html, suite) if html is not None else None,
        "report_json": _relative(run.report_dir / "report.json", suite) if result is not None else None,
        "primary_metric": None,
        "lower_is_better": None,
        "metric_direction": None,
        "arms": {},
        "flags": {},
        "gate": None,
        "warnings": [],
    }
    if result is None:
        return row
    metric = result.primary_metric
    row.update(
        primary_metric=metric,
        lower_is_better=lower_is_better(metric, result.metric_directions) if metric else None,
        metric_direction=result_direction(result, metric) if metric else None,
        arms=_arm_cells(result),
        flags=_flag_counts(result),
        gate={"given": result.gate.given, "passed": result.gate.passed,
              "failures": [c.message for c in result.gate.failures]},
        warnings=list(result.warnings),
    )
    return row


def _relative(path: Path, suite: SuiteResult) -> str:
    """``path`` relative to the index's folder, with forward slashes (a link that works when the folder moves)."""
    return path.resolve().relative_to(suite.out_dir.resolve()).as_posix()


def render_index_json(suite: SuiteResult) -> str:
    """``index.json``: the suite's rows plus what ran and how it ended (non-finite floats as strings)."""
    data = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "suite_dir": str(suite.suite_dir),
        "run_args": list(suite.run_args),
        "created": _now(),
        "exit_code": suite.exit_code,
        "workloads": index_rows(suite),
    }
    return dumps_plain(data)


def render_index_html(suite: SuiteResult) -> str:
    """``index.html``: a self-contained table (no JavaScript) linking each workload's ``report.html``."""
    rows = index_rows(suite)
    arms = list(dict.fromkeys(a for row in rows for a in row["arms"]))
    counts = Counter(row["status"] for row in rows)
    return ENV.get_template("index.html.j2").render(
        suite=suite, rows=rows, arms=arms, counts=counts, fmt=fmt, href=_href, ratio=_ratio, created=_now(),
    )


def _href(relative: str) -> str:
    """A relative link with each path segment percent-encoded (a workload folder may hold any character)."""
    return "/".join(quote(part) for part in relative.split("/"))


def _ratio(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"×{x:.2f}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["INDEX_SCHEMA_VERSION", "index_rows", "render_index_html", "render_index_json"]
