"""Recommendations that are proven before they are given: each is trained as an extra arm and checked.

For every mixed-precision arm that does not pass (the user's gate, or without one: status ok and the primary
metric within :data:`~mpaudit.ci.gaps.UNGATED_RELATIVE_DROP` of fp32), two changes are tried on an autocast arm:

* a loss scale: the ``init_scale`` 2^k the rules computed from fp32's gradient histograms (a root ``loss_scale``
  flag's ``recommended_log2``; a loss-scale flag that only follows from an overflow is not a cause to fix);
* the smallest keep-list: modules ranked by evidence (:func:`rank_layers`), added one at a time until the arm
  passes, then each dropped again while it still passes. "Minimal" is claimed only when every single removal
  from the final list was trained and failed; otherwise the list is "sufficient" and says how many were tried.

On an arm that stores its weights in bf16 and rounds updates to nearest (``bf16-pure``), the changes keep its
small updates instead (:mod:`mpaudit.run.half_weights`), cheapest first:

* ``update_rounding="stochastic"``, then ``"kahan"``: one run each, the whole model, no fp32 weights kept;
* the smallest ``fp32_master`` list: modules ranked by the share of their updates the arm measured lost
  (:func:`rank_lost_updates`), searched like a keep-list, with the same honest minimal/sufficient claim.

On a float8 arm (``fp8``, ``fp8-rowwise``), the changes keep Linear layers out of float8 instead:

* the smallest ``exclude_from_fp8`` list: the arm's converted Linear layers ranked by its root ``fp8_underflow`` /
  ``fp8_saturation`` flags, then by the share of a GEMM operand the recipe flushes or saturates (fp32's tensors cast
  under it), then by the error of the layer's float8 forward GEMM (SQNR on the trained weights), searched like a
  keep-list with the same minimal/sufficient claim (arm ``fp8+filter``);
* the other scaling recipe (``rowwise`` for ``fp8``, tensorwise for ``fp8-rowwise``) as the alternative: the arm
  that trains it, reused when the audit trained it already, else one run.

Every try is a full training run (same seed, same batches, same evaluation), bounded by one budget shared by
the arms, spent on the worst first: arms that diverged, failed or carry a root error flag, then arms failing
the gate, then arms behind fp32 without a gate; never on a gap within fp32's seed noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mpaudit.arms import ALTERNATIVE_RECIPE, ARMS, FP8_ARM_OF_RECIPE, UPDATE_ROUNDINGS, Arm, UpdateRounding
from mpaudit.ci.gaps import fp32_noise_of_runs, gap_within_noise, judged_metric, ungated_drop
from mpaudit.ci.gate import Limit, evaluate_gate
from mpaudit.defaults import DEFAULT_VERIFY_BUDGET
from mpaudit.numerics.formats import FP16, what_if
from mpaudit.numerics.layerstats import ACTIVATION, ROOT_LAYER, TraceSummary
from mpaudit.numerics.rules import update_losses
from mpaudit.results.model import ArmResult, Flag, Recommendation
from mpaudit.vocab import BASELINE, ERROR, OK, SKIPPED, severity_rank

MAX_KEEP_CANDIDATES = 8
"""At most this many top-ranked modules are tried in a keep-list; beyond that, bf16 is the better advice."""

KEEP_KINDS = ("forward_overflow", "nonfinite", "activation_underflow", "gradient_overflow", "gradient_underflow",
              "precision_loss")
"""Flag kinds whose layer a keep-list can help, strongest evidence first."""

UNKEEPABLE = ("(loss_fn)", ROOT_LAYER)
"""Site modules no keep-list can hold: the loss outside the model, and the whole model."""

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


def _within(layer: str, module: str) -> bool:
    return layer.startswith(module + ".")


def rank_layers(
    arm: str, flags: Sequence[Flag], trace: TraceSummary | None, reference: TraceSummary | None,
    layer_error_db: Mapping[str, float] | None = None,
) -> list[str]:
    """Modules of ``arm`` most likely to need fp32, best evidence first.

    1. The module whose own forward ran the first non-finite op (a replayed site: it may be a container, such as
       an attention module computing its scores), and modules whose own error is non-finite (they make the
       non-finite values themselves).
    2. Root flags of the arm (error before warning, by kind); consequences of another flag are never candidates.
    3. Without a known origin: modules whose outputs went non-finite, or would overflow fp16 by fp32's numbers.
    4. The rest by the error the arm's precision introduces at each module (SQNR, dB: lower is worse).

    Modules inside a site's module are left out: keeping a leaf cannot change an op in its container's own
    code (autocast casts the leaf's fp32 output back to half at the container's matmul).
    """
    score: dict[str, tuple[float, ...]] = {}
    order = {layer: i for i, layer in enumerate(trace.layers if trace is not None else ())}
    mine = [f for f in flags if f.arm == arm]
    sites = [f.site.module for f in mine if f.site is not None and f.caused_by is None
             and f.site.module not in UNKEEPABLE]

    def offer(layer: str, key: tuple[float, ...]) -> None:
        if not layer or layer in UNKEEPABLE or any(_within(layer, m) for m in sites):
            return
        if layer not in score or key < score[layer]:
            score[layer] = key

    for i, module in enumerate(sites):
        offer(module, (0, 0, i))
    for layer, db in (layer_error_db or {}).items():
        if not math.isfinite(db):
            offer(layer, (0, 1, order.get(layer, len(order))))  # the layer itself produced non-finite values
    for f in mine:
        if f.kind in KEEP_KINDS and f.caused_by is None:
            offer(f.layer, (1, severity_rank(f.severity), KEEP_KINDS.index(f.kind),
                            0 if "first_inf_step" in f.evidence else 1, order.get(f.layer, len(order))))
    if trace is not None and not sites:
        for layer in trace.layers:
            own = trace.get(layer, ACTIVATION)
            ref = reference.get(layer, ACTIVATION) if reference is not None else None
            overflow = what_if(ref.hist, FP16).overflow if ref is not None and half_is_fp16(arm) else 0.0
            bad = own.nonfinite if own is not None else 0
            if bad or overflow > 0:
                offer(layer, (2, -float(bad), -overflow, order.get(layer, len(order))))
    for layer, db in (layer_error_db or {}).items():
        if math.isfinite(db):
            offer(layer, (3, db))
    return sorted(score, key=lambda layer: score[layer])[:MAX_KEEP_CANDIDATES]


def rank_lost_updates(trace: TraceSummary | None, reference: TraceSummary | None) -> list[str]:
    """Modules of a half-weight arm to give an fp32 master copy, most lost updates first (the share of their
    sampled updates the arm measured lost, :func:`~mpaudit.numerics.rules.update_losses`), then in forward order;
    modules that lost none are left out, and so is the root (its own parameters have no module path to name)."""
    if trace is None:
        return []
    losses = update_losses(trace, reference)
    order = {layer: i for i, layer in enumerate(losses)}
    ranked = [layer for layer, loss in losses.items() if loss.measured > 0 and layer not in UNKEEPABLE]
    return sorted(ranked, key=lambda layer: (-losses[layer].measured, order[layer]))[:MAX_KEEP_CANDIDATES]


def half_is_fp16(arm: str) -> bool:
    """True for fp16 arms (the only format whose range fp32 values can overflow)."""
    return arm.startswith("fp16")


def recommended_init_scale(arm: str, flags: Sequence[Flag]) -> float | None:
    """The GradScaler init_scale a root ``loss_scale`` flag of ``arm`` recommends (``recommended_log2``)."""
    for f in flags:
        k = f.evidence.get("recommended_log2")
        if f.arm == arm and f.kind == "loss_scale" and k is not None and f.caused_by is None:
            return float(2.0 ** int(k))
    return None


_Key = tuple[tuple[str, ...], float | None, tuple[str, ...], str | None, tuple[str, ...]]
"""A change tried: (keep_fp32, init_scale, fp32_master, update_rounding, exclude_from_fp8)."""

FP8_KINDS = ("fp8_underflow", "fp8_saturation")
"""Flag kinds whose layer keeping out of float8 can help."""


def _key(keep: Sequence[str] = (), init_scale: float | None = None, master: Sequence[str] = (),
         rounding: str | None = None, exclude: Sequence[str] = ()) -> _Key:
    return (tuple(keep), init_scale, tuple(master), rounding, tuple(exclude))


def _list_key(kind: str, modules: Sequence[str]) -> _Key:
    """The change of a module list of ``kind`` (``keep``, ``master`` or ``exclude``)."""
    if kind == "master":
        return _key(master=modules)
    if kind == "exclude":
        return _key(exclude=modules)
    return _key(modules)


@dataclass
class _Search:
    """One arm's search: every try costs a run from the shared budget; results are cached by change."""

    arm: Arm
    criteria: Criteria
    train: Trainer
    budget: list[int]  # one shared counter, [runs left], across arms
    runs_used: int = 0
    tried: dict[_Key, ArmResult] = field(default_factory=dict)

    def run(self, keep: Sequence[str], init_scale: float | None, master: Sequence[str] = (),
            rounding: UpdateRounding | None = None, exclude: Sequence[str] = ()) -> ArmResult | None:
        key = _key(keep, init_scale, master, rounding, exclude)
        if key not in self.tried:
            if self.budget[0] <= 0:
                return None
            self.budget[0] -= 1
            self.runs_used += 1
            self.tried[key] = self.train(self.arm.with_changes(keep, init_scale, fp32_master=master,
                                                               update_rounding=rounding, exclude_from_fp8=exclude))
        return self.tried[key]

    def passes(self, keep: Sequence[str], init_scale: float | None, master: Sequence[str] = (),
               rounding: UpdateRounding | None = None, exclude: Sequence[str] = ()) -> bool | None:
        if not keep and init_scale is None and not master and rounding is None and not exclude:
            return False  # the arm as it is: it is searched because it does not pass
        run = self.run(keep, init_scale, master, rounding, exclude)
        return None if run is None else self.criteria.passes(run)

    def known(self, keep: Sequence[str], master: bool | str = False) -> bool | None:
        """Whether the list ``keep`` (a keep-list; with ``master`` an fp32-master list, or a list of the kind it
        names: ``keep``, ``master``, ``exclude``) was trained (or is the arm as it is) and passed; None when it was
        never trained."""
        if not keep:
            return False
        run = self.tried.get(_list_key(_kind(master), keep))
        return None if run is None else self.criteria.passes(run)

    def _list_passes(self, modules: Sequence[str], master: bool | str) -> bool | None:
        kind = _kind(master)
        if kind == "master":
            return self.passes((), None, master=modules)
        if kind == "exclude":
            return self.passes((), None, exclude=modules)
        return self.passes(modules, None)

    def smallest_keep_list(self, ranked: Sequence[str], master: bool | str = False) -> _KeepSearch:
        """Add ranked modules until the arm passes, drop each one it still passes without, then train the
        removals from the final list not tried yet while the budget lasts. With ``master`` (or ``"master"``) the list
        names the modules that keep an fp32 master copy of their weights, with ``"exclude"`` the Linear layers kept
        out of float8, instead of the modules kept in fp32 under autocast."""
        keep: list[str] = []
        found = _KeepSearch(keep=[], passed=False, exhausted=False, ranked=list(ranked))
        for layer in ranked:
            keep.append(layer)
            ok = self._list_passes(keep, master)
            if ok is None:
                keep.pop()
                found.exhausted = True
                break
            if ok:
                found.passed = True
                break
        found.keep = list(keep)
        if not found.passed:
            return found
        for layer in list(keep):
            if len(keep) == 1:
                break
            trial = [x for x in keep if x != layer]
            ok = self._list_passes(trial, master)
            if ok is None:
                found.exhausted = True
                break
            if ok:
                keep = trial
        found.keep = list(keep)
        for layer in keep:  # every single removal from the final list, trained: only then is it minimal
            without = [x for x in keep if x != layer]
            if self.known(without, master) is None and self._list_passes(without, master) is None:
                found.exhausted = True
                break
        found.removals_tried = sum(self.known([x for x in keep if x != layer], master) is not None for layer in keep)
        found.minimal = found.removals_tried == len(keep) and not any(
            self.known([x for x in keep if x != layer], master) for layer in keep)
        return found


def _kind(master: bool | str) -> str:
    return master if isinstance(master, str) else "master" if master else "keep"


@dataclass
class _KeepSearch:
    """What the keep-list search found: the list, whether it passed, whether it is shown minimal."""

    keep: list[str]
    passed: bool
    exhausted: bool
    ranked: list[str]
    removals_tried: int = 0
    minimal: bool = False


def _priority(name: str, result: ArmResult, flags: Sequence[Flag], criteria: Criteria) -> int | None:
    """Which failing arm gets the budget first: 0 diverged, failed or a root error flag; 1 failing the gate;
    2 behind fp32 without a gate; None when its gap lies within fp32's seed noise (nothing to fix)."""
    if result.status != OK or any(f.arm == name and f.severity == ERROR and f.caused_by is None for f in flags):
        return 0
    runs = [criteria.baseline, *criteria.baseline_replicates]
    metric = judged_metric(criteria.baseline, criteria.directions)
    noise = fp32_noise_of_runs(runs, metric)
    if noise is not None and gap_within_noise(result, criteria.baseline, metric, noise, criteria.noise_k,
                                              criteria.directions):
        return None
    return 1 if criteria.gated else 2


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
    failing: list[tuple[int, int, Arm]] = []
    for i, arm in enumerate(arms):
        result = results.get(arm.name)
        if arm.is_baseline or result is None or result.status == SKIPPED or criteria.passes(result):
            continue
        priority = _priority(arm.name, result, flags, criteria)
        if priority is None:
            recs.append(Recommendation(arm=arm.name, reason=(
                f"not searched: {arm.name}'s gap to fp32 lies within fp32's seed noise ({criteria.noise_k:g}σ), "
                "so no change could be shown to help")))
            continue
        failing.append((priority, i, arm))
    for _, _, arm in sorted(failing, key=lambda t: t[:2]):
        result = results[arm.name]
        search = _Search(arm, criteria, train, left)
        if arm.rounds_updates_to_nearest:
            _half_weight_fixes(search, arm, result, reference, recs, verification)
            continue
        if arm.fp8 is not None:
            sqnr = (layer_error_db or {}).get(arm.name)
            _fp8_fixes(search, arm, result, results, flags, sqnr, recs, verification)
            continue
        scale = recommended_init_scale(arm.name, flags) if arm.grad_scaler else None
        if scale is not None:
            ok = search.passes((), scale)
            rec = _record(search, arm, [], scale, ok)
            recs.append(rec)
            if rec.verified_arm is not None:
                verification[rec.verified_arm] = search.tried[_key((), scale)]
            if ok:
                continue
        ranked = rank_layers(arm.name, flags, result.trace, reference, (layer_error_db or {}).get(arm.name))
        if not ranked:
            recs.append(Recommendation(arm=arm.name, reason=(
                "no module evidence to build a keep-list from (trace more modules with --trace)")))
            continue
        before = search.runs_used
        found = search.smallest_keep_list(ranked)
        if not found.keep:
            recs.append(Recommendation(arm=arm.name, runs_used=search.runs_used - before, reason=(
                f"--verify-budget ran out before a keep-list could be tried (ranked: {', '.join(ranked)})")))
            continue
        rec = _record(search, arm, found.keep, None, found.passed, runs=search.runs_used - before, found=found)
        recs.append(rec)
        if rec.verified_arm is not None:
            verification[rec.verified_arm] = search.tried[_key(found.keep)]
    return recs, verification


def _half_weight_fixes(
    search: _Search, arm: Arm, result: ArmResult, reference: TraceSummary | None, recs: list[Recommendation],
    verification: dict[str, ArmResult],
) -> None:
    """A half-weight arm's fixes, cheapest first, until one passes: stochastic rounding, Kahan-compensated
    rounding (whole model, one run each), then the smallest fp32-master list over modules ranked by lost updates."""
    for rounding in UPDATE_ROUNDINGS:
        before = search.runs_used
        ok = search.passes((), None, rounding=rounding)
        rec = _record(search, arm, [], None, ok, runs=search.runs_used - before, rounding=rounding)
        recs.append(rec)
        if rec.verified_arm is not None:
            verification[rec.verified_arm] = search.tried[_key(rounding=rounding)]
        if ok or ok is None:
            return
    ranked = rank_lost_updates(result.trace, reference)
    if not ranked:
        recs.append(Recommendation(arm=arm.name, reason=(
            "no module measured lost updates to keep an fp32 master copy of (trace the arm: --trace-every)")))
        return
    before = search.runs_used
    found = search.smallest_keep_list(ranked, master=True)
    if not found.keep:
        recs.append(Recommendation(arm=arm.name, runs_used=search.runs_used - before, reason=(
            f"--verify-budget ran out before an fp32 master list could be tried (ranked: {', '.join(ranked)})")))
        return
    rec = _record(search, arm, [], None, found.passed, runs=search.runs_used - before, found=found,
                  master=found.keep)
    recs.append(rec)
    if rec.verified_arm is not None:
        verification[rec.verified_arm] = search.tried[_key(master=found.keep)]


def rank_fp8_layers(
    arm: str, flags: Sequence[Flag], result: ArmResult, reference: ArmResult | None,
    layer_error_db: Mapping[str, float] | None = None,
) -> list[str]:
    """A float8 arm's converted Linear layers most likely to need keeping out of float8, best evidence first.

    1. Root ``fp8_underflow`` / ``fp8_saturation`` flags of the arm (error before warning, the larger share first).
    2. The share of a GEMM operand the arm's recipe flushes or saturates in the layer (fp32's tensors cast under the
       recipe; the arm's own casts without an fp32 reference), largest first.
    3. The error of the layer's float8 forward GEMM on the trained weights (SQNR, dB: lower is worse).

    Only layers the arm converted are candidates (a filter naming anything else would match nothing).
    """
    recipe = result.fp8_recipe
    converted = list(result.fp8_layers)
    casts = reference.fp8_casts if reference is not None and reference.fp8_casts is not None else result.fp8_casts
    losses = casts.losses(recipe) if casts is not None and recipe is not None else {}
    if not converted:
        converted = list(losses)
    allowed = set(converted)
    order = {layer: i for i, layer in enumerate(converted)}
    score: dict[str, tuple[float, ...]] = {}

    def offer(layer: str, key: tuple[float, ...]) -> None:
        if layer in allowed and (layer not in score or key < score[layer]):
            score[layer] = key

    for f in flags:
        if f.arm == arm and f.kind in FP8_KINDS and f.caused_by is None:
            shares = [v for k, v in f.evidence.items() if k.startswith("predicted_") and isinstance(v, (int, float))]
            offer(f.layer, (0, severity_rank(f.severity), -max(shares, default=0.0), order.get(f.layer, 0)))
    for layer, per_gemm in losses.items():
        worst = max((max(g.flush, g.saturation) for g in per_gemm.values()), default=0.0)
        if worst > 0:
            offer(layer, (1, -worst, order.get(layer, 0)))
    for layer, db in (layer_error_db or {}).items():
        if math.isfinite(db):
            offer(layer, (2, db))
    return sorted(score, key=lambda layer: score[layer])[:MAX_KEEP_CANDIDATES]


def _fp8_fixes(
    search: _Search, arm: Arm, result: ArmResult, results: Mapping[str, ArmResult], flags: Sequence[Flag],
    layer_error_db: Mapping[str, float] | None, recs: list[Recommendation], verification: dict[str, ArmResult],
) -> None:
    """A float8 arm's fixes: the smallest set of Linear layers to keep out of float8, then the other scaling recipe
    (reused when the audit trained its arm already)."""
    ranked = rank_fp8_layers(arm.name, flags, result, results.get(BASELINE), layer_error_db)
    if not ranked:
        recs.append(Recommendation(arm=arm.name, reason=(
            "no Linear layer evidence to build a float8 filter from (trace the arms: --trace-every)")))
    else:
        before = search.runs_used
        found = search.smallest_keep_list(ranked, master="exclude")
        if not found.keep:
            recs.append(Recommendation(arm=arm.name, runs_used=search.runs_used - before, reason=(
                f"--verify-budget ran out before a float8 filter could be tried (ranked: {', '.join(ranked)})")))
        else:
            rec = _record(search, arm, [], None, found.passed, runs=search.runs_used - before, found=found,
                          exclude=found.keep)
            recs.append(rec)
            if rec.verified_arm is not None:
                verification[rec.verified_arm] = search.tried[_key(exclude=found.keep)]
    other = ALTERNATIVE_RECIPE.get(arm.fp8 or "")
    if other is None:
        return
    other_arm = ARMS[FP8_ARM_OF_RECIPE[other]]
    change = f"{other} scaling instead of {arm.fp8}"
    done = results.get(other_arm.name)
    runs = 0
    if done is None or done.status == SKIPPED:
        if search.budget[0] <= 0:
            recs.append(Recommendation(arm=arm.name, fp8_recipe=other,
                                       reason=f"{change}: --verify-budget ran out before it was trained"))
            return
        search.budget[0] -= 1
        search.runs_used += 1
        runs = 1
        done = search.train(other_arm)
        verification[other_arm.name] = done
    passed = search.criteria.passes(done)
    outcome = "trains as well as fp32" if passed else f"still does not pass ({_outcome(done)})"
    trained = "trained as its own arm" if runs else "the audit's own arm"
    recs.append(Recommendation(arm=arm.name, fp8_recipe=other, verified_arm=other_arm.name, passed=passed,
                               metrics=dict(done.metrics), runs_used=runs,
                               reason=f"{change} ({trained}, {other_arm.name}): {arm.name} {outcome}"))


def _record(
    search: _Search, arm: Arm, keep: list[str], scale: float | None, passed: bool | None, runs: int | None = None,
    found: _KeepSearch | None = None, master: Sequence[str] = (), rounding: UpdateRounding | None = None,
    exclude: Sequence[str] = (),
) -> Recommendation:
    run = search.tried.get(_key(keep, scale, master, rounding, exclude))
    change = _describe(keep, scale, master, rounding, exclude)
    listed = list(master) or list(exclude) or keep
    if run is None:
        return Recommendation(arm=arm.name, keep_fp32=keep, init_scale=scale, fp32_master=list(master),
                              update_rounding=rounding, exclude_from_fp8=list(exclude), passed=False,
                              runs_used=runs or 0, reason=f"{change}: --verify-budget ran out before it was trained")
    outcome = "trains as well as fp32" if passed else f"still does not pass ({_outcome(run)})"
    reason = f"{change}: {arm.name} {outcome}"
    if found is not None and passed:
        if found.minimal:
            reason += ("; minimal: removing any one of them fails, each removal trained" if len(listed) > 1
                       else "; minimal: the arm without it fails")
        else:
            reason += (f"; sufficient, not shown minimal: {found.removals_tried} of {len(listed)} removals trained"
                       + ("; --verify-budget ran out" if found.exhausted else ""))
    elif found is not None:
        reason += "; --verify-budget ran out" if found.exhausted else " with every ranked module tried"
        reason += f" (ranked: {', '.join(found.ranked)})"
    return Recommendation(
        arm=arm.name, keep_fp32=list(keep), init_scale=scale, fp32_master=list(master), update_rounding=rounding,
        exclude_from_fp8=list(exclude), verified_arm=run.name, passed=bool(passed), metrics=dict(run.metrics),
        runs_used=search.runs_used if runs is None else runs, reason=reason,
    )


def _outcome(run: ArmResult) -> str:
    if run.status != OK:
        return run.status + (f": {run.error}" if run.error else "")
    metric = next(iter(run.metrics), None)
    return f"{metric} {run.metrics[metric]:.4g}" if metric is not None else f"final loss {run.final_loss:.4g}"


def _describe(keep: Sequence[str], scale: float | None, master: Sequence[str] = (),
              rounding: str | None = None, exclude: Sequence[str] = ()) -> str:
    parts = []
    if exclude:
        parts.append("keeping " + ", ".join(f"`{p}`" for p in exclude) + " out of float8")
    if keep:
        parts.append("keeping " + ", ".join(f"`{p}`" for p in keep) + " in fp32")
    if scale is not None:
        parts.append(f"GradScaler init_scale 2^{math.log2(scale):g}")
    if master:
        parts.append("an fp32 master copy of " + ", ".join(f"`{p}`" for p in master))
    if rounding == "stochastic":
        parts.append("stochastically rounded bf16 updates")
    elif rounding == "kahan":
        parts.append("Kahan-compensated bf16 updates")
    return " and ".join(parts)


__all__ = ["Criteria", "rank_fp8_layers", "rank_layers", "rank_lost_updates", "recommend", "recommended_init_scale",
           "ungated_ok"]
