"""Recommendations that are proven before they are given: each is trained as an extra arm and checked.

For every mixed-precision arm that does not pass (the user's gate, or without one: status ok and the
primary metric within :data:`~mpaudit.ci.verdict.UNGATED_RELATIVE_DROP` of fp32), two changes are tried:

* a loss scale: the ``init_scale`` 2^k the rules already computed from fp32's gradient histograms
  (``loss_scale`` flag, ``recommended_log2``), for arms with a GradScaler;
* the smallest keep-list: layers ranked by evidence (error flags first, then the arm's non-finite and
  overflowing outputs, then the per-layer error the arm's precision introduces), added one at a time until
  the arm passes, then each removed again while it still passes.

Every try is a full training run (same seed, same batches, same evaluation), bounded by a budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mpaudit.arms import Arm
from mpaudit.ci.gaps import ungated_drop
from mpaudit.ci.gate import Limit, evaluate_gate
from mpaudit.defaults import DEFAULT_VERIFY_BUDGET
from mpaudit.numerics.formats import FP16, what_if
from mpaudit.numerics.layerstats import ACTIVATION, ROOT_LAYER, TraceSummary
from mpaudit.results.model import ArmResult, Flag, Recommendation
from mpaudit.vocab import BASELINE, OK, severity_rank

MAX_KEEP_CANDIDATES = 8
"""At most this many top-ranked layers are tried in a keep-list; beyond that, bf16 is the better advice."""

KEEP_KINDS = ("forward_overflow", "nonfinite", "activation_underflow", "gradient_overflow", "gradient_underflow",
              "precision_loss")
"""Flag kinds whose layer a keep-list can help, strongest evidence first."""


Trainer = Callable[[Arm], ArmResult]


@dataclass(frozen=True)
class Criteria:
    """What "passes" means: the user's gate, or without one the ungated tolerance against fp32."""

    baseline: ArmResult
    max_drop: Mapping[str, Limit] = field(default_factory=dict)
    max_loss_gap: float | None = None
    baseline_replicates: Sequence[ArmResult] = ()
    noise_k: float = 3.0
    directions: Mapping[str, str] = field(default_factory=dict)
    """Each metric's direction (``min``/``max``), as the result records it."""

    @property
    def gated(self) -> bool:
        return bool(self.max_drop) or self.max_loss_gap is not None

    def passes(self, run: ArmResult) -> bool:
        """True when ``run`` trains as well as fp32 under these criteria."""
        if run.status != OK:
            return False
        if self.gated:
            base = self.baseline
            arms = {BASELINE: base, run.name: run}
            replicates = {BASELINE: list(self.baseline_replicates)} if self.baseline_replicates else None
            gate = evaluate_gate(arms, self.max_drop, self.max_loss_gap, replicates, self.noise_k, self.directions)
            return gate.passed
        return ungated_ok(run, self.baseline, self.directions)


def ungated_ok(run: ArmResult, baseline: ArmResult, directions: Mapping[str, str] | None = None) -> bool:
    """Without a gate: the run finished ``ok`` and does not fall clearly behind fp32
    (:func:`~mpaudit.ci.gaps.ungated_drop`, the rule the verdict uses too)."""
    return run.status == OK and ungated_drop(run, baseline, directions) is None


def rank_layers(
    arm: str, flags: Sequence[Flag], trace: TraceSummary | None, reference: TraceSummary | None,
    layer_error_db: Mapping[str, float] | None = None,
) -> list[str]:
    """Layers of ``arm`` most likely to need fp32, best evidence first: flagged layers (error before
    warning, by kind), then layers whose outputs went non-finite or overflow fp16, then the layers whose
    own error (SQNR, dB: lower is worse) is the largest."""
    score: dict[str, tuple[float, ...]] = {}
    order = {layer: i for i, layer in enumerate(trace.layers if trace is not None else ())}

    def offer(layer: str, key: tuple[float, ...]) -> None:
        if layer and layer != ROOT_LAYER and (layer not in score or key < score[layer]):
            score[layer] = key

    for f in flags:
        if f.arm == arm and f.kind in KEEP_KINDS:
            offer(f.layer, (0, severity_rank(f.severity), KEEP_KINDS.index(f.kind),
                            0 if "first_inf_step" in f.evidence else 1, order.get(f.layer, len(order))))
    if trace is not None:
        for layer in trace.layers:
            own = trace.get(layer, ACTIVATION)
            ref = reference.get(layer, ACTIVATION) if reference is not None else None
            overflow = what_if(ref.hist, FP16).overflow if ref is not None and half_is_fp16(arm) else 0.0
            bad = own.nonfinite if own is not None else 0
            if bad or overflow > 0:
                offer(layer, (1, -float(bad), -overflow, order.get(layer, len(order))))
    for layer, db in (layer_error_db or {}).items():
        if math.isfinite(db):
            offer(layer, (2, db))
        else:
            offer(layer, (1, -math.inf))  # the layer itself produced non-finite values
    return sorted(score, key=lambda layer: score[layer])[:MAX_KEEP_CANDIDATES]


def half_is_fp16(arm: str) -> bool:
    """True for fp16 arms (the only format whose range fp32 values can overflow)."""
    return arm.startswith("fp16")


def recommended_init_scale(arm: str, flags: Sequence[Flag]) -> float | None:
    """The GradScaler init_scale the rules recommend for ``arm`` (``loss_scale`` flag, ``recommended_log2``)."""
    for f in flags:
        k = f.evidence.get("recommended_log2")
        if f.arm == arm and f.kind == "loss_scale" and k is not None:
            return float(2.0 ** int(k))
    return None


@dataclass
class _Search:
    """One arm's search: every try costs a run from the shared budget; results are cached by change."""

    arm: Arm
    criteria: Criteria
    train: Trainer
    budget: list[int]  # one shared counter, [runs left], across arms
    runs_used: int = 0
    tried: dict[tuple[tuple[str, ...], float | None], ArmResult] = field(default_factory=dict)

    def run(self, keep: Sequence[str], init_scale: float | None) -> ArmResult | None:
        key = (tuple(keep), init_scale)
        if key not in self.tried:
            if self.budget[0] <= 0:
                return None
            self.budget[0] -= 1
            self.runs_used += 1
            self.tried[key] = self.train(self.arm.with_changes(keep, init_scale))
        return self.tried[key]

    def passes(self, keep: Sequence[str], init_scale: float | None) -> bool | None:
        run = self.run(keep, init_scale)
        return None if run is None else self.criteria.passes(run)

    def smallest_keep_list(self, ranked: Sequence[str]) -> tuple[list[str], bool, bool]:
        """Add ranked layers until the arm passes, then drop each one it still passes without.
        Returns (keep-list, passed, budget ran out)."""
        keep: list[str] = []
        passed = False
        for layer in ranked:
            keep.append(layer)
            ok = self.passes(keep, None)
            if ok is None:
                keep.pop()
                return keep, False, True
            if ok:
                passed = True
                break
        if not passed:
            return keep, False, False
        for layer in list(keep):
            if len(keep) == 1:
                break
            trial = [x for x in keep if x != layer]
            ok = self.passes(trial, None)
            if ok is None:
                return keep, True, True
            if ok:
                keep = trial
        return keep, True, False


def recommend(
    arms: Sequence[Arm],
    results: Mapping[str, ArmResult],
    flags: Sequence[Flag],
    criteria: Criteria,
    train: Trainer,
    budget: int = DEFAULT_VERIFY_BUDGET,
    layer_error_db: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[Recommendation], dict[str, ArmResult]]:
    """Recommendations for every arm that does not pass ``criteria``, each verified by training.

    ``train`` trains one arm with the audit's seed, batches and evaluation; ``layer_error_db`` (arm ->
    layer -> SQNR in dB) refines the keep-list ranking. Returns the recommendations and the verified extra
    arms' results (named like ``fp16+keep``); a model whose arms all pass gets neither.
    """
    left = [budget]
    recs: list[Recommendation] = []
    verification: dict[str, ArmResult] = {}
    reference = results[BASELINE].trace if BASELINE in results else None
    for arm in arms:
        result = results.get(arm.name)
        if arm.is_baseline or result is None or criteria.passes(result):
            continue
        search = _Search(arm, criteria, train, left)
        scale = recommended_init_scale(arm.name, flags) if arm.grad_scaler else None
        if scale is not None:
            ok = search.passes((), scale)
            rec = _record(search, arm, [], scale, ok)
            recs.append(rec)
            if rec.verified_arm is not None:
                verification[rec.verified_arm] = search.tried[((), scale)]
            if ok:
                continue
        ranked = rank_layers(arm.name, flags, result.trace, reference, (layer_error_db or {}).get(arm.name))
        if not ranked:
            recs.append(Recommendation(
                arm=arm.name, keep_fp32=[], init_scale=None, verified_arm=None, passed=False, metrics={},
                runs_used=0, reason="no layer evidence to build a keep-list from (trace more layers with --trace)",
            ))
            continue
        before = search.runs_used
        keep, passed, exhausted = search.smallest_keep_list(ranked)
        if not keep:
            recs.append(Recommendation(
                arm=arm.name, keep_fp32=[], init_scale=None, verified_arm=None, passed=False, metrics={},
                runs_used=0, reason=f"--verify-budget ran out before a keep-list could be tried (ranked: "
                f"{', '.join(ranked)})",
            ))
            continue
        rec = _record(search, arm, keep, None, passed, runs=search.runs_used - before, exhausted=exhausted,
                      ranked=ranked)
        recs.append(rec)
        if rec.verified_arm is not None:
            verification[rec.verified_arm] = search.tried[(tuple(keep), None)]
    return recs, verification


def _record(
    search: _Search, arm: Arm, keep: list[str], scale: float | None, passed: bool | None, runs: int | None = None,
    exhausted: bool = False, ranked: Sequence[str] = (),
) -> Recommendation:
    run = search.tried.get((tuple(keep), scale))
    if run is None:
        return Recommendation(arm=arm.name, keep_fp32=keep, init_scale=scale, verified_arm=None, passed=False,
                              metrics={}, runs_used=runs or 0, reason="--verify-budget ran out before it was tried")
    change = _describe(keep, scale)
    outcome = "trains as well as fp32" if passed else f"still does not pass ({run.status})"
    reason = f"{change}: {arm.name} {outcome}"
    if keep and passed:
        reason += "; removing any one of them fails" if len(keep) > 1 else ""
    elif keep and not passed:
        reason += " with every ranked layer tried" if not exhausted else "; --verify-budget ran out"
        if ranked:
            reason += f" (ranked: {', '.join(ranked)})"
    return Recommendation(
        arm=arm.name, keep_fp32=list(keep), init_scale=scale, verified_arm=run.name, passed=bool(passed),
        metrics=dict(run.metrics), runs_used=search.runs_used if runs is None else runs, reason=reason,
    )


def _describe(keep: Sequence[str], scale: float | None) -> str:
    parts = []
    if keep:
        parts.append("keeping " + ", ".join(f"`{p}`" for p in keep) + " in fp32")
    if scale is not None:
        parts.append(f"GradScaler init_scale 2^{math.log2(scale):g}")
    return " and ".join(parts)


__all__ = ["DEFAULT_VERIFY_BUDGET", "Criteria", "rank_layers", "recommend", "recommended_init_scale",
           "ungated_ok"]
