"""One vocabulary for every module: the baseline arm, statuses, severities, flag kinds, verdict levels.

Plain data (no torch), imported by both sides. Each set is a ``Literal`` type for the type checker and a tuple
of its values in a meaningful order (severities worst first), with a named constant per value, so a typo is a
NameError instead of a silently unmatched string.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

BASELINE: Final = "fp32"
"""The arm every other arm is compared with."""

Status = Literal["ok", "diverged", "failed", "interrupted", "skipped"]
"""How an arm's run ended. ``ok``: trained; ``diverged``: its loss became non-finite; ``failed``: it raised;
``interrupted``: stopped by a signal, its steps so far kept; ``skipped``: not run (a recipe this machine lacks)."""
OK: Final = "ok"
DIVERGED: Final = "diverged"
FAILED: Final = "failed"
INTERRUPTED: Final = "interrupted"
SKIPPED: Final = "skipped"
STATUSES: Final[tuple[Status, ...]] = get_args(Status)

Severity = Literal["error", "warning", "info"]
"""How bad a flag is: ``error`` will hurt training, ``warning`` is worth watching, ``info`` is for the record."""
ERROR: Final = "error"
WARNING: Final = "warning"
INFO: Final = "info"
SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
"""Worst first."""


def severity_rank(severity: str) -> int:
    """0 for ``error``, 1 for ``warning``, 2 for ``info``; unknown severities sort last."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


FlagKind = Literal[
    "nonfinite",
    "forward_overflow",
    "gradient_overflow",
    "gradient_underflow",
    "activation_underflow",
    "loss_scale",
    "precision_loss",
    "update_underflow",
    "fp8_underflow",
    "fp8_saturation",
]
"""What kind of numeric trouble a flag reports (see the README's flag table)."""
FLAG_KINDS: Final[tuple[FlagKind, ...]] = get_args(FlagKind)

VerdictLevel = Literal["baseline", "safe", "safe with changes", "not safe", "observed", "skipped"]
"""The one-line answer for an arm: the fp32 reference, safe as is, safe once a verified change is applied, or not;
``observed`` for a run mpaudit watched (:func:`mpaudit.watch`), which has no fp32 arm to be judged against;
``skipped`` for an arm this machine cannot run (its reason says why): nothing was measured, so nothing is judged."""
BASELINE_LEVEL: Final = "baseline"
OBSERVED_LEVEL: Final = "observed"
SAFE: Final = "safe"
SAFE_WITH_CHANGES: Final = "safe with changes"
NOT_SAFE: Final = "not safe"
SKIPPED_LEVEL: Final = "skipped"

SpeedVerdict = Literal["faster", "same", "slower"]
"""A speedup's verdict: its confidence interval lies above 1, contains 1 (same within noise), or lies below 1."""
SPEED_VERDICTS: Final[tuple[SpeedVerdict, ...]] = get_args(SpeedVerdict)

Outcome = Literal["regression", "improvement", "ok", "note"]
"""A compare check's outcome: worse beyond tolerance, better beyond it, within tolerance, or information."""
REGRESSION: Final = "regression"
IMPROVEMENT: Final = "improvement"
NOTE: Final = "note"
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

MetricDirection = Literal["min", "max", "unknown"]
"""Which way a metric improves: ``min`` (lower is better: loss, error, mae, ...), ``max`` (higher is better:
accuracy, f1, bleu, ...) or ``unknown`` (neither declared nor known by name: shown, never judged)."""
MIN: Final = "min"
MAX: Final = "max"
UNKNOWN: Final = "unknown"
METRIC_DIRECTIONS: Final[tuple[MetricDirection, ...]] = get_args(MetricDirection)

FP16_CPU_MODES: Final = ("emulate", "native")
"""How fp16 arms run on a CPU: ``emulate`` (default) computes matmuls and convolutions from fp16 inputs with fp32
accumulation and rounds to fp16, as a GPU tensor core does, at fp32 speed; ``native`` uses PyTorch's CPU half
kernels (~100x slower where the CPU has no fp16 units). On CUDA fp16 is always real."""

AutocastPolicy = Literal["cuda", "cpu"]
"""Whose autocast op lists a CPU arm follows: ``cuda`` (default: each op runs in the dtype CUDA autocast would give
it, so a CPU audit predicts GPU training) or ``cpu`` (``torch.autocast("cpu")``'s own lists, for CPU training)."""
AUTOCAST_POLICIES: Final[tuple[AutocastPolicy, ...]] = get_args(AutocastPolicy)

Fp16Mode = Literal["emulated", "native"]
"""How an fp16 arm actually ran (``arms.<name>.fp16_mode``)."""

Fp8Mode = Literal["emulated", "real"]
"""How a float8 arm's GEMMs ran (``arms.<name>.fp8_mode``): ``emulated`` (torchao's emulation: operands cast to
float8 with the recipe's scales, then a high-precision matmul of the dequantised values, on a CPU or a GPU without
float8 units) or ``real`` (torchao's float8 kernels on a GPU that has them)."""
