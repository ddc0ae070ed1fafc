"""The CI gate: does any mixed-precision arm fall too far behind fp32?

``--max-drop METRIC=DELTA`` fails when an arm's metric is more than DELTA *below* fp32's (for a
metric whose name contains ``loss``, more than DELTA *above*). ``--max-loss-gap DELTA`` does the
same on the final training loss. A diverged or failed arm fails every gate. The gate reads only an
:class:`~mpaudit.result.AuditResult`, so a saved result can be gated again without training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from mpaudit.arms import BASELINE
from mpaudit.errors import UsageError
from mpaudit.result import ArmResult, Gate, GateCheck


def parse_max_drop(specs: Iterable[str]) -> dict[str, float]:
    """``["accuracy=0.01", "loss=0.1"]`` -> ``{"accuracy": 0.01, "loss": 0.1}``; UsageError when malformed."""
    out: dict[str, float] = {}
    for spec in specs:
        metric, sep, value = spec.partition("=")
        metric = metric.strip()
        if not sep or not metric:
            raise UsageError(f"--max-drop {spec!r} is not of the form METRIC=DELTA (e.g. accuracy=0.01).")
        try:
            delta = float(value)
        except ValueError:
            raise UsageError(f"--max-drop {spec!r}: {value!r} is not a number.") from None
        if not math.isfinite(delta) or delta < 0:
            raise UsageError(f"--max-drop {spec!r}: the allowed drop must be a finite number >= 0.")
        out[metric] = delta
    return out


def lower_is_better(metric: str) -> bool:
    """Metrics are higher-is-better unless their name says loss (or perplexity, error)."""
    name = metric.lower()
    return any(word in name for word in ("loss", "perplexity", "ppl", "error"))


def _worse_by(metric: str, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse)."""
    return value - baseline if lower_is_better(metric) else baseline - value


def evaluate_gate(arms: dict[str, ArmResult], max_drop: dict[str, float], max_loss_gap: float | None) -> Gate:
    """Check every non-baseline arm against fp32 under the given limits."""
    gate = Gate(max_drop=dict(max_drop), max_loss_gap=max_loss_gap)
    if not gate.given:
        return gate
    checks: list[GateCheck] = []
    base = arms.get(BASELINE)
    others = [a for name, a in arms.items() if name != BASELINE]
    limits: list[tuple[str, str, float]] = [("max_drop", m, d) for m, d in max_drop.items()]
    if max_loss_gap is not None:
        limits.append(("max_loss_gap", "final_loss", max_loss_gap))

    for arm in others:
        for kind, metric, limit in limits:
            checks.append(_check(base, arm, kind, metric, limit))
    return Gate(checks=checks, max_drop=dict(max_drop), max_loss_gap=max_loss_gap)


def _value(arm: ArmResult, metric: str) -> float | None:
    if metric == "final_loss":
        return arm.final_loss
    return arm.metrics.get(metric)


def _check(base: ArmResult | None, arm: ArmResult, kind: str, metric: str, limit: float) -> GateCheck:
    def fail(msg: str, **kw: float | None) -> GateCheck:
        return GateCheck(arm=arm.name, metric=metric, kind=kind, limit=limit, passed=False, message=msg, **kw)

    if base is None or base.status == "failed":
        why = "did not run" if base is None else "failed"
        return fail(f"{arm.name} {metric}: cannot compare, the fp32 baseline {why}.")
    if arm.status != "ok":
        detail = f" ({arm.error})" if arm.error else ""
        return fail(f"{arm.name} {metric}: the arm {arm.status}{detail}.", value=_value(arm, metric))
    b, v = _value(base, metric), _value(arm, metric)
    if b is None or v is None:
        return fail(f"{arm.name} {metric}: the metric is missing from evaluate()'s result.", baseline=b, value=v)
    if not math.isfinite(v):
        return fail(f"{arm.name} {metric} = {v} is not finite (fp32 {b:.4g}).", baseline=b, value=v)
    worse = _worse_by(metric, b, v)
    passed = worse <= limit
    if worse > 0:
        change = f"{'rose' if lower_is_better(metric) else 'fell'} by {worse:.4g}"
    else:
        change = "no worse" if worse == 0 else f"better by {-worse:.4g}"
    verb = "within" if passed else "beyond"
    msg = f"{arm.name} {metric} = {v:.4g} vs fp32 {b:.4g}: {change}, {verb} the allowed {limit:g}."
    return GateCheck(
        arm=arm.name, metric=metric, kind=kind, limit=limit, passed=passed, message=msg,
        baseline=b, value=v, delta=v - b,
    )
