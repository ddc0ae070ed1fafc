"""The CI gate: does any mixed-precision arm fall too far behind fp32 — beyond what seed noise explains?

``--max-drop METRIC=DELTA`` fails when an arm's metric is more than DELTA worse than fp32's: *below* it for a
higher-is-better metric, *above* it for a lower-is-better one (the direction is declared, recorded in the result
or read from the name: :func:`~mpaudit.ci.gaps.metric_direction`; a gate on a metric whose direction is unknown
is a usage error, as is one on a metric the task does not return: :func:`check_gated_metrics`).
``--max-loss-gap DELTA`` does the same on the final training loss. With ``--seeds K`` every arm trains with K
seeds; a check then uses the mean paired drop over the seeds (with a 95% t-interval), and ``METRIC=auto`` sets the
limit to ``k·σ`` where σ is fp32's seed-to-seed standard deviation of that metric (the *noise floor*) and k is
:data:`DEFAULT_NOISE_K` (``--noise-k``). A diverged or failed run fails every check, and so does every run
when the arms did not start from identical weights and batches (mismatched fingerprints: the comparison is
meaningless). The gate reads only results, so a saved ``report.json`` can be gated again without training.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

from mpaudit.ci.gaps import (
    lower_is_better,
    metric_direction,
    metric_value,
    noise_floor,
    t_interval,
    unknown_direction_message,
)
from mpaudit.defaults import DEFAULT_NOISE_K
from mpaudit.errors import UsageError
from mpaudit.results.model import ArmResult, Gate, GateCheck, NoiseFloor, fingerprints_match
from mpaudit.vocab import BASELINE, FAILED, OK, SKIPPED, UNKNOWN

MISMATCHED_FINGERPRINTS = ("the arms did not start from identical weights and batches (their fingerprints differ), "
                           "so the comparison with fp32 is meaningless")
"""Why every gate check fails when the arms' fingerprints differ (``mpaudit run`` and ``gate`` then exit 2)."""

AUTO = "auto"

Limit = float | str


def parse_max_drop(specs: Iterable[str]) -> dict[str, Limit]:
    """``["accuracy=0.01", "loss=auto"]`` -> ``{"accuracy": 0.01, "loss": "auto"}``; UsageError when malformed."""
    out: dict[str, Limit] = {}
    for spec in specs:
        metric, sep, value = spec.partition("=")
        metric, value = metric.strip(), value.strip()
        if not sep or not metric:
            raise UsageError(
                f"--max-drop {spec!r} is not of the form METRIC=DELTA (e.g. accuracy=0.01 or accuracy=auto)."
            )
        if value == AUTO:
            out[metric] = AUTO
            continue
        try:
            delta = float(value)
        except ValueError:
            raise UsageError(f"--max-drop {spec!r}: {value!r} is neither a number nor 'auto'.") from None
        if not math.isfinite(delta) or delta < 0:
            raise UsageError(f"--max-drop {spec!r}: the allowed drop must be a finite number >= 0.")
        out[metric] = delta
    return out


def check_gated_metrics(max_drop: Iterable[str], metrics: Sequence[str], *stated: Mapping[str, str] | None,
                        option: str = "--max-drop") -> None:
    """UsageError when a gated metric is not among ``metrics`` (a typo: the sentence lists the real ones) or its
    direction is unknown (``stated``: declared, then recorded directions; else its name). ``mpaudit run`` checks
    before training, ``mpaudit gate`` and ``compare`` before judging a saved result."""
    for metric in max_drop:
        if not metrics:
            raise UsageError(f"{option} names metric {metric!r}, but there are no metrics: the task has no "
                             "evaluate() (--max-loss-gap gates the final training loss).")
        if metric not in metrics:
            raise UsageError(f"{option} names metric {metric!r}, which evaluate() does not return; the metrics are: "
                             f"{', '.join(metrics)}.")
        if metric_direction(metric, *stated) == UNKNOWN:
            raise UsageError(unknown_direction_message(metric, option))


def check_declared_metrics(declared: Iterable[str], metrics: Sequence[str]) -> None:
    """UsageError when ``--metric-direction`` names a metric that is not among ``metrics`` (a typo)."""
    for metric in declared:
        if metrics and metric not in metrics:
            raise UsageError(f"--metric-direction names metric {metric!r}, which evaluate() does not return; the "
                             f"metrics are: {', '.join(metrics)}.")


def evaluate_gate(
    arms: Mapping[str, ArmResult],
    max_drop: Mapping[str, Limit],
    max_loss_gap: float | None,
    replicates: Mapping[str, Sequence[ArmResult]] | None = None,
    noise_k: float = DEFAULT_NOISE_K,
    directions: Mapping[str, str] | None = None,
) -> Gate:
    """Check every non-fp32 arm against fp32 under the given limits (an arm ``skipped`` on this machine has no
    numbers to check, and gets no check).

    ``replicates`` holds, per arm, its runs with the extra seeds (paired by position with fp32's); with
    them the checks use mean paired drops and the gate records fp32's noise floor for every metric.
    ``directions`` maps metrics to ``min``/``max`` (declared, or recorded in the result); other metrics go by
    their name, and a gated metric whose direction stays unknown is a UsageError. When the arms' fingerprints
    differ every check fails with :data:`MISMATCHED_FINGERPRINTS`.
    """
    observed = [name for name, arm in arms.items() if arm.observed]
    if observed and (max_drop or max_loss_gap is not None):
        raise UsageError(f"{observed[0]} is an observed run (mpaudit.watch): it has no matched fp32 arm, so there is "
                         "no gap to gate on; gate a result of mpaudit run instead.")
    replicates = replicates or {}
    for metric in max_drop:
        if metric_direction(metric, directions) == UNKNOWN:
            raise UsageError(unknown_direction_message(metric))
    runs = {name: [arm, *replicates.get(name, [])] for name, arm in arms.items()}
    floors = _noise_floors(runs.get(BASELINE, []))
    for metric, limit in max_drop.items():
        if limit == AUTO and (metric not in floors or floors[metric].n < 2):
            raise UsageError(f"--max-drop {metric}=auto needs --seeds 2 or more, to measure fp32's seed noise.")
    gate = Gate(max_drop=dict(max_drop), max_loss_gap=max_loss_gap, noise_floor=floors,
                noise_k=noise_k if floors else None)
    if not gate.given:
        return gate
    limits: list[tuple[str, str, Limit]] = [("max_drop", m, d) for m, d in max_drop.items()]
    if max_loss_gap is not None:
        limits.append(("max_loss_gap", "final_loss", max_loss_gap))
    matched = fingerprints_match(arms, replicates)
    checks = [
        _check(runs.get(BASELINE, []), arm_runs, kind, metric, limit, floors, noise_k, directions, matched)
        for name, arm_runs in runs.items() if name != BASELINE and arm_runs[0].status != SKIPPED
        for kind, metric, limit in limits
    ]
    return Gate(checks=checks, max_drop=dict(max_drop), max_loss_gap=max_loss_gap, noise_floor=floors,
                noise_k=gate.noise_k)


def _noise_floors(base_runs: Sequence[ArmResult]) -> dict[str, NoiseFloor]:
    ok = [r for r in base_runs if r.status == OK]
    if len(ok) < 2:
        return {}
    floors = {}
    for metric in ok[0].metrics:
        values = [r.metrics[metric] for r in ok if metric in r.metrics and math.isfinite(r.metrics[metric])]
        if len(values) >= 2:
            floors[metric] = noise_floor(values)
    return floors


def _check(
    base_runs: Sequence[ArmResult],
    arm_runs: Sequence[ArmResult],
    kind: str,
    metric: str,
    limit_spec: Limit,
    floors: Mapping[str, NoiseFloor],
    noise_k: float,
    directions: Mapping[str, str] | None = None,
    matched: bool = True,
) -> GateCheck:
    name = arm_runs[0].name
    floor = floors.get(metric)
    if limit_spec == AUTO:
        assert floor is not None  # checked by evaluate_gate
        limit = noise_k * floor.std
        limit_text = f"{limit:.4g} (= {noise_k:g}σ of fp32's seed noise, σ={floor.std:.3g} over {floor.n} seeds)"
    else:
        limit = float(limit_spec)
        limit_text = f"{limit:g}"
        if floor is not None:
            limit_text += f" (fp32 seed noise σ={floor.std:.3g} over {floor.n} seeds)"

    def fail(msg: str, **kw: float | None) -> GateCheck:
        return GateCheck(arm=name, metric=metric, kind=kind, limit=limit, passed=False, message=msg,
                         seeds=len(arm_runs), **kw)

    if not matched:
        return fail(f"{name} {metric}: {MISMATCHED_FINGERPRINTS}.")
    base = base_runs[0] if base_runs else None
    if base is None or any(r.status == FAILED for r in base_runs):
        why = "did not run" if base is None else "failed"
        return fail(f"{name} {metric}: cannot compare, the fp32 baseline {why}.")
    bad = next((r for r in arm_runs if r.status != OK), None)
    if bad is not None:
        detail = f" ({bad.error})" if bad.error else ""
        return fail(f"{name} {metric}: the arm {bad.status}{detail}; the allowed drop was {limit_text}.",
                    value=metric_value(bad, metric))
    pairs = [(metric_value(b, metric), metric_value(a, metric)) for b, a in zip(base_runs, arm_runs, strict=False)]
    if any(b is None or v is None for b, v in pairs):
        return fail(f"{name} {metric}: the metric is missing from evaluate()'s result.")
    bs = [float(b) for b, _ in pairs]  # type: ignore[arg-type]
    vs = [float(v) for _, v in pairs]  # type: ignore[arg-type]
    if not all(math.isfinite(v) for v in vs + bs):
        return fail(f"{name} {metric} is not finite ({vs} vs fp32 {bs}).", value=vs[0], baseline=bs[0])
    lower = lower_is_better(metric, directions)
    sign = 1.0 if lower else -1.0
    worse, low, high = t_interval([sign * (v - b) for b, v in zip(bs, vs, strict=True)])
    b_mean, v_mean = statistics.fmean(bs), statistics.fmean(vs)
    passed = worse <= limit
    if worse > 0:
        change = f"{'rose' if lower else 'fell'} by {worse:.4g}"
    else:
        change = "no worse" if worse == 0 else f"better by {-worse:.4g}"
    seeds = ""
    if len(pairs) > 1:
        seeds = f" (mean of {len(pairs)} seeds, 95% CI of the drop {low:.3g}..{high:.3g})"
    verb = "within" if passed else "beyond"
    better = "lower" if lower else "higher"
    msg = (f"{name} {metric} = {v_mean:.4g} vs fp32 {b_mean:.4g} ({better} is better): {change}{seeds}, {verb} the "
           f"allowed {limit_text}.")
    delta = v_mean - b_mean
    return GateCheck(
        arm=name, metric=metric, kind=kind, limit=limit, passed=passed, message=msg,
        baseline=b_mean, value=v_mean, delta=delta,
        delta_low=min(sign * low, sign * high) if len(pairs) > 1 else None,
        delta_high=max(sign * low, sign * high) if len(pairs) > 1 else None,
        seeds=len(pairs),
    )
