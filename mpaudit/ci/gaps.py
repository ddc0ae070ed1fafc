"""Gaps to fp32: the arithmetic the gate, the verdict, the recommendations, compare and every view share.

An arm's *gap* on a metric is arm − fp32, paired seed by seed and averaged (with a 95% t-interval when there are
several seeds). Whether a gap is worse depends on the metric's direction (:func:`metric_direction`): declared
(``--metric-direction``, the task's ``METRICS``), else recorded in the result (``metric_directions``), else read
from the metric's name (:func:`direction_by_name`), else unknown — and an unknown direction is never guessed:
a gate on it is a usage error, and without a gate it is shown but judged by nothing. Without a gate, an arm
"passes" when its primary metric — or, without metrics or when the primary metric's direction is unknown, its
final training loss — is at most :data:`UNGATED_RELATIVE_DROP` of fp32's value worse: :func:`ungated_drop` is
that one rule.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic.dataclasses import dataclass

from mpaudit.errors import UsageError
from mpaudit.results.codec import RESULT_CONFIG
from mpaudit.results.model import ArmResult, AuditResult, NoiseFloor
from mpaudit.text import fmt
from mpaudit.vocab import BASELINE, MAX, MIN, OK, UNKNOWN, MetricDirection

FINAL_LOSS = "final_loss"
"""Pseudo-metric: the mean training loss over the last steps (``ArmResult.final_loss``), lower is better."""

UNGATED_RELATIVE_DROP = 0.02
"""Without a gate, an arm whose primary metric (or final loss) is more than this fraction of fp32's value worse
than fp32's is "not safe". A gate (``--max-drop``) replaces this default with the user's own tolerance."""

# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); beyond that the normal 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


LOWER_IS_BETTER_WORDS: frozenset[str] = frozenset({
    # losses and errors
    "loss", "losses", "error", "errors", "err", "cost", "nll", "logloss", "xent", "crossentropy", "perplexity", "ppl",
    "kl", "kld", "divergence", "distance", "regret", "drop", "degradation", "mismatch",
    # regression errors
    "mae", "mse", "rmse", "msle", "rmsle", "mape", "smape", "mase", "wape", "medae", "mad", "huber",
    # speech, text and compression
    "wer", "cer", "ter", "bpc", "bpd", "bpb", "bits",
    # calibration and detection error rates
    "ece", "mce", "brier", "eer", "fpr", "fnr",
    # generative models
    "fid", "kid", "fvd", "lpips",
    # time
    "latency", "time", "runtime", "duration",
})
"""Words that make a metric lower-is-better (see :func:`direction_by_name`)."""

HIGHER_IS_BETTER_WORDS: frozenset[str] = frozenset({
    # classification
    "accuracy", "acc", "top1", "top5", "f1", "f2", "fbeta", "fscore", "f1score", "precision", "prec", "recall",
    "sensitivity", "specificity", "tpr", "tnr", "auc", "auroc", "auprc", "kappa", "mcc", "match", "success", "win",
    # ranking and detection
    "ap", "map", "mrr", "ndcg", "hit", "hits", "hitrate", "iou", "miou", "jaccard", "dice",
    # regression and correlation
    "r2", "rsquared", "pearson", "spearman", "kendall", "correlation", "corr",
    # text
    "bleu", "sacrebleu", "rouge", "meteor", "chrf", "cider", "bertscore",
    # images
    "psnr", "ssim", "msssim",
    # likelihoods, rewards, speed, and words that turn a lower-is-better quantity around
    "likelihood", "loglik", "elbo", "reward", "return", "throughput", "speedup", "gain", "improvement", "reduction",
})
"""Words that make a metric higher-is-better (see :func:`direction_by_name`)."""

LOSS_HEAD_WORDS: frozenset[str] = frozenset({"loss", "error", "err", "cost"})
"""A name whose last known word is one of these is a loss whatever precedes it (``dice_loss``, ``top1_err``)."""

NEGATING_WORDS: frozenset[str] = frozenset({"neg", "negative"})
"""Words that turn the direction around, as in scikit-learn's ``neg_mean_squared_error`` (higher is better)."""

_NON_ALNUM = re.compile(r"[^0-9A-Za-z]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _known_word(word: str) -> MetricDirection | None:
    """The direction one lowercased word gives (trailing digits ignored: ``bleu4``, ``ap50``), None when neutral."""
    for w in (word, word.rstrip("0123456789")):
        if w in LOWER_IS_BETTER_WORDS:
            return MIN
        if w in HIGHER_IS_BETTER_WORDS:
            return MAX
    return None


def name_words(metric: str) -> list[tuple[str, MetricDirection | None]]:
    """The words of a metric name with the direction each gives: the name is split on every character that is not
    a letter or digit, and a chunk that is not a known word on its own is split again at camelCase boundaries
    (``valLoss``: ``val``, ``loss``; ``mIoU`` stays ``miou``)."""
    out: list[tuple[str, MetricDirection | None]] = []
    for chunk in _NON_ALNUM.split(metric):
        if not chunk:
            continue
        whole = _known_word(chunk.lower())
        if whole is not None:
            out.append((chunk.lower(), whole))
            continue
        out.extend((piece.lower(), _known_word(piece.lower())) for piece in _CAMEL.split(chunk) if piece)
    return out


def direction_by_name(metric: str) -> MetricDirection:
    """What a metric's name says about its direction: ``min``, ``max`` or ``unknown``.

    Whole words only, never substrings (``wer`` is inside ``lower``, ``map`` inside ``heatmap``): words are looked
    up in :data:`LOWER_IS_BETTER_WORDS` and :data:`HIGHER_IS_BETTER_WORDS`; every other word (``eval``, ``val``,
    ``test``, ``top``, ``mean``, ``score``, digits, ...) says nothing. When the known words agree they decide
    (``eval_loss`` min, ``val_accuracy``, ``top-5 accuracy``, ``rouge_l``, ``bleu_4`` max). When they disagree
    the name is ``unknown`` unless its last known word is a loss (:data:`LOSS_HEAD_WORDS`: ``dice_loss``,
    ``accuracy_error`` are min). A negating word (``neg_mean_squared_error``) turns the result around. No known
    word: ``unknown``.
    """
    words = name_words(metric)
    known = [d for _, d in words if d is not None]
    if not known:
        return UNKNOWN
    if len(set(known)) == 1:
        found: MetricDirection = known[0]
    else:
        last = next(w for w, d in reversed(words) if d is not None)
        if last.rstrip("0123456789") not in LOSS_HEAD_WORDS:
            return UNKNOWN
        found = MIN
    if any(w in NEGATING_WORDS for w, _ in words):
        found = MAX if found == MIN else MIN
    return found


def metric_direction(metric: str, *stated: Mapping[str, str] | None) -> MetricDirection:
    """The direction of ``metric``: the first of ``stated`` (declared directions first, then those recorded in a
    result) that says ``min`` or ``max`` for it, else what its name says (:func:`direction_by_name`).
    ``final_loss`` (the training loss) is always ``min``."""
    if metric == FINAL_LOSS:
        return MIN
    for mapping in stated:
        value = (mapping or {}).get(metric)
        if value in (MIN, MAX):
            return MIN if value == MIN else MAX
    return direction_by_name(metric)


def result_direction(result: AuditResult, metric: str, declared: Mapping[str, str] | None = None) -> MetricDirection:
    """The direction of ``metric`` in ``result``: declared, else recorded in it (``metric_directions``), else by
    its name."""
    return metric_direction(metric, declared, result.metric_directions)


def lower_is_better(metric: str, *stated: Mapping[str, str] | None) -> bool | None:
    """True for a lower-is-better metric, False for a higher-is-better one, None when its direction is unknown
    (see :func:`metric_direction`)."""
    direction = metric_direction(metric, *stated)
    return None if direction == UNKNOWN else direction == MIN


def unknown_direction_message(metric: str, option: str = "--max-drop") -> str:
    """One sentence: ``metric`` is gated but nobody says which way is better, and how to say it."""
    return (f"{option} {metric}: mpaudit cannot tell whether higher or lower {metric!r} is better; declare it with "
            f"--metric-direction {metric}=min (or =max), or METRICS = {{{metric!r}: \"min\"}} in the task file.")


def parse_metric_directions(specs: Iterable[str]) -> dict[str, str]:
    """``["mae=min", "bleu=max"]`` -> ``{"mae": "min", "bleu": "max"}``; UsageError when malformed."""
    out: dict[str, str] = {}
    for spec in specs:
        metric, sep, value = spec.partition("=")
        metric, value = metric.strip(), value.strip().lower()
        if not sep or not metric or value not in (MIN, MAX):
            raise UsageError(f"--metric-direction {spec!r} is not of the form METRIC=min or METRIC=max "
                             "(min: lower is better, max: higher is better).")
        out[metric] = MIN if value == MIN else MAX
    return out


def check_declared_directions(declared: Any, where: str) -> dict[str, str]:
    """A declared ``{metric: "min" | "max"}`` mapping as it is, or UsageError naming ``where`` and the problem."""
    if not isinstance(declared, Mapping):
        raise UsageError(f"{where} must be a dict of metric name to \"min\" or \"max\", not {type(declared).__name__}.")
    for metric, value in declared.items():
        if not isinstance(metric, str) or value not in (MIN, MAX):
            raise UsageError(f"{where} must map each metric name to \"min\" (lower is better) or \"max\" (higher is "
                             f"better), but {metric!r} maps to {value!r}.")
    return dict(declared)


def directions_for(metrics: Iterable[str], *stated: Mapping[str, str] | None) -> dict[str, MetricDirection]:
    """Every metric's direction (``min``, ``max`` or ``unknown``), in the order given."""
    return {m: metric_direction(m, *stated) for m in dict.fromkeys(metrics)}


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


def worse_by(metric: str, value: float, baseline: float, *stated: Mapping[str, str] | None) -> float:
    """How much worse ``value`` is than ``baseline`` on ``metric`` (negative: better); UsageError when the metric's
    direction is unknown (:func:`metric_direction`)."""
    lower = lower_is_better(metric, *stated)
    if lower is None:
        raise UsageError(unknown_direction_message(metric))
    return (value - baseline) if lower else (baseline - value)


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


def gap_within_noise(run: ArmResult, baseline: ArmResult, metric: str, noise: NoiseFloor, k: float,
                     *stated: Mapping[str, str] | None) -> bool:
    """True when ``run`` is behind fp32 on ``metric`` by no more than k standard deviations of fp32's seed noise."""
    value, ref = metric_value(run, metric), metric_value(baseline, metric)
    if value is None or ref is None or not (math.isfinite(value) and math.isfinite(ref)):
        return False
    return worse_by(metric, value, ref, *stated) <= k * noise.std


def judged_metric(baseline: ArmResult, *stated: Mapping[str, str] | None) -> str:
    """The metric the ungated rule judges: the primary metric (first ``evaluate`` returned) when its direction is
    known (``stated``: declared, then recorded directions; else its name), else ``final_loss``."""
    if baseline.metrics:
        primary = next(iter(baseline.metrics))
        if metric_direction(primary, *stated) != UNKNOWN:
            return primary
    return FINAL_LOSS


def ungated_drop(run: ArmResult, baseline: ArmResult, *stated: Mapping[str, str] | None) -> str | None:
    """Without a gate: why ``run`` falls clearly behind fp32 (one sentence), or None when it does not.

    Judges the primary metric, or the final training loss for a task without ``evaluate`` or whose primary
    metric's direction is unknown (:func:`judged_metric`); a missing or non-finite value falls behind. The
    arm's status is not judged here.
    """
    metric = judged_metric(baseline, *stated)
    value, ref = metric_value(run, metric), metric_value(baseline, metric)
    if ref is None or not math.isfinite(ref):
        return None
    if value is None or not math.isfinite(value):
        return f"{metric} is {fmt(value)} where fp32 has {fmt(ref)}"
    if worse_by(metric, value, ref, *stated) > UNGATED_RELATIVE_DROP * abs(ref):
        return (f"{metric} {fmt(value)} vs fp32 {fmt(ref)} is more than {UNGATED_RELATIVE_DROP:.0%} worse "
                "(no gate given; set your own tolerance with --max-drop)")
    return None
