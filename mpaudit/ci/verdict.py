"""One line per arm that tells a person what to do: safe, safe with changes, or not safe — and why.

Derived from the result alone (status, gate, flags, metric deltas), so every renderer (HTML, Markdown,
the suite index) says the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpaudit.arms import BASELINE
from mpaudit.ci.gate import lower_is_better
from mpaudit.results.model import AuditResult

SAFE, SAFE_WITH_CHANGES, NOT_SAFE, BASELINE_LEVEL = "safe", "safe with changes", "not safe", "baseline"

UNGATED_RELATIVE_DROP = 0.02
"""Without a gate, a primary metric more than this fraction of fp32's value worse than fp32 is "not safe".
A gate (``--max-drop``) replaces this default with the user's own tolerance."""


@dataclass(frozen=True)
class Verdict:
    """The verdict on one arm, with the reasons behind it in plain words."""

    arm: str
    level: str
    reasons: list[str] = field(default_factory=list)


def verdicts(result: AuditResult) -> dict[str, Verdict]:
    """The verdict on every arm, in the result's arm order."""
    return {name: verdict(result, name) for name in result.arms}


def verdict(result: AuditResult, name: str) -> Verdict:
    """Not safe: the arm diverged or failed, failed the gate, or (no gate) fell clearly behind fp32.
    Safe with changes: it trains as well as fp32 only if an error-severity flag's recommendation is applied,
    or it fails as is but a recommendation trained by ``--verify`` passed (the reason names the change).
    Safe: none of those."""
    arm = result.arms[name]
    if name == BASELINE:
        return Verdict(name, BASELINE_LEVEL, ["the fp32 reference every other arm is compared with"])
    blockers: list[str] = []
    if arm.status != "ok":
        blockers.append(f"{arm.status}" + (f": {arm.error}" if arm.error else ""))
    failed_checks = [c for c in result.gate.checks if c.arm == name and not c.passed]
    blockers += [f"gate failed: {c.message}" for c in failed_checks if arm.status == "ok"]
    if not result.gate.given and arm.status == "ok":
        drop = _ungated_drop(result, name)
        if drop:
            blockers.append(drop)
    errors = [f for f in result.flags if f.arm == name and f.severity == "error"]
    warnings = [f for f in result.flags if f.arm == name and f.severity == "warning"]
    fix = next((r for r in result.recommendations if r.arm == name and r.passed), None)
    if blockers and fix is not None:
        return Verdict(name, SAFE_WITH_CHANGES, [f"verified by training: {fix.reason}", *blockers[:2]])
    if blockers:
        reasons = blockers + [f"{f.kind} at {f.layer}: {f.recommendation}" for f in errors[:3]]
        return Verdict(name, NOT_SAFE, reasons)
    if errors:
        return Verdict(name, SAFE_WITH_CHANGES, [f"{f.kind} at {f.layer}: {f.recommendation}" for f in errors[:3]])
    reasons = ["matches fp32 within " + ("the gate" if result.gate.given else "2% on the primary metric")]
    if warnings:
        reasons.append(f"{len(warnings)} warning flag(s) to watch")
    if arm.loss_scale is not None and arm.loss_scale.skipped:
        reasons.append(f"GradScaler skipped {arm.loss_scale.skipped} of {arm.steps} steps")
    return Verdict(name, SAFE, reasons)


def _ungated_drop(result: AuditResult, name: str) -> str | None:
    metric = result.primary_metric
    base = result.baseline
    if metric is None or base is None or metric not in base.metrics:
        return None
    value, ref = result.arms[name].metrics.get(metric), base.metrics[metric]
    if value is None:
        return None
    worse = (value - ref) if lower_is_better(metric) else (ref - value)
    if worse > UNGATED_RELATIVE_DROP * abs(ref):
        return (f"{metric} {value:.4g} vs fp32 {ref:.4g} is more than {UNGATED_RELATIVE_DROP:.0%} worse "
                "(no gate given; set your own tolerance with --max-drop)")
    return None
