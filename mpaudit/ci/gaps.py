"""Gaps to fp32: the arithmetic the gate, the verdict, the recommendations, compare and every view share.

An arm's *gap* on a metric is arm − fp32, paired seed by seed and averaged (with a 95% t-interval when there are
several seeds). Whether a gap is worse depends on the metric's direction (:func:`lower_is_better`). Without a
gate, an arm "passes" when its primary metric — or, without metrics, its final training loss — is at most
:data:`UNGATED_RELATIVE_DROP` of fp32's value worse: :func:`ungated_drop` is that one rule.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from pydantic.dataclasses import dataclass

from mpaudit.results.codec import RESULT_CONFIG
from mpaudit.results.model import ArmResult, AuditResult, NoiseFloor
from mpaudit.text import fmt
from mpaudit.vocab import BASELINE, OK

FINAL_LOSS = "final_loss"
"""Pseudo-metric: the mean training loss over the last steps (``ArmResult.final_loss``), lower is better."""

UNGATED_RELATIVE_DROP = 0.02
"""Without a gate, an arm whose primary metric (or final loss) is more than this fraction of fp32's value worse
than fp32's is "not safe". A gate (``--max-drop``) replaces this default with the user's own tolerance."""

# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); beyond that the normal 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def lower_is_better(metric: str) -> bool:
    """Metrics are higher-is-better unless their name says loss (or perplexity, error); ``final_loss`` is lower."""
    name = metric.lower()
    return any(word in name for word in ("loss", "perplexity", "ppl", "error"))


def t_interval(xs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t interval of ``xs`` (the interval is the mean itself for one value)."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, mean, mean
    half = _T95[min(len(xs) - 2, len(_T95) - 1)] * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def noise_floor(values: Sequence[float]) -> NoiseFloor:
    """Spread of fp32 metric values over seeds (sample standard deviation)."""
    return NoiseFloor(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                      min=min(values), max=max(values), n=len(values))


def metric_value(arm: ArmResult, metric: str) -> float | None:
    """The arm's value of ``metric`` (``final_loss`` is the training loss); None when it has none."""
    return arm.final_loss if metric == FINAL_LOSS else arm.metrics.get(metric)


def worse_by(metric: str, value: float, baseline: float) -> float:
    """How much worse ``value`` is than ``baseline`` on ``metric`` (negative: better)."""
    return (value - baseline) if lower_is_better(metric) else (baseline - value)


@dataclass(frozen=True, config=RESULT_CONFIG)
class Gap:
    """One arm's difference to fp32 on one metric in one result: arm − fp32, mean over paired seeds.

    ``low``/``high`` bound the 95% t-interval of the paired differences (equal to ``delta`` for one seed).
    """

    delta: float
    low: float
    high: float
    seeds: int
    value: float
    baseline: float


def gap_to_fp32(result: AuditResult, arm: str, metric: str) -> Gap | None:
    """The arm's mean paired difference to fp32 (arm − fp32) over the seeds where both finished ``ok`` with a
    finite value; None when no such pair exists (the arm or fp32 did not finish, or lacks the metric)."""
    deltas, values, baselines = [], [], []
    for base_run, arm_run in zip(result.runs(BASELINE), result.runs(arm), strict=False):
        if base_run.status != OK or arm_run.status != OK:
            continue
        b, v = metric_value(base_run, metric), metric_value(arm_run, metric)
        if b is None or v is None or not (math.isfinite(b) and math.isfinite(v)):
            continue
        deltas.append(v - b)
        values.append(v)
        baselines.append(b)
    if not deltas:
        return None
    mean, low, high = t_interval(deltas)
    return Gap(delta=mean, low=low, high=high, seeds=len(deltas),
               value=sum(values) / len(values), baseline=sum(baselines) / len(baselines))


def fp32_noise(result: AuditResult, metric: str) -> NoiseFloor | None:
    """fp32's seed-to-seed spread of ``metric``: the gate's stored floor, else computed from the replicates."""
    stored = result.gate.noise_floor.get(metric)
    if stored is not None and stored.n >= 2:
        return stored
    return fp32_noise_of_runs(result.runs(BASELINE), metric)


def fp32_noise_of_runs(runs: Sequence[ArmResult], metric: str) -> NoiseFloor | None:
    """fp32's seed-to-seed spread of ``metric`` over ``runs`` (its runs with every seed); None with fewer than 2."""
    values = [v for run in runs if run.status == OK
              for v in [metric_value(run, metric)] if v is not None and math.isfinite(v)]
    return noise_floor(values) if len(values) >= 2 else None


def gap_within_noise(run: ArmResult, baseline: ArmResult, metric: str, noise: NoiseFloor, k: float) -> bool:
    """True when ``run`` is behind fp32 on ``metric`` by no more than k standard deviations of fp32's seed noise."""
    value, ref = metric_value(run, metric), metric_value(baseline, metric)
    if value is None or ref is None or not (math.isfinite(value) and math.isfinite(ref)):
        return False
    return worse_by(metric, value, ref) <= k * noise.std


def judged_metric(baseline: ArmResult) -> str:
    """The metric the ungated rule judges: the primary metric (first ``evaluate`` returned), else ``final_loss``."""
    return next(iter(baseline.metrics)) if baseline.metrics else FINAL_LOSS


def ungated_drop(run: ArmResult, baseline: ArmResult) -> str | None:
    """Without a gate: why ``run`` falls clearly behind fp32 (one sentence), or None when it does not.

    Judges the primary metric, or the final training loss for a task without ``evaluate``; a missing or
    non-finite value falls behind. The arm's status is not judged here.
    """
    metric = judged_metric(baseline)
    value, ref = metric_value(run, metric), metric_value(baseline, metric)
    if ref is None or not math.isfinite(ref):
        return None
    if value is None or not math.isfinite(value):
        return f"{metric} is {fmt(value)} where fp32 has {fmt(ref)}"
    if worse_by(metric, value, ref) > UNGATED_RELATIVE_DROP * abs(ref):
        return (f"{metric} {fmt(value)} vs fp32 {fmt(ref)} is more than {UNGATED_RELATIVE_DROP:.0%} worse "
                "(no gate given; set your own tolerance with --max-drop)")
    return None
