"""One line per arm that tells a person what to do: safe, safe with changes, or not safe — and why.

Derived from the result alone (status, gate, flags, metric deltas), so every renderer (HTML, Markdown,
the suite index) says the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpaudit.ci.gaps import UNGATED_RELATIVE_DROP, judged_metric, ungated_drop
from mpaudit.results.model import AuditResult, Flag
from mpaudit.vocab import (
    BASELINE,
    BASELINE_LEVEL,
    ERROR,
    NOT_SAFE,
    OBSERVED_LEVEL,
    OK,
    SAFE,
    SAFE_WITH_CHANGES,
    SKIPPED,
    SKIPPED_LEVEL,
    WARNING,
    VerdictLevel,
)


@dataclass(frozen=True)
class Verdict:
    """The verdict on one arm, with the reasons behind it in plain words."""

    arm: str
    level: VerdictLevel
    reasons: list[str] = field(default_factory=list)


def verdicts(result: AuditResult) -> dict[str, Verdict]:
    """The verdict on every arm, in the result's arm order."""
    return {name: verdict(result, name) for name in result.arms}


def root_cause(flag: Flag) -> str:
    """A root-cause flag in one line: ``forward_overflow at block.attn (aten.bmm.default at model.py:63): advice``."""
    where = f" ({flag.site.op} at {flag.site.short_source})" if flag.site is not None and flag.site.source else ""
    return f"{flag.kind} at {flag.layer}{where}" + (f": {flag.recommendation}" if flag.recommendation else "")


def verdict(result: AuditResult, name: str) -> Verdict:
    """Not safe: the arm diverged or failed, failed the gate, or (no gate) fell clearly behind fp32.
    Safe with changes: it trains as well as fp32 only if an error-severity flag's recommendation is applied,
    or it fails as is but a recommendation trained by ``--verify`` passed (the reason names the change).
    Safe: none of those."""
    arm = result.arms[name]
    if arm.observed:
        return _observed(result, name)
    if name == BASELINE:
        return Verdict(name, BASELINE_LEVEL, ["the fp32 reference every other arm is compared with"])
    if arm.status == SKIPPED:
        return Verdict(name, SKIPPED_LEVEL, [f"not run on this machine: {arm.error}" if arm.error else "not run"])
    blockers: list[str] = []
    if arm.status != OK:
        blockers.append(f"{arm.status}" + (f": {arm.error}" if arm.error else ""))
    failed_checks = [c for c in result.gate.checks if c.arm == name and not c.passed]
    blockers += [f"gate failed: {c.message}" for c in failed_checks if arm.status == OK]
    base = result.baseline
    if not result.gate.given and arm.status == OK and base is not None:
        drop = ungated_drop(arm, base, result.metric_directions)
        if drop:
            blockers.append(drop)
    errors = [f for f in result.flags if f.arm == name and f.severity == ERROR and f.caused_by is None]
    warnings = [f for f in result.flags if f.arm == name and f.severity == WARNING and f.caused_by is None]
    fix = next((r for r in result.recommendations if r.arm == name and r.passed), None)
    causes = [root_cause(f) for f in errors[:3]]
    if blockers and fix is not None:
        return Verdict(name, SAFE_WITH_CHANGES, [f"verified by training: {fix.reason}", *causes[:1], *blockers[:2]])
    if blockers:
        return Verdict(name, NOT_SAFE, [*blockers[:1], *causes, *blockers[1:]])
    if errors:
        return Verdict(name, SAFE_WITH_CHANGES, causes)
    judged = judged_metric(base, result.metric_directions) if base is not None else "the primary metric"
    within = "the gate" if result.gate.given else f"{UNGATED_RELATIVE_DROP:.0%} on {judged}"
    reasons = [f"matches fp32 within {within}"]
    if warnings:
        reasons.append(f"{len(warnings)} warning flag(s) to watch")
    if arm.loss_scale is not None and arm.loss_scale.skipped:
        reasons.append(f"GradScaler skipped {arm.loss_scale.skipped} of {arm.steps} steps")
    return Verdict(name, SAFE, reasons)


def _observed(result: AuditResult, name: str) -> Verdict:
    """A watched run: not safe when it diverged or failed, else ``observed`` with what the numerics showed. Never
    "safe": nothing was compared with fp32."""
    arm = result.arms[name]
    errors = [root_cause(f) for f in result.flags if f.arm == name and f.severity == ERROR and f.caused_by is None]
    warnings = [f for f in result.flags if f.arm == name and f.severity == WARNING and f.caused_by is None]
    if arm.status != OK:
        return Verdict(name, NOT_SAFE, [f"{arm.status}" + (f": {arm.error}" if arm.error else ""), *errors[:3]])
    reasons = ["observed run, not a matched comparison: no fp32 arm trained beside it"]
    reasons += errors[:3] if errors else ["no error flag"]
    if warnings:
        reasons.append(f"{len(warnings)} warning flag(s) to watch")
    if arm.loss_scale is not None and arm.loss_scale.skipped:
        reasons.append(f"GradScaler skipped {arm.loss_scale.skipped} of {arm.steps} steps")
    return Verdict(name, OBSERVED_LEVEL, reasons)
