"""Rules: from each arm's trace and result to flags a person can act on (pure Python, no torch).

Every rule compares numbers against a named threshold of :class:`Thresholds` and says which layer, in
which arm, what kind of trouble, how bad (``error``: will hurt training; ``warning``: watch it; ``info``:
for the record), the numbers that fired it, and a concrete recommendation.

The fp32 arm is the reference. Its histograms are what a tensor *would* hold without rounding, so "what
would flush to zero in fp16 at the loss scale the fp16 arm used" is the fp32 histogram shifted by that
scale (:func:`mpaudit.numerics.formats.what_if`). In the fp16 arm itself flushed values are already zeros, so its
excess of exact zeros over the fp32 arm's is the observed confirmation. A prediction becomes an ``error``
only when the observation confirms it, and for gradients only when the flushed values are *significant*
(at or above the model's 1st-percentile gradient magnitude: rounding noise of a gradient that is zero in
exact arithmetic may flush harmlessly). Gradient values at the rounding-noise level (``noise_grad_ratio``)
count for nothing at all. An observation alone never fires, because arms drift apart during training and
zero fractions move a little for unrelated reasons. bf16 has fp32's exponent range, so the underflow and
overflow rules apply to fp16 arms only.

One rule measures the harm itself: ``update_underflow``, for arms that store their weights in half precision and
round updates to nearest (``bf16-pure``). Their sampled updates that left a weight unchanged are the updates that
were lost (beyond those that were zero in fp32 too); fp32's update histograms give the prediction beside it. Arms
with fp32 master weights (``bf16``, ``fp16``) cannot lose updates this way and never get the flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mpaudit.errors import UsageError
from mpaudit.numerics.formats import (
    BF16,
    FP16,
    HIST_BINS,
    HIST_MIN_EXP,
    Format,
    WhatIf,
    binade_percentile,
    update_lost,
    what_if,
)
from mpaudit.numerics.fp8 import FP8_FORMATS, GEMM_WORDS, Fp8Trace, GemmLoss
from mpaudit.numerics.layerstats import (
    ACTIVATION,
    GRAD_OUTPUT,
    GRAD_PREFIX,
    ROOT_LAYER,
    TensorStats,
    TraceSummary,
    is_gradient,
    is_update,
)
from mpaudit.results.model import ArmResult, Flag, Site
from mpaudit.vocab import BASELINE, ERROR, FLAG_KINDS, INFO, SEVERITIES, WARNING, FlagKind, Severity

OUTSIDE_MODEL = "(loss_fn)"
"""The layer name of ops that ran outside every module of the model (``mpaudit.trace.sites``)."""
_MATMULS = ("mm", "bmm", "matmul", "baddbmm", "addmm", "linear", "einsum", "scaled_dot_product")
"""Op names (substrings) of matrix products: an overflowing one that feeds a softmax is attention scores."""


@dataclass(frozen=True)
class Thresholds:
    """Every threshold a rule uses; override any by name with :meth:`from_mapping`.

    Fractions are of a tensor's nonzero finite values unless said otherwise.
    """

    gradient_underflow_error: float = 0.01
    """Fraction of a gradient's values that are significant (at or above the ``significant_quantile``
    magnitude) and flush in fp16 at the fp16 arm's loss scale (predicted from the fp32 arm) that is an
    error, when the fp16 arm's excess zeros confirm it: 1% of a layer's gradient signal silently gone."""
    gradient_underflow_warning: float = 0.001
    """Predicted gradient flush fraction worth a warning (and the excess-zero level that confirms an error)."""
    activation_underflow_error: float = 0.10
    """Predicted flush fraction of a layer's fp16 outputs that is an error when confirmed by excess zeros."""
    activation_underflow_warning: float = 0.01
    """Predicted activation flush fraction worth a warning (and the level that confirms an error)."""
    forward_headroom_binades: int = 3
    """Warn when a layer's largest |output| comes within 2^3 = 8x of fp16's max (65504 / 8 ≈ 8188)."""
    precision_loss_warning: float = 0.25
    """Fraction of a tensor landing in the subnormal range (fewer mantissa bits) worth a warning."""
    precision_loss_info: float = 0.05
    """Fraction landing subnormal recorded as info."""
    skip_fraction_warning: float = 0.05
    """Fraction of steps GradScaler skipped (after its initial calibration run) worth a warning."""
    skip_fraction_error: float = 0.25
    """Fraction of skipped steps that is an error: a quarter of the training is thrown away."""
    update_lost_error: float = 0.5
    """Measured share of a layer's sampled updates that left its half-precision weights unchanged (beyond the
    share fp32's updates left unchanged) that is an error: in an arm that stores its weights in bf16
    (``bf16-pure``), half the layer's steps round away, so the layer learns at a fraction of its rate (on the
    suites' fine-tuning workload at lr 2e-5: 95-100%, and the arm stalls). Arms with fp32 master weights never get
    this flag: their updates cannot round away."""
    update_lost_warning: float = 0.1
    """Measured lost share worth a warning: a tenth of the layer's steps round away (a lower learning rate, the tail
    of a cosine schedule or more steps make it worse)."""
    update_lost_info: float = 0.01
    """Measured lost share recorded as info."""
    fp8_underflow_error: float = 0.10
    """Share of one GEMM operand's nonzero values that its float8 cast flushes to zero (under the arm's scaling
    recipe, predicted by casting the fp32 arm's tensors with the recipe's own scales) that is an error when the
    float8 arm's own casts confirm it (at least ``fp8_underflow_warning``): a tenth of a layer's inputs, weights or
    gradients gone from its GEMM, typically because a few huge values set the scale of the whole tensor, row or
    block. Demoted to a warning when the arm trains as well as fp32 (or bf16) anyway."""
    fp8_underflow_warning: float = 0.01
    """Flushed share worth a warning (and the share the float8 arm's own casts must show to confirm an error)."""
    fp8_saturation_error: float = 0.01
    """Share of one GEMM operand's nonzero values that land beyond the float8 format's max after scaling (clamped to
    it) that is an error when confirmed by the arm's own casts. Dynamic tensorwise and rowwise scaling map the largest
    value to the max, so this needs a scale that lags the data (delayed or static scaling) or MX's floor-rounded
    block scales."""
    fp8_saturation_warning: float = 0.001
    """Saturated share worth a warning (and the level that confirms an error)."""
    significant_quantile: float = 0.01
    """The smallest *significant* gradient magnitude is this quantile (1st percentile) of the fp32 arm's
    nonzero gradient magnitudes over the whole model: the recommended loss scale lifts it to fp16's min
    subnormal, and only values at or above it count towards a gradient_underflow error."""
    scale_margin_binades: int = 2
    """The recommended loss scale sits this many binades above the smallest one that lifts the significant
    gradients clear of flushing (capped so the largest gradient stays below fp16's max)."""
    noise_grad_ratio: float = 2.0**-20
    """Gradient values (fp32 arm) below this fraction of their layer's largest gradient magnitude are rounding
    noise, e.g. attention's key bias or first query, zero in exact arithmetic: the underflow and precision_loss
    rules ignore them. fp32 sums err by ~2^-24 of their terms; 2^-20 leaves a few binades. Per layer, because
    rounding errors scale with the layer's own gradients: a model-wide maximum would hide a layer whose
    gradients are all small but real (Adam learns from them). An output gradient, not a sum over the batch,
    is measured against its own largest value only. 0 turns it off."""

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> Thresholds:
        """Defaults with ``overrides`` applied; an unknown name raises UsageError."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in known:
                raise UsageError(f"Unknown threshold {name!r}; the thresholds are: {', '.join(known)}.")
            kind = int if known[name].type in ("int", int) else float
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise UsageError(f"Threshold {name!r} must be a number, not {value!r}.") from None
        return cls(**values)


@dataclass(frozen=True)
class UpdateLoss:
    """How many of one layer's updates a half-weight arm lost: measured in the arm, predicted from fp32's updates.

    ``measured`` is the share of the arm's sampled updates that left the stored weight unchanged, beyond the share
    of fp32's updates that were exactly zero (an update that is zero in fp32 too, such as a parameter with no
    gradient under plain SGD, is not lost): ``(z_arm - z_fp32) / (1 - z_fp32)`` with ``z`` the zero fraction of the
    layer's ``update:*`` records. ``unchanged`` is the arm's raw zero fraction. ``predicted`` is
    :func:`~mpaudit.numerics.formats.update_lost` on fp32's update histograms in the arm's format (None without a
    traced fp32 arm): the share of fp32's updates below half an ulp of their weight.
    """

    layer: str
    measured: float
    unchanged: float
    predicted: float | None
    sampled: int


def update_losses(summary: TraceSummary, reference: TraceSummary | None, fmt: Format = BF16) -> dict[str, UpdateLoss]:
    """Per layer (forward order) with sampled updates in ``summary``: the :class:`UpdateLoss` of a half-weight arm,
    measured from its own update records, predicted from ``reference`` (the fp32 arm's trace)."""
    own: dict[str, list[TensorStats]] = {}
    for layer, role, stats in summary.items():
        if is_update(role) and stats.count:
            own.setdefault(layer, []).append(stats)
    out: dict[str, UpdateLoss] = {}
    for layer, records in own.items():
        count = sum(r.count for r in records)
        unchanged = sum(r.zeros for r in records) / count
        refs: list[TensorStats] = []
        for role in summary.roles(layer) if reference is not None else ():
            ref = reference.get(layer, role) if reference is not None and is_update(role) else None
            if ref is not None and ref.count:
                refs.append(ref)
        measured, predicted = unchanged, None
        if refs:
            z_ref = sum(r.zeros for r in refs) / sum(r.count for r in refs)
            measured = max(0.0, (unchanged - z_ref) / (1 - z_ref)) if z_ref < 1 else 0.0
            nonzero = sum(r.finite_nonzero for r in refs)
            predicted = sum(update_lost(r.hist, fmt) * r.finite_nonzero for r in refs) / nonzero if nonzero else 0.0
        out[layer] = UpdateLoss(layer=layer, measured=measured, unchanged=unchanged, predicted=predicted,
                                sampled=count)
    return out


def half_format(arm: str) -> Format | None:
    """The half-precision format an arm computes in (by its name: ``fp16*`` or ``bf16*``), None for fp32."""
    if arm.startswith("fp16"):
        return FP16
    if arm.startswith("bf16"):
        return BF16
    return None


@dataclass(frozen=True)
class ScaleAdvice:
    """The loss-scale range the fp32 arm's gradients allow: 2^k_low lifts the significant gradients
    (the ``significant_quantile``) clear of flushing, 2^k_high keeps the largest below fp16's max."""

    significant_binade: int
    max_abs: float
    k_low: int
    k_high: int | None
    k: int | None

    @property
    def fits(self) -> bool:
        return self.k is not None


def scale_advice(reference: TraceSummary, t: Thresholds, shift: int = 0) -> ScaleAdvice | None:
    """Loss-scale advice from the gradient histograms of ``reference`` (unscaled: ``shift`` undoes a
    scale already in them). None without nonzero gradients."""
    total = [0] * HIST_BINS
    max_abs = 0.0
    for _, role, s in reference.items():
        if is_gradient(role):
            total = [a + int(b) for a, b in zip(total, s.hist, strict=True)]
            if not math.isnan(s.max_abs):
                max_abs = max(max_abs, s.max_abs * 2.0**shift)
    low = binade_percentile(total, t.significant_quantile)
    if low is None:
        return None
    low += shift
    k_low = FP16.min_subnormal_exp - low
    k_high = math.floor(math.log2(FP16.max / max_abs)) if max_abs > 0 and math.isfinite(max_abs) else None
    if k_high is None:
        k = k_low + t.scale_margin_binades
    elif k_low <= k_high:
        k = min(k_high, k_low + t.scale_margin_binades)
    else:
        k = None
    return ScaleAdvice(significant_binade=low, max_abs=max_abs, k_low=k_low, k_high=k_high, k=k)


@dataclass
class _Flagger:
    summaries: dict[str, TraceSummary]
    arms: dict[str, ArmResult]
    t: Thresholds
    half_weights: frozenset[str] = frozenset()
    """Arms whose recipe stores the weights in half precision and rounds updates to nearest (``bf16-pure``): only
    they can lose updates to rounding, so only they get ``update_underflow`` flags, from their measured updates."""

    def __post_init__(self) -> None:
        self.flags: dict[tuple[str, str, str], Flag] = {}
        self.reference = self.summaries.get(BASELINE)
        self.layer_grad_max: dict[str, float] = {}
        for layer, role, s in self.reference.items() if self.reference is not None else ():
            if is_gradient(role) and math.isfinite(s.max_abs):
                self.layer_grad_max[layer] = max(self.layer_grad_max.get(layer, 0.0), s.max_abs)

    # -------------------------------------------------------------- helpers

    def add(self, flag: Flag) -> None:
        """Keep one flag per (arm, layer, kind): the most severe (first one wins a tie)."""
        key = (flag.arm, flag.layer, flag.kind)
        old = self.flags.get(key)
        if old is None or SEVERITIES.index(flag.severity) < SEVERITIES.index(old.severity):
            self.flags[key] = flag

    def scale_log2(self, arm: str) -> int:
        """log2 of the loss scale in force in ``arm`` at its traced steps (0 without loss scaling)."""
        summary = self.summaries.get(arm)
        k = summary.scale_log2 if summary is not None else None
        if k is None:
            result = self.arms.get(arm)
            history = result.loss_scale.history if result is not None and result.loss_scale else []
            finite = sorted(s for s in history if s > 0 and math.isfinite(s))
            k = math.floor(math.log2(finite[len(finite) // 2])) if finite else 0
        return k

    def ref_stats(self, layer: str, role: str) -> TensorStats | None:
        return self.reference.get(layer, role) if self.reference is not None else None

    def noise_binade(self, layer: str, role: str) -> int | None:
        """The fp32 arm's values of this gradient in binades below the returned one are rounding noise (below
        ``noise_grad_ratio`` of the reference magnitude); None for activations, updates, or when turned off."""
        if role == GRAD_OUTPUT:
            own = self.ref_stats(layer, role)
            largest = own.max_abs if own is not None and math.isfinite(own.max_abs) else 0.0
        elif role.startswith(GRAD_PREFIX):
            largest = self.layer_grad_max.get(layer, 0.0)
        else:
            return None
        if largest <= 0 or self.t.noise_grad_ratio <= 0:
            return None
        return math.floor(math.log2(largest) + math.log2(self.t.noise_grad_ratio))

    def keeps_fp32(self, arm: str, own: TensorStats | None) -> bool:
        """True when autocast kept this tensor in fp32 in ``arm`` (so no half-precision rounding applied)."""
        result = self.arms.get(arm)
        if result is not None and result.fp16_mode == "emulated":
            return False
        return own is not None and bool(own.dtype) and "float16" not in own.dtype and "bfloat16" not in own.dtype

    # -------------------------------------------------------------- rules

    def run(self) -> list[Flag]:
        advice = self.advice()
        for arm, result in self.arms.items():
            for site in result.sites:
                self.origin(arm, site)
        for arm, summary in self.summaries.items():
            fmt = half_format(arm)
            if fmt is FP16:
                self.forward_overflow(arm, summary)
                self.underflow(arm, summary, advice)
                self.gradient_overflow(arm, summary, advice)
            if fmt is not None:
                self.precision_loss(arm, summary, fmt)
                if arm in self.half_weights:
                    self.update_underflow(arm, summary, fmt)
            self.nonfinite(arm, summary)
        for arm in self.arms:
            if half_format(arm) is FP16:
                self.loss_scale(arm, advice)
            self.fp8_casts(arm)
        order = {name: i for i, name in enumerate(self.arms)}
        return sorted(
            self.flags.values(),
            key=lambda f: (SEVERITIES.index(f.severity), order.get(f.arm, len(order)), f.arm, FLAG_KINDS.index(f.kind)),
        )

    def advice(self) -> ScaleAdvice | None:
        if self.reference is not None:
            return scale_advice(self.reference, self.t)
        for arm, summary in self.summaries.items():
            if half_format(arm) is FP16:
                return scale_advice(summary, self.t, shift=-self.scale_log2(arm))
        return None

    def scale_recommendation(self, advice: ScaleAdvice | None, layer: str, in_force: int) -> str:
        if advice is None:
            return f"keep `{layer}` in fp32, or prefer bf16 (its range matches fp32)"
        if advice.k is not None and advice.k <= in_force:
            return (
                f"keep `{layer}` in fp32, or prefer bf16: the loss scale in force (2^{in_force}) suits the model's "
                f"gradients as a whole, but this layer's are far smaller"
            )
        if advice.k is not None:
            return (
                f"raise GradScaler init_scale to 2^{advice.k} (= {2.0**advice.k:.3g}): the smallest significant "
                f"gradients (1st percentile, ~2^{advice.significant_binade}) then clear fp16's 2^-24 while the "
                f"largest ({advice.max_abs:.3g}) stay below 65504; or prefer bf16"
            )
        return (
            f"no single loss scale fits: the 1st-percentile gradient (~2^{advice.significant_binade}) needs a scale "
            f">= 2^{advice.k_low}, the largest ({advice.max_abs:.3g}) allows <= 2^{advice.k_high}; prefer bf16, "
            f"or keep `{layer}` in fp32"
        )

    def origin(self, arm: str, site: Site) -> None:
        """Where the arm's non-finite values started, found by replaying the failing step (``site``)."""
        half = half_format(arm)
        overflow = "inf" in site.detail and site.dtype == "float16"
        backward = site.phase == "backward"
        kind: FlagKind = ("gradient_overflow" if backward else "forward_overflow") if overflow else "nonfinite"
        matmul = any(name in site.op for name in _MATMULS)
        softmax = any("softmax" in op for op in site.feeds)
        cast = "_to_copy" in site.op
        module = f"`{site.module}`"
        if site.module == OUTSIDE_MODEL:
            advice = "the loss itself is computed in half precision: compute it from fp32 values (e.g. logits.float())"
        elif half is None:
            advice = f"{module} produces NaN/Inf even in fp32: fix the model before mixing precision"
        elif cast and not backward:
            advice = (f"{module} receives values beyond fp16's 65504 that autocast casts to fp16 for it: normalise "
                      f"or rescale its inputs, or keep {module} in fp32")
        else:
            op = site.op.split(".")[1] if "." in site.op else site.op
            at = f" at {site.short_source}" if site.source else ""
            advice = f"keep {module} in fp32 ({op} in its own code{at} overflows), or prefer bf16"
            if matmul and softmax and not backward:
                advice += ("; or rescale the scores (not verified by training): scale q by 1/sqrt(d) before the "
                           "product, or use F.scaled_dot_product_attention, which does")
        severity: Severity = ERROR
        if backward:
            scale = self.arms[arm].loss_scale if arm in self.arms else None
            handled = scale is not None and site.step in scale.skipped_steps
            severity = INFO if handled else ERROR  # a skipped step is GradScaler doing its job (see loss_scale)
        self.add(
            Flag(
                layer=site.module,
                arm=arm,
                kind=kind,
                severity=severity,
                evidence={"step": site.step, "phase": site.phase, "op": site.op, "detail": site.detail,
                          "source": site.source, "code": site.code},
                recommendation=advice,
                rule=f"{kind}: the first op with finite inputs and a non-finite output ({site.phase}, replayed)",
                site=site,
            )
        )

    def forward_overflow(self, arm: str, summary: TraceSummary) -> None:
        """Outputs beyond fp16's max: inf in the forward pass, which no loss scale can fix."""
        warn_level = FP16.max / 2.0**self.t.forward_headroom_binades
        site = summary.first_nonfinite_forward
        layers = list(dict.fromkeys([*summary.layers, *(self.reference.layers if self.reference else ())]))
        for layer in layers:
            own, ref = summary.get(layer, ACTIVATION), self.ref_stats(layer, ACTIVATION)
            ref_max = ref.max_abs if ref is not None and not math.isnan(ref.max_abs) else 0.0
            own_max = own.max_abs if own is not None and not math.isnan(own.max_abs) else 0.0
            own_inf = (own.posinf + own.neginf) if own is not None else 0
            origin = site is not None and site.layer == layer and own_inf > 0
            largest = max(ref_max, own_max)
            if not origin and largest < warn_level:
                continue
            evidence: dict[str, Any] = {
                "fp32_max_abs": ref_max if ref is not None else None,
                "max_abs": own_max if own is not None else None,
                "inf_values": own_inf,
                "fp16_max": FP16.max,
                "warning_above": warn_level,
            }
            if ref is not None:
                evidence["fp32_overflow_fraction"] = what_if(ref.hist, FP16).overflow
            if origin and site is not None:
                evidence["first_inf_step"] = site.step
            if origin or largest > FP16.max:
                severity: Severity = ERROR
                if not origin and self.keeps_fp32(arm, own) and own_inf == 0:
                    severity = WARNING  # autocast kept this output in fp32; it overflows once cast to fp16
                rule = "activation max |x| > fp16 max" if not origin else "first non-finite output in forward order"
            else:
                severity, rule = WARNING, "activation max |x| within forward_headroom_binades of fp16 max"
            self.add(
                Flag(
                    layer=layer,
                    arm=arm,
                    kind="forward_overflow",
                    severity=severity,
                    evidence=evidence,
                    recommendation=(
                        f"keep `{layer}` in fp32 (and the ops that consume its output), or rescale it so its "
                        f"outputs stay below 65504 (largest seen: {largest:.3g}); or prefer bf16, whose range "
                        "matches fp32"
                    ),
                    rule=f"forward_overflow: {rule}",
                )
            )

    def underflow(self, arm: str, summary: TraceSummary, advice: ScaleAdvice | None) -> None:
        """Gradients (at the loss scale in force) and activations that flush to zero in fp16.

        For gradients the error counts only *significant* values, those at or above the model's
        ``significant_quantile`` gradient magnitude: rounding noise (e.g. the gradient of a bias feeding a
        normalisation, which is zero in exact arithmetic) may flush harmlessly, and no loss scale rescues it.
        Values below ``noise_grad_ratio`` of the layer's largest gradient (an output gradient: of its own)
        count for neither the error nor the warning.
        """
        if self.reference is None:
            self.observed_underflow(arm, summary, advice)
            return
        scale = self.scale_log2(arm)
        significant = advice.significant_binade if advice is not None else None
        worst: dict[tuple[str, FlagKind], tuple[float, float, float, str, int | None]] = {}
        for layer, role, ref in self.reference.items():
            own = summary.get(layer, role)
            if own is None or is_update(role):
                continue
            gradient = is_gradient(role)
            if not gradient and self.keeps_fp32(arm, own):
                continue  # autocast computed this output in fp32: nothing was rounded to fp16
            noise = self.noise_binade(layer, role)
            predicted = _what_if_from(ref, FP16, scale if gradient else 0, noise).flush
            serious = _what_if_from(ref, FP16, scale, _higher(significant, noise)).flush if gradient else predicted
            observed = _excess_zeros(own, ref)
            kind: FlagKind = "gradient_underflow" if gradient else "activation_underflow"
            key = (layer, kind)
            if key not in worst or (serious, predicted) > worst[key][:2]:
                worst[key] = (serious, predicted, observed, role, noise)
        for (layer, kind), (serious, predicted, observed, role, noise) in worst.items():
            gradient = kind == "gradient_underflow"
            err, warn = (
                (self.t.gradient_underflow_error, self.t.gradient_underflow_warning)
                if gradient
                else (self.t.activation_underflow_error, self.t.activation_underflow_warning)
            )
            if predicted < warn:
                continue
            confirmed = serious >= err and observed >= warn
            severity: Severity = ERROR if confirmed else WARNING
            name = kind.split("_")[0]
            evidence: dict[str, Any] = {
                "role": role,
                "predicted_flush_fraction": predicted,
                "observed_excess_zero_fraction": observed,
                "error_at": err,
                "warning_at": warn,
            }
            if gradient:
                evidence |= {
                    "significant_flush_fraction": serious,
                    "significant_binade": significant,
                    "noise_binade": noise,
                }
                evidence["loss_scale"] = 2.0**scale
                recommendation = self.scale_recommendation(advice, layer, scale)
            else:
                recommendation = (
                    f"keep `{layer}` in fp32 (its outputs fall below fp16's smallest subnormal 2^-24), "
                    "rescale them, or prefer bf16"
                )
            what = "significant gradients" if gradient else "outputs"
            self.add(
                Flag(
                    layer=layer,
                    arm=arm,
                    kind=kind,
                    severity=severity,
                    evidence=evidence,
                    recommendation=recommendation,
                    rule=(
                        f"{kind}: fp32 {what}, at the fp16 arm's scale, flush in fp16 (>= {name}_underflow_error), "
                        f"confirmed by the fp16 arm's excess zeros (>= {name}_underflow_warning)"
                        if confirmed
                        else f"{kind}: predicted flush fraction >= {name}_underflow_warning"
                    ),
                )
            )

    def observed_underflow(self, arm: str, summary: TraceSummary, advice: ScaleAdvice | None) -> None:
        """Gradient underflow seen in an fp16 run without an fp32 reference (an observed run, ``mpaudit.watch``).

        Flushed values are zeros there, indistinguishable from true zeros, so nothing can be confirmed: when a
        large share (``precision_loss_warning``) of a layer's surviving gradient values sits in fp16's subnormal
        range at the scale in force, the distribution's lower tail below 2^-24 is being cut off. A warning, never an
        error; the ``loss_scale`` advice it brings is read from the arm's own (surviving) gradients, so it is a lower
        bound on the scale that helps."""
        scale = self.scale_log2(arm)
        worst: dict[str, tuple[float, str, TensorStats]] = {}
        for layer, role, own in summary.items():
            if not is_gradient(role) or not own.finite_nonzero:
                continue
            w = what_if(own.hist, FP16)
            share = w.subnormal + w.flush
            if share >= self.t.precision_loss_warning and share > worst.get(layer, (0.0, "", own))[0]:
                worst[layer] = (share, role, own)
        for layer, (share, role, own) in worst.items():
            self.add(
                Flag(
                    layer=layer,
                    arm=arm,
                    kind="gradient_underflow",
                    severity=WARNING,
                    evidence={
                        "role": role,
                        "subnormal_fraction": share,
                        "zero_fraction": own.zero_fraction,
                        "loss_scale": 2.0**scale,
                        "observed": True,
                        "warning_at": self.t.precision_loss_warning,
                    },
                    recommendation=self.scale_recommendation(advice, layer, scale),
                    rule="gradient_underflow (no fp32 reference): share of surviving gradients in fp16's subnormal "
                         "range >= precision_loss_warning",
                )
            )

    def gradient_overflow(self, arm: str, summary: TraceSummary, advice: ScaleAdvice | None) -> None:
        """Gradients beyond fp16's max even unscaled: GradScaler must go below 1 and small gradients pay."""
        if self.reference is None:
            return
        for layer, role, ref in self.reference.items():
            if not is_gradient(role) or math.isnan(ref.max_abs) or ref.max_abs <= FP16.max:
                continue
            no_fit = advice is not None and not advice.fits
            self.add(
                Flag(
                    layer=layer,
                    arm=arm,
                    kind="gradient_overflow",
                    severity=ERROR if no_fit else WARNING,
                    evidence={"role": role, "fp32_max_abs": ref.max_abs, "fp16_max": FP16.max},
                    recommendation=(
                        f"keep `{layer}` in fp32 or prefer bf16: its gradients exceed fp16's range before any "
                        "loss scaling"
                    ),
                    rule="gradient_overflow: fp32 gradient max |x| > fp16 max"
                    + ("; no loss scale fits the gradient range" if no_fit else ""),
                )
            )

    def precision_loss(self, arm: str, summary: TraceSummary, fmt: Format) -> None:
        """Values landing in the subnormal range keep fewer mantissa bits."""
        scale = self.scale_log2(arm)
        for layer, role, own in summary.items():
            if is_update(role) or (not is_gradient(role) and self.keeps_fp32(arm, own)):
                continue
            underflow = "gradient_underflow" if is_gradient(role) else "activation_underflow"
            if (arm, layer, underflow) in self.flags:
                continue  # the underflow flag already tells the story
            ref = self.ref_stats(layer, role)
            if ref is not None:
                shift = scale if is_gradient(role) else 0
                fraction = _what_if_from(ref, fmt, shift, self.noise_binade(layer, role)).subnormal
            else:
                fraction = what_if(own.hist, fmt).subnormal
            if fraction < self.t.precision_loss_info:
                continue
            severity: Severity = WARNING if fraction >= self.t.precision_loss_warning else INFO
            self.add(
                Flag(
                    layer=layer,
                    arm=arm,
                    kind="precision_loss",
                    severity=severity,
                    evidence={
                        "role": role,
                        "subnormal_fraction": fraction,
                        "format": fmt.name,
                        "warning_at": self.t.precision_loss_warning,
                        "info_at": self.t.precision_loss_info,
                    },
                    recommendation=(
                        f"raise the loss scale, keep `{layer}` in fp32, or prefer bf16"
                        if is_gradient(role) and fmt is FP16
                        else f"keep `{layer}` in fp32 if its small values matter, or prefer bf16"
                        if fmt is FP16
                        else f"keep `{layer}` in fp32 if its tiny values matter"
                    ),
                    rule=f"precision_loss: subnormal fraction >= precision_loss_{severity}",
                )
            )

    def update_underflow(self, arm: str, summary: TraceSummary, fmt: Format) -> None:
        """Updates that left a half-precision weight unchanged, measured in an arm that stores its weights in
        ``fmt`` (its update records' zeros beyond fp32's), with fp32's prediction beside them in the evidence."""
        for layer, loss in update_losses(summary, self.reference, fmt).items():
            if loss.measured < self.t.update_lost_info:
                continue
            severity: Severity = (ERROR if loss.measured >= self.t.update_lost_error
                                  else WARNING if loss.measured >= self.t.update_lost_warning else INFO)
            predicted = "" if loss.predicted is None else f"; fp32's updates predict {loss.predicted:.0%}"
            self.add(
                Flag(
                    layer=layer,
                    arm=arm,
                    kind="update_underflow",
                    severity=severity,
                    evidence={
                        "measured_lost_fraction": loss.measured,
                        "unchanged_fraction": loss.unchanged,
                        "predicted_lost_fraction": loss.predicted,
                        "format": fmt.name,
                        "updates_sampled": loss.sampled,
                        "error_at": self.t.update_lost_error,
                        "warning_at": self.t.update_lost_warning,
                        "info_at": self.t.update_lost_info,
                    },
                    recommendation=(
                        f"{loss.measured:.0%} of `{layer}`'s sampled updates left its {fmt.name} weights unchanged"
                        f"{predicted}: round its updates stochastically or with Kahan compensation, or keep an fp32 "
                        f"master copy of it (mpaudit.bf16_optimizer; --verify trains each)"
                    ),
                    rule=(f"update_underflow: measured share of updates below half an ulp of the {fmt.name} weight "
                          f">= update_lost_{severity}"),
                )
            )

    def nonfinite(self, arm: str, summary: TraceSummary) -> None:
        """The first module whose output / gradient turned NaN or Inf."""
        result = self.arms.get(arm)
        skipped = set(result.loss_scale.skipped_steps) if result is not None and result.loss_scale else set()
        site = summary.first_nonfinite_forward
        if site is not None and (arm, site.layer, "forward_overflow") not in self.flags:
            s = summary.get(site.layer, site.role)
            self.add(
                Flag(
                    layer=site.layer,
                    arm=arm,
                    kind="nonfinite",
                    severity=ERROR,
                    evidence={"step": site.step, "role": site.role, **_nonfinite_counts(s)},
                    recommendation=(
                        f"`{site.layer}` is the first layer (forward order) whose output became NaN/Inf: "
                        f"keep it in fp32{' or prefer bf16' if half_format(arm) is FP16 else ''}"
                        if half_format(arm) is not None
                        else f"`{site.layer}` produces NaN/Inf even in fp32: fix the model before mixing precision"
                    ),
                    rule="nonfinite: first non-finite output in forward order",
                )
            )
        site = summary.first_nonfinite_backward
        if site is not None:
            s = summary.get(site.layer, site.role)
            handled = site.step in skipped
            self.add(
                Flag(
                    layer=site.layer,
                    arm=arm,
                    kind="nonfinite",
                    severity=INFO if handled else ERROR,
                    evidence={"step": site.step, "role": site.role, "step_skipped": handled, **_nonfinite_counts(s)},
                    recommendation=(
                        "none needed: GradScaler skipped that step and lowered its scale, as designed"
                        if handled
                        else f"`{site.layer}` is the first layer (backward order) whose gradient became NaN/Inf: "
                        f"keep it in fp32, lower the learning rate, or clip gradients"
                    ),
                    rule="nonfinite: first non-finite gradient in backward order"
                    + (" (on a step GradScaler skipped)" if handled else ""),
                )
            )

    def loss_scale(self, arm: str, advice: ScaleAdvice | None) -> None:
        """GradScaler skipping too many steps, or a scale that leaves gradients flushing."""
        result = self.arms.get(arm)
        if result is None or result.loss_scale is None:
            return
        steps = max(result.steps, len(result.loss_scale.history), 1)
        skipped = sorted(result.loss_scale.skipped_steps)
        calibration = 0
        while calibration < len(skipped) and skipped[calibration] == calibration:
            calibration += 1
        if calibration >= steps:
            calibration = 0  # never a good step: not a calibration, a scaler that cannot find any scale
        later = len(skipped) - calibration
        fraction = later / steps
        if fraction >= self.t.skip_fraction_warning:
            severity: Severity = ERROR if fraction >= self.t.skip_fraction_error else WARNING
            self.add(
                Flag(
                    layer=ROOT_LAYER,
                    arm=arm,
                    kind="loss_scale",
                    severity=severity,
                    evidence={
                        "skipped_steps": len(skipped),
                        "calibration_skips": calibration,
                        "skip_fraction": fraction,
                        "steps": steps,
                        "error_at": self.t.skip_fraction_error,
                        "warning_at": self.t.skip_fraction_warning,
                    },
                    recommendation=(
                        "find the layer whose gradients overflow (see gradient_overflow / nonfinite flags) and keep "
                        "it in fp32, or prefer bf16"
                    ),
                    rule=f"loss_scale: skipped-step fraction >= skip_fraction_{severity}",
                )
            )
        underflows = [f for f in self.flags.values() if f.arm == arm and f.kind == "gradient_underflow"]
        in_force = self.scale_log2(arm)
        if underflows and advice is not None and (advice.k is None or advice.k > in_force):
            worst_severity = min((f.severity for f in underflows), key=SEVERITIES.index)
            self.add(
                Flag(
                    layer=ROOT_LAYER,
                    arm=arm,
                    kind="loss_scale",
                    severity=worst_severity,
                    evidence={
                        "loss_scale": 2.0**in_force,
                        "recommended_log2": advice.k,
                        "min_log2": advice.k_low,
                        "max_log2": advice.k_high,
                        "significant_binade": advice.significant_binade,
                        "gradient_max_abs": advice.max_abs,
                        "underflowing_layers": sorted(f.layer for f in underflows),
                        "significant_quantile": self.t.significant_quantile,
                        "scale_margin_binades": self.t.scale_margin_binades,
                    },
                    recommendation=self.scale_recommendation(advice, underflows[0].layer, in_force),
                    rule="loss_scale: gradients flush at the scale in force (significant_quantile)",
                )
            )


    def fp8_casts(self, arm: str) -> None:
        """Float8 casts that flush or saturate a GEMM operand of a float8 arm's Linear layer: predicted by casting the
        fp32 arm's tensors under the arm's recipe, confirmed by the arm's own casts (both in ``fp8_casts``)."""
        result = self.arms.get(arm)
        recipe = result.fp8_recipe if result is not None else None
        if result is None or recipe is None or result.status == "skipped":
            return
        base = self.arms.get(BASELINE)
        reference = base.fp8_casts if base is not None else None
        predicted = reference.losses(recipe) if reference is not None else {}
        measured = result.fp8_casts.losses(recipe) if result.fp8_casts is not None else {}
        converted = set(result.fp8_layers)
        layers = [lay for lay in dict.fromkeys([*predicted, *measured]) if not converted or lay in converted]
        for layer in layers:
            for kind in ("fp8_underflow", "fp8_saturation"):
                self._fp8_flag(arm, recipe, layer, kind, predicted.get(layer, {}), measured.get(layer, {}),
                               reference, reference is not None)

    def _fp8_flag(self, arm: str, recipe: str, layer: str, kind: FlagKind, predicted: Mapping[str, GemmLoss],
                  measured: Mapping[str, GemmLoss], reference: Fp8Trace | None, has_reference: bool) -> None:
        flush = kind == "fp8_underflow"
        err, warn = ((self.t.fp8_underflow_error, self.t.fp8_underflow_warning) if flush
                     else (self.t.fp8_saturation_error, self.t.fp8_saturation_warning))

        def share(loss: GemmLoss | None) -> float | None:
            return None if loss is None else loss.flush if flush else loss.saturation

        source = predicted if has_reference else measured
        ranked = sorted(source, key=lambda g: -(share(source[g]) or 0.0))
        if not ranked:
            return
        gemm = ranked[0]
        top = share(source[gemm]) or 0.0
        if top < warn:
            return
        p, m = share(predicted.get(gemm)), share(measured.get(gemm))
        confirmed = p is not None and m is not None and p >= err and m >= warn
        severity: Severity = ERROR if confirmed else WARNING
        loss = source[gemm]
        stats = loss.operands[loss.operand]
        fmt = FP8_FORMATS[stats.format]

        def by_gemm(losses: Mapping[str, GemmLoss]) -> dict[str, dict[str, float]]:
            return {g: {op: (s.flush_fraction if flush else s.saturation_fraction) for op, s in gl.operands.items()}
                    for g, gl in losses.items()}

        alternatives: dict[str, dict[str, float]] = {}
        for other in reference.recipes if reference is not None else []:
            if other != recipe:
                losses = reference.losses(other).get(layer, {}) if reference is not None else {}
                alternatives[other] = {g: (gl.flush if flush else gl.saturation) for g, gl in losses.items()}
        evidence: dict[str, Any] = {
            "recipe": recipe,
            "gemm": gemm,
            "operand": loss.operand,
            "format": stats.format,
            "predicted_flush_fraction" if flush else "predicted_saturation_fraction": p,
            "measured_flush_fraction" if flush else "measured_saturation_fraction": m,
            "amax": stats.amax,
            "scale_log2": [stats.scale_log2_min, stats.scale_log2_max],
            "predicted": by_gemm(predicted),
            "measured": by_gemm(measured),
            "other_recipes": alternatives,
            "error_at": err,
            "warning_at": warn,
        }
        what = "flush to zero" if flush else "saturate at the format's max"
        edge = (f"below {fmt.name}'s smallest subnormal 2^{fmt.min_subnormal_exp} after scaling" if flush
                else f"above {fmt.name}'s max {fmt.max:g} after scaling")
        advice = (f"keep `{layer}` out of float8 (module_filter_fn / filter_fqns): {top:.0%} of its "
                  f"{loss.operand.replace('_', ' ')} values {what} in the {GEMM_WORDS[gemm]} under {recipe} scaling "
                  f"({edge}; largest |{loss.operand.replace('_', ' ')}| {stats.amax:.3g})")
        better = [r for r, g in alternatives.items() if g and max(g.values()) < warn]
        if better:
            advice += f"; {better[0]} scaling predicts none for this layer"
        elif flush:
            advice += "; or clip or normalise the outlying values before this layer"
        basis = "fp32's tensors cast under the recipe" if has_reference else "the arm's own casts (no fp32 reference)"
        self.add(
            Flag(
                layer=layer,
                arm=arm,
                kind=kind,
                severity=severity,
                evidence=evidence,
                recommendation=advice,
                rule=(f"{kind}: {basis} {what} >= {kind}_error, confirmed by the float8 arm's own casts "
                      f"(>= {kind}_warning)" if confirmed else f"{kind}: {basis} {what} >= {kind}_warning"),
            )
        )


def _what_if_from(ref: TensorStats, fmt: Format, scale_log2: int, binade: int | None) -> WhatIf:
    """:func:`what_if` in ``fmt`` at ``2**scale_log2`` counting only ``ref``'s values in binades >= ``binade``
    (unscaled; None: every value), as fractions of all of ``ref``'s nonzero values."""
    if binade is None:
        return what_if(ref.hist, fmt, scale_log2)
    total = ref.finite_nonzero
    if not total:
        return WhatIf(0.0, 0.0, 0.0)
    hist = ref.hist.copy()
    hist[: max(0, binade - HIST_MIN_EXP)] = 0
    w, share = what_if(hist, fmt, scale_log2), int(hist.sum()) / total
    return WhatIf(flush=w.flush * share, subnormal=w.subnormal * share, overflow=w.overflow * share)


def _higher(a: int | None, b: int | None) -> int | None:
    """The higher of two optional binades (None when both are)."""
    return b if a is None else a if b is None else max(a, b)


def _excess_zeros(own: TensorStats, ref: TensorStats) -> float:
    """How much more of ``own`` is exactly zero than of ``ref``, as a fraction of ``ref``'s nonzero values."""
    if not own.count or not ref.count:
        return 0.0
    z_own, z_ref = own.zeros / own.count, ref.zeros / ref.count
    if z_ref >= 1:
        return 0.0
    return max(0.0, (z_own - z_ref) / (1 - z_ref))


def _nonfinite_counts(s: TensorStats | None) -> dict[str, int]:
    if s is None:
        return {}
    return {"nan": s.nan, "posinf": s.posinf, "neginf": s.neginf, "count": s.count}


def flag(
    summaries: Mapping[str, TraceSummary],
    arms: Mapping[str, ArmResult],
    thresholds: Thresholds | None = None,
    half_weights: frozenset[str] = frozenset(),
) -> list[Flag]:
    """Every flag the traces and arm results support, most severe first.

    ``summaries`` maps arm name to its trace (the fp32 arm's is the reference for predictions); ``arms``
    gives each arm's status, GradScaler history and the sites where non-finite values started;
    ``half_weights`` names the arms whose recipe stores weights in half precision and rounds updates to nearest
    (:attr:`mpaudit.arms.Arm.rounds_updates_to_nearest`: the only ones whose updates can be lost to rounding; their
    ``update_underflow`` flags come from the updates they measured, fp32's prediction beside). Causes and
    consequences are linked by :func:`mpaudit.numerics.causes.link`.
    """
    return _Flagger(dict(summaries), dict(arms), thresholds or Thresholds(), half_weights).run()
