"""``mpaudit compare``: did a change make mixed precision worse? Two results of one task, across commits.

What matters is whether a mixed-precision arm's *gap to fp32* grew, not whether its absolute accuracy
moved: a change to the model or the data moves every arm, fp32 included. For each arm both results ran,
compare puts the arm's gap to fp32 (mean over paired seeds) in base beside the gap in new, and calls it a
regression when the gap grew by more than the tolerance: ``METRIC=DELTA``, or ``METRIC=auto`` for
k·σ of the larger fp32 noise floor of the two results. Without a tolerance the primary metric is gated at
``auto`` when either result was run with ``--seeds`` ≥ 2, and reported only otherwise.

Also a regression: an arm that was ``ok`` and now diverged or failed, an ``error`` flag that appeared, a
benchmark speedup that shrank beyond ``speedup_tolerance`` (intervals apart), and a mixed-precision arm's
peak memory relative to fp32 that grew beyond ``memory_tolerance``. A changed task file is the point of
comparing, so it is reported, never refused. Fields an older result lacks (speed, memory, flags, noise
floors) are skipped with a note. Exit codes: 0 nothing got worse, 1 something did, 2 no arm in common.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

from pydantic import computed_field
from pydantic.dataclasses import dataclass

from mpaudit.ci.gaps import (
    FINAL_LOSS,
    Gap,
    check_declared_directions,
    fp32_noise,
    gap_to_fp32,
    metric_direction,
    unknown_direction_message,
)
from mpaudit.ci.gate import AUTO, DEFAULT_NOISE_K, Limit
from mpaudit.defaults import DEFAULT_MEMORY_TOLERANCE, DEFAULT_SPEEDUP_TOLERANCE
from mpaudit.errors import UsageError
from mpaudit.results.codec import RESULT_CONFIG, JsonFloat, to_plain
from mpaudit.results.model import ArmResult, AuditResult, Flag, NoiseFloor
from mpaudit.text import byte_size, cut, fmt
from mpaudit.vocab import BASELINE, ERROR, IMPROVEMENT, MIN, NOTE, OK, REGRESSION, UNKNOWN, MetricDirection, Outcome

MAX_LISTED = 5
"""A note lists at most this many items (flags, ...) and counts the rest."""

EXIT_OK, EXIT_REGRESSION, EXIT_NOT_COMPARABLE = 0, 1, 2

_SPEED_BENCHMARK, _SPEED_TRAIN_LOOP = "benchmark", "train_loop"


@dataclass(frozen=True, config=RESULT_CONFIG)
class MetricRow:
    """How an arm's gap to fp32 on one metric changed from base to new, and what growth was allowed."""

    arm: str
    metric: str
    base: Gap | None
    new: Gap | None
    allowed: JsonFloat | None
    """The largest growth of the gap that is not a regression; None when this metric is not gated."""
    limit_text: str
    base_noise: NoiseFloor | None = None
    new_noise: NoiseFloor | None = None
    direction: MetricDirection = UNKNOWN
    """``min`` (lower is better), ``max``, or ``unknown``: shown, never judged."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lower_is_better(self) -> bool | None:
        return None if self.direction == UNKNOWN else self.direction == MIN

    @computed_field  # type: ignore[prop-decorator]
    @property
    def growth(self) -> JsonFloat | None:
        """How much further behind fp32 the arm fell from base to new (positive: worse); None if unknown (a gap is
        missing, or the metric's direction is unknown)."""
        if self.base is None or self.new is None or self.direction == UNKNOWN:
            return None
        sign = 1.0 if self.lower_is_better else -1.0
        return sign * (self.new.delta - self.base.delta)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> Outcome | None:
        """``regression`` / ``improvement`` when the gap moved beyond the allowed growth, ``ok`` within it,
        None when not gated or unknown."""
        growth = self.growth
        if self.allowed is None or growth is None:
            return None
        if growth > self.allowed:
            return REGRESSION
        return IMPROVEMENT if growth < -self.allowed else OK


@dataclass(frozen=True, config=RESULT_CONFIG)
class ArmRow:
    """One arm both results ran: status before and after, its metric gaps, fp16 skipped steps, flag changes."""

    arm: str
    base_status: str
    new_status: str
    base_error: str | None
    new_error: str | None
    metrics: list[MetricRow]
    base_skipped: int | None = None
    new_skipped: int | None = None
    base_steps: int = 0
    new_steps: int = 0
    flags_appeared: list[Flag] = field(default_factory=list)
    flags_disappeared: list[Flag] = field(default_factory=list)


@dataclass(frozen=True, config=RESULT_CONFIG)
class SpeedPoint:
    """One result's speedup of an arm over fp32 (>1: faster), with its interval when it was benchmarked."""

    ratio: JsonFloat
    ci_low: JsonFloat | None = None
    ci_high: JsonFloat | None = None
    verdict: str | None = None


@dataclass(frozen=True, config=RESULT_CONFIG)
class SpeedRow:
    """An arm's speedup in base and in new. ``source`` is ``benchmark`` (interleaved rounds with an
    interval, gated) or ``train_loop`` (ratio of training-loop median step times, shown but never gated)."""

    name: str
    base: SpeedPoint
    new: SpeedPoint
    source: str
    gated: bool

    @computed_field  # type: ignore[prop-decorator]
    @property
    def change(self) -> JsonFloat:
        """Relative change of the speedup from base to new (-0.25: a quarter smaller)."""
        return self.new.ratio / self.base.ratio - 1.0 if self.base.ratio > 0 else math.nan


@dataclass(frozen=True, config=RESULT_CONFIG)
class MemoryRow:
    """An arm's peak memory of one training step in base and in new, and as a fraction of fp32's peak."""

    arm: str
    base_peak_bytes: int
    new_peak_bytes: int
    base_fraction: JsonFloat | None = None
    new_fraction: JsonFloat | None = None


@dataclass(frozen=True, config=RESULT_CONFIG)
class Check:
    """One thing compare judged, with its outcome (see :data:`OUTCOMES`) and one sentence for people."""

    arm: str
    """The arm it concerns; empty for the task as a whole."""
    subject: str
    """What was looked at: ``status``, ``gap accuracy``, ``speedup``, ``memory``, ``flags``, ``task``, ..."""
    outcome: Outcome
    message: str


@dataclass(frozen=True, config=RESULT_CONFIG)
class Comparison:
    """Everything ``compare`` found between a base and a new result of the same task."""

    task: str
    base: dict[str, Any]
    """Identity of the base result: task, created, task_sha256, mpaudit and torch versions, device."""
    new: dict[str, Any]
    arms: list[ArmRow]
    speed: list[SpeedRow]
    memory: list[MemoryRow]
    checks: list[Check]
    comparable: bool
    tolerance: dict[str, JsonFloat | str] = field(default_factory=dict)
    noise_k: JsonFloat = DEFAULT_NOISE_K
    speedup_tolerance: JsonFloat = DEFAULT_SPEEDUP_TOLERANCE
    memory_tolerance: JsonFloat = DEFAULT_MEMORY_TOLERANCE


    def _messages(self, outcome: str) -> list[str]:
        return [c.message for c in self.checks if c.outcome == outcome]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def regressions(self) -> list[str]:
        """One sentence per thing that got worse beyond its tolerance."""
        return self._messages(REGRESSION)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def improvements(self) -> list[str]:
        return self._messages(IMPROVEMENT)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def notes(self) -> list[str]:
        """What changed without being judged, and what could not be compared (and why)."""
        return self._messages(NOTE)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exit_code(self) -> int:
        """0 nothing got worse beyond tolerance, 1 something did, 2 not comparable (no arm in common)."""
        if not self.comparable:
            return EXIT_NOT_COMPARABLE
        return EXIT_REGRESSION if self.regressions else EXIT_OK


# ---------------------------------------------------------------------------------------------- compare


def compare(
    base: AuditResult,
    new: AuditResult,
    tolerance: Mapping[str, Limit] | None = None,
    speedup_tolerance: float = DEFAULT_SPEEDUP_TOLERANCE,
    noise_k: float = DEFAULT_NOISE_K,
    memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE,
    directions: Mapping[str, str] | None = None,
) -> Comparison:
    """Compare two results of the same task (usually main vs a pull request) arm by arm.

    ``tolerance`` maps a metric (or ``final_loss``) to the largest allowed growth of an arm's gap to fp32,
    or to ``"auto"`` (``noise_k`` σ of the larger fp32 noise floor). ``directions`` declares metrics' directions
    (``min``/``max``, ``--metric-direction``), over those the results record, over the metrics' names; a metric
    whose direction stays unknown (or that base and new record differently) is shown, never gated. UsageError for a
    tolerance naming a metric neither result has or one whose direction is unknown, a negative one, or ``auto``
    when neither result has a noise estimate.
    """
    checks = _context_notes(base, new)
    dirs = _directions(base, new, directions or {}, checks)
    limits = _validated(tolerance or {}, base, new, speedup_tolerance, noise_k, memory_tolerance, dirs)
    common = [name for name in new.arms if name in base.arms]
    only_base = [name for name in base.arms if name not in new.arms]
    only_new = [name for name in new.arms if name not in base.arms]
    if only_base:
        checks.append(_note("", "arms", f"Only base ran {', '.join(only_base)}; not compared."))
    if only_new:
        checks.append(_note("", "arms", f"Only new ran {', '.join(only_new)}; not compared."))
    settings: dict[str, Any] = {"tolerance": dict(limits), "noise_k": noise_k,
                                "speedup_tolerance": speedup_tolerance, "memory_tolerance": memory_tolerance}
    watched = [label for label, r in (("base", base), ("new", new)) if r.observed]
    if watched:
        checks.append(_note("", "arms", f"Nothing to compare: {' and '.join(watched)} is an observed run "
                                        "(mpaudit.watch), not a matched comparison with fp32; compare two results "
                                        "of mpaudit run."))
        return Comparison(task=new.task, base=_identity(base), new=_identity(new), arms=[], speed=[], memory=[],
                          checks=checks, comparable=False, **settings)
    if not common:
        checks.append(_note("", "arms", f"Nothing to compare: base ran {_names(base.arms)} and new ran "
                                        f"{_names(new.arms)}, no arm in common."))
        return Comparison(task=new.task, base=_identity(base), new=_identity(new), arms=[], speed=[], memory=[],
                          checks=checks, comparable=False, **settings)

    gated = _gated_metrics(limits, base, new, noise_k, checks, dirs)
    if BASELINE not in common:
        checks.append(_note("", "gaps", "fp32 is not in both results, so no gap to fp32 could be compared."))
    rows = []
    for name in common:
        row = _arm_row(base, new, name, gated, noise_k, dirs)
        rows.append(row)
        checks.extend(_status_checks(row))
        checks.extend(_metric_checks(row))
        checks.extend(_flag_checks(row))
        checks.extend(_arm_notes(base.arms[name], new.arms[name]))
    checks.extend(_noise_notes(base, new, [m.metric for r in rows for m in r.metrics], bool(limits)))
    speed, speed_checks = _compare_speed(base, new, common, speedup_tolerance)
    memory, memory_checks = _compare_memory(base, new, common, memory_tolerance)
    return Comparison(task=new.task, base=_identity(base), new=_identity(new), arms=rows, speed=speed,
                      memory=memory, checks=[*checks, *speed_checks, *memory_checks], comparable=True, **settings)


def _directions(base: AuditResult, new: AuditResult, declared: Mapping[str, str],
                checks: list[Check]) -> dict[str, MetricDirection]:
    """Every metric's direction: declared, else recorded alike in both results, else by its name. A metric base
    and new record in opposite directions (the task's ``METRICS`` changed) is unknown, with a note."""
    declared = check_declared_directions(declared, "--metric-direction")
    known = _all_metrics(base) | _all_metrics(new)
    for metric in declared:
        if metric not in known:
            raise UsageError(f"--metric-direction names metric {metric!r}, which neither result has (they have "
                             f"{', '.join(sorted(known)) or 'no metrics'}).")
    out: dict[str, MetricDirection] = {FINAL_LOSS: MIN}
    for metric in sorted(known):
        b, n = metric_direction(metric, declared, base.metric_directions), metric_direction(metric, declared,
                                                                                            new.metric_directions)
        if b != n and UNKNOWN not in (b, n):
            checks.append(_note("", "direction", f"Base records {metric} as {b} and new as {n} (better when "
                                                 f"{'lower' if b == MIN else 'higher'} vs "
                                                 f"{'lower' if n == MIN else 'higher'}): its gaps are shown, not "
                                                 f"judged; declare it with --metric-direction {metric}=min|max."))
            out[metric] = UNKNOWN
        else:
            out[metric] = n if n != UNKNOWN else b
    return out


def _validated(tolerance: Mapping[str, Limit], base: AuditResult, new: AuditResult, speedup_tolerance: float,
               noise_k: float, memory_tolerance: float, directions: Mapping[str, str]) -> dict[str, Limit]:
    if not (math.isfinite(noise_k) and noise_k > 0):
        raise UsageError("--noise-k must be a positive number.")
    if not (0 <= speedup_tolerance < 1):
        raise UsageError("The speedup tolerance must be a fraction in [0, 1).")
    if not (math.isfinite(memory_tolerance) and memory_tolerance >= 0):
        raise UsageError("The memory tolerance must be a finite number >= 0.")
    known = _all_metrics(base) | _all_metrics(new) | {FINAL_LOSS}
    out: dict[str, Limit] = {}
    for metric, limit in tolerance.items():
        if metric not in known:
            raise UsageError(f"--tolerance {metric}: neither result has a metric called {metric!r} "
                             f"(they have {', '.join(sorted(known))}).")
        if directions.get(metric, UNKNOWN) == UNKNOWN:
            raise UsageError(unknown_direction_message(metric, "--tolerance"))
        if limit == AUTO:
            if fp32_noise(base, metric) is None and fp32_noise(new, metric) is None:
                raise UsageError(f"--tolerance {metric}=auto needs a noise estimate: run base or new with "
                                 f"--seeds 2 or more, or give a number.")
            out[metric] = AUTO
            continue
        if isinstance(limit, str) or not math.isfinite(float(limit)) or float(limit) < 0:
            raise UsageError(f"--tolerance {metric}={limit!r}: give a finite number >= 0 or 'auto'.")
        out[metric] = float(limit)
    return out


def _all_metrics(result: AuditResult) -> set[str]:
    return {m for arm in result.arms for run in result.runs(arm) for m in run.metrics}


def _gated_metrics(limits: dict[str, Limit], base: AuditResult, new: AuditResult, noise_k: float,
                   checks: list[Check], directions: Mapping[str, str]) -> dict[str, Limit]:
    """The metrics whose gap growth is judged: the given tolerances, else the primary metric at ``auto`` (when its
    direction is known)."""
    gated = dict(limits)
    if not gated:
        primary = new.primary_metric or base.primary_metric or FINAL_LOSS
        if directions.get(primary, UNKNOWN) == UNKNOWN:
            checks.append(_note("", "direction", f"The direction of {primary} is unknown (neither declared nor known "
                                                 f"by its name): its gaps to fp32 are shown, not gated. Declare it "
                                                 f"with --metric-direction {primary}=min|max, or METRICS in the task "
                                                 "file."))
            return {}
        if fp32_noise(base, primary) is None and fp32_noise(new, primary) is None:
            checks.append(_note("", "tolerance", f"No noise estimate (run with --seeds K) and no --tolerance: gaps "
                                                 f"to fp32 are shown but not gated. Give --tolerance {primary}=DELTA "
                                                 "to gate."))
            return {}
        checks.append(_note("", "tolerance", f"No --tolerance given: {primary} is gated at {noise_k:g}σ of fp32's "
                                             "seed noise; other metrics are shown, not gated."))
        gated = {primary: AUTO}
    for metric, limit in gated.items():
        floors = [f for f in (fp32_noise(base, metric), fp32_noise(new, metric)) if f is not None]
        if limit == AUTO and floors and max(f.std for f in floors) == 0:
            checks.append(_note("", "tolerance", f"fp32's {metric} did not vary between seeds (σ=0), so 'auto' "
                                                 "allows no growth at all; more seeds or a number would be fairer."))
    return gated


def _arm_row(base: AuditResult, new: AuditResult, name: str, gated: Mapping[str, Limit], noise_k: float,
             directions: Mapping[str, MetricDirection]) -> ArmRow:
    b, n = base.arms[name], new.arms[name]
    rows: list[MetricRow] = []
    if name != BASELINE and BASELINE in base.arms and BASELINE in new.arms:
        rows = [_metric_row(base, new, name, metric, gated.get(metric), noise_k, directions.get(metric, UNKNOWN))
                for metric in _metric_order(base, new, name)]
    appeared, disappeared = _flag_changes(base.flags, new.flags, name)
    return ArmRow(
        arm=name, base_status=b.status, new_status=n.status, base_error=b.error, new_error=n.error, metrics=rows,
        base_skipped=b.loss_scale.skipped if b.loss_scale else None,
        new_skipped=n.loss_scale.skipped if n.loss_scale else None,
        base_steps=b.steps, new_steps=n.steps, flags_appeared=appeared, flags_disappeared=disappeared,
    )


def _metric_order(base: AuditResult, new: AuditResult, name: str) -> list[str]:
    """Metrics that this arm and fp32 report in either result (new's order, primary first), then final_loss."""
    def has(result: AuditResult, metric: str) -> bool:
        return all(metric in result.arms[a].metrics for a in (BASELINE, name))

    candidates = [*new.arms[name].metrics, *new.arms[BASELINE].metrics, *base.arms[name].metrics,
                  *base.arms[BASELINE].metrics]
    return [*dict.fromkeys(m for m in candidates if has(base, m) or has(new, m)), FINAL_LOSS]


def _metric_row(base: AuditResult, new: AuditResult, arm: str, metric: str, limit: Limit | None,
                noise_k: float, direction: MetricDirection) -> MetricRow:
    base_noise, new_noise = fp32_noise(base, metric), fp32_noise(new, metric)
    allowed: float | None = None
    text = "not gated"
    if limit == AUTO:
        floors = [(f.std, f.n, which) for f, which in ((base_noise, "base"), (new_noise, "new")) if f is not None]
        if floors:
            std, n, which = max(floors)
            allowed = noise_k * std
            text = f"{fmt(allowed)} (= {noise_k:g}σ, σ={fmt(std, 3)} over {n} seeds in {which})"
        else:
            text = "not gated (no noise estimate)"
    elif limit is not None:
        allowed = float(limit)
        text = fmt(allowed)
    if direction == UNKNOWN:
        allowed, text = None, "not gated (direction unknown)"
    return MetricRow(arm=arm, metric=metric, base=gap_to_fp32(base, arm, metric), new=gap_to_fp32(new, arm, metric),
                     allowed=allowed, limit_text=text, base_noise=base_noise, new_noise=new_noise,
                     direction=direction)


def _noise_notes(base: AuditResult, new: AuditResult, metrics: Sequence[str], tolerance_given: bool) -> list[Check]:
    """One note with fp32's seed noise per metric in base and new, or that there is no noise estimate."""
    def floor_text(floor: NoiseFloor | None) -> str:
        return f"{fmt(floor.std, 3)} ({floor.n} seeds)" if floor else "none"

    parts = []
    for metric in dict.fromkeys(metrics):
        b, n = fp32_noise(base, metric), fp32_noise(new, metric)
        if b or n:
            parts.append(f"{metric} {floor_text(b)} → {floor_text(n)}")
    if parts:
        return [_note("", "noise", f"fp32 seed noise σ, base → new: {'; '.join(parts)}.")]
    if tolerance_given:  # without a tolerance the note on what is gated already says so
        return [_note("", "noise", "No noise estimate in base or new (run with --seeds K).")]
    return []


def _note(arm: str, subject: str, message: str) -> Check:
    return Check(arm=arm, subject=subject, outcome=NOTE, message=message)


def _names(arms: Mapping[str, Any]) -> str:
    return ", ".join(arms) or "no arms"


def _identity(result: AuditResult) -> dict[str, Any]:
    env = result.env
    return {
        "task": result.task, "created": result.created, "task_sha256": env.get("task_sha256"),
        "mpaudit_version": result.mpaudit_version or env.get("mpaudit_version"),
        "torch_version": env.get("torch_version"), "device": env.get("device"),
        "device_name": env.get("device_name"), "steps": result.config.get("steps"), "seeds": len(result.seeds),
    }


_ENV_KEYS = ("device", "device_name", "torch_version", "mpaudit_version", "threads")
_CONFIG_KEYS = ("steps", "epochs", "fp16_cpu", "tf32", "device", "clip_grad_norm", "grad_accumulation", "scheduler",
                "custom_step")


def _context_notes(base: AuditResult, new: AuditResult) -> list[Check]:
    """Notes on what differs around the arms: the task file, the machine, the run settings, fingerprints."""
    notes = []
    if base.task != new.task:
        notes.append(_note("", "task", f"The results are of different tasks ({base.task} and {new.task}); "
                                       "compared anyway."))
    sha_b, sha_n = base.env.get("task_sha256"), new.env.get("task_sha256")
    if sha_b and sha_n:
        if sha_b != sha_n:
            notes.append(_note("", "task", f"The task file changed (sha256 {sha_b[:12]} → {sha_n[:12]}); the "
                                           "comparison shows how the change moved each arm's gap to fp32."))
        else:
            notes.append(_note("", "task", f"Same task file in both (sha256 {sha_n[:12]})."))
    else:
        missing = " and ".join(w for w, s in (("base", sha_b), ("new", sha_n)) if not s)
        notes.append(_note("", "task", f"{missing} records no task_sha256: cannot tell whether the task file "
                                       "changed."))
    env_diff = [f"{k} {base.env.get(k)} → {new.env.get(k)}" for k in _ENV_KEYS
                if k in base.env and k in new.env and base.env[k] != new.env[k]]
    if env_diff:
        notes.append(_note("", "env", f"The environment differs: {'; '.join(env_diff)}."))
    cfg_diff = [f"{k} {base.config.get(k)} → {new.config.get(k)}" for k in _CONFIG_KEYS
                if k in base.config and k in new.config and base.config[k] != new.config[k]]
    if len(base.seeds) != len(new.seeds):
        cfg_diff.append(f"seeds {len(base.seeds)} → {len(new.seeds)}")
    if cfg_diff:
        notes.append(_note("", "config", f"The run settings differ: {'; '.join(cfg_diff)}."))
    for which, result in (("base", base), ("new", new)):
        if not result.fingerprints_match:
            notes.append(_note("", "fingerprints", f"In {which} the arms did not start from identical weights and "
                                                   "batches, so its gaps to fp32 are not meaningful."))
    return notes


def _status_checks(row: ArmRow) -> list[Check]:
    b, n = row.base_status, row.new_status
    if b == OK and n != OK:
        why = f": {cut(row.new_error)}" if row.new_error else ""
        return [Check(row.arm, "status", REGRESSION, f"{row.arm} {n} in new (it was ok in base){why}.")]
    if b != OK and n == OK:
        return [Check(row.arm, "status", IMPROVEMENT, f"{row.arm} finished ok in new (it {b} in base).")]
    if b != OK:
        return [_note(row.arm, "status", f"{row.arm} {b} in base and {n} in new.")]
    return [Check(row.arm, "status", OK, f"{row.arm} finished ok in both.")]


def gap_text(gap: Gap) -> str:
    text = f"{gap.delta:+.4g}"
    return text + (f" [{gap.low:+.3g}, {gap.high:+.3g}]" if gap.seeds > 1 else "")


def _metric_checks(row: ArmRow) -> list[Check]:
    checks = []
    for m in row.metrics:
        if m.allowed is None:
            continue
        subject = f"gap {m.metric}"
        if m.base is None or m.new is None:
            missing = " and ".join(w for w, g in (("base", m.base), ("new", m.new)) if g is None)
            checks.append(_note(row.arm, subject, f"{row.arm} {m.metric}: no gap to fp32 in {missing} (an arm did "
                                                  "not finish or lacks the metric), so its growth is unknown."))
            continue
        outcome = m.outcome or OK
        growth = m.growth if m.growth is not None else math.nan
        moved = (f"grew by {fmt(growth)}" if growth > 0 else
                 f"shrank by {fmt(-growth)}" if growth < 0 else "did not change")
        where = {REGRESSION: "beyond", IMPROVEMENT: "beyond", OK: "within"}[outcome]
        checks.append(Check(row.arm, subject, outcome,
                            f"{row.arm} {m.metric}: the gap to fp32 {moved} ({gap_text(m.base)} → "
                            f"{gap_text(m.new)}), {where} the allowed {m.limit_text}."))
    return checks


def _flag_key(flag: Flag) -> tuple[str, str, str]:
    return (flag.layer, flag.kind, flag.severity)


def _flag_changes(base_flags: Sequence[Flag], new_flags: Sequence[Flag], arm: str) -> tuple[list[Flag], list[Flag]]:
    """Flags of ``arm`` present only in new (appeared) and only in base (disappeared), by layer/kind/severity."""
    b = {_flag_key(f): f for f in base_flags if f.arm == arm}
    n = {_flag_key(f): f for f in new_flags if f.arm == arm}
    return [f for k, f in n.items() if k not in b], [f for k, f in b.items() if k not in n]


def _flag_checks(row: ArmRow) -> list[Check]:
    checks = [Check(row.arm, f"flag {f.kind} {f.layer}", REGRESSION,
                    f"{row.arm}: new error flag {f.kind} on layer {f.layer}"
                    + (f" ({cut(f.recommendation)})." if f.recommendation else "."))
              for f in row.flags_appeared if f.severity == ERROR]
    checks += [Check(row.arm, f"flag {f.kind} {f.layer}", IMPROVEMENT,
                     f"{row.arm}: error flag {f.kind} on layer {f.layer} is gone.")
               for f in row.flags_disappeared if f.severity == ERROR]
    if not any(c.outcome == REGRESSION for c in checks):
        checks.append(Check(row.arm, "flags", OK, f"{row.arm}: no new error flag."))
    others = [(f, "appeared") for f in row.flags_appeared if f.severity != ERROR]
    others += [(f, "disappeared") for f in row.flags_disappeared if f.severity != ERROR]
    if others:
        listed = "; ".join(f"{f.severity} {f.kind} on {f.layer} {verb}" for f, verb in others[:MAX_LISTED])
        more = f" and {len(others) - MAX_LISTED} more" if len(others) > MAX_LISTED else ""
        checks.append(_note(row.arm, "flags", f"{row.arm}: {listed}{more}."))
    return checks


def _arm_notes(b: ArmResult, n: ArmResult) -> list[Check]:
    notes = []
    if b.fp16_mode != n.fp16_mode and (b.fp16_mode or n.fp16_mode):
        notes.append(_note(n.name, "fp16_mode", f"{n.name} ran fp16 as {b.fp16_mode or 'unrecorded'} in base and "
                                                f"{n.fp16_mode or 'unrecorded'} in new."))
    bs, ns = (b.loss_scale.skipped if b.loss_scale else None), (n.loss_scale.skipped if n.loss_scale else None)
    if bs is not None and ns is not None and bs != ns:
        notes.append(_note(n.name, "skipped", f"{n.name} skipped {bs} of {b.steps} steps in base and {ns} of "
                                              f"{n.steps} in new (GradScaler found inf/NaN gradients)."))
    return notes


# ------------------------------------------------------------------------------------------ speed, memory


def _bench_speedups(result: AuditResult) -> dict[str, Any]:
    """``result.speedups`` where the result carries benchmark speedups (newer results), else empty."""
    speedups = getattr(result, "speedups", None)
    return dict(speedups) if speedups else {}


def _point(speedup: Any) -> SpeedPoint:
    def opt(name: str) -> float | None:
        x = getattr(speedup, name, None)
        return None if x is None else float(x)

    return SpeedPoint(ratio=float(speedup.ratio), ci_low=opt("ci_low"), ci_high=opt("ci_high"),
                      verdict=getattr(speedup, "verdict", None))


def _loop_speedup(result: AuditResult, arm: str) -> SpeedPoint | None:
    """fp32's median training-loop step time over the arm's; None without step times."""
    base, this = result.arms.get(BASELINE), result.arms.get(arm)
    if base is None or this is None or base.speed is None or this.speed is None:
        return None
    b, a = base.speed.step_s_median, this.speed.step_s_median
    return SpeedPoint(ratio=b / a) if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 else None


def _same(base: AuditResult, new: AuditResult, keys: Sequence[str]) -> bool:
    return all(base.env.get(k) == new.env.get(k) for k in keys)


def _compare_speed(base: AuditResult, new: AuditResult, common: Sequence[str],
                   tolerance: float) -> tuple[list[SpeedRow], list[Check]]:
    bench_b, bench_n = _bench_speedups(base), _bench_speedups(new)
    same_machine = _same(base, new, ("device", "device_name"))
    rows, checks = [], []
    for name in [k for k in bench_n if k in bench_b]:
        row = SpeedRow(name=name, base=_point(bench_b[name]), new=_point(bench_n[name]), source=_SPEED_BENCHMARK,
                       gated=same_machine)
        rows.append(row)
        checks.append(_speed_check(row, tolerance))
    if rows and not same_machine:
        checks.append(_note("", "speedup", "Speedups were measured on different machines "
                                           f"({base.env.get('device_name')} and {new.env.get('device_name')}): "
                                           "shown, not gated."))
    if rows:
        return rows, checks
    missing = [w for w, s in (("base", bench_b), ("new", bench_n)) if not s]
    why = f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no benchmark speedups"
    for name in common:
        if name == BASELINE:
            continue
        b, n = _loop_speedup(base, name), _loop_speedup(new, name)
        if b is not None and n is not None:
            rows.append(SpeedRow(name=name, base=b, new=n, source=_SPEED_TRAIN_LOOP, gated=False))
    if rows:
        checks.append(_note("", "speedup", f"Speed: {why}; speedups from training-loop step times (no interval) "
                                           "are shown, not gated."))
    else:
        checks.append(_note("", "speedup", f"Speed not compared: {why} and not both have step times."))
    return rows, checks


def ratio_text(p: SpeedPoint) -> str:
    text = f"{p.ratio:.3g}×"
    if p.ci_low is not None and p.ci_high is not None:
        text += f" (95% CI {p.ci_low:.3g}–{p.ci_high:.3g})"
    return text


def _speed_check(row: SpeedRow, tolerance: float) -> Check:
    b, n = row.base, row.new
    if not row.gated:
        return _note(row.name, "speedup", f"{row.name} speedup {ratio_text(b)} → {ratio_text(n)}.")
    both_ci = None not in (b.ci_low, b.ci_high, n.ci_low, n.ci_high)
    below = not both_ci or (n.ci_high or 0.0) < (b.ci_low or 0.0)
    above = not both_ci or (n.ci_low or 0.0) > (b.ci_high or 0.0)
    change = f"{ratio_text(b)} → {ratio_text(n)}, {row.change:+.0%}"
    if n.ratio < b.ratio * (1 - tolerance) and below:
        return Check(row.name, "speedup", REGRESSION,
                     f"{row.name} speedup fell ({change}), more than the allowed {tolerance:.0%}"
                     + (" with the intervals apart." if both_ci else "."))
    if n.ratio > b.ratio * (1 + tolerance) and above:
        return Check(row.name, "speedup", IMPROVEMENT, f"{row.name} speedup rose ({change}).")
    return Check(row.name, "speedup", OK, f"{row.name} speedup {change}: within {tolerance:.0%} or noise.")


def _peak(arm: ArmResult | None) -> int | None:
    """The arm's measured peak bytes of one training step (newer results), None when absent or failed."""
    memory = getattr(arm, "memory", None)
    if memory is None or getattr(memory, "error", None):
        return None
    peak = getattr(memory, "peak_bytes", None)
    return None if peak is None else int(peak)


def _compare_memory(base: AuditResult, new: AuditResult, common: Sequence[str],
                    tolerance: float) -> tuple[list[MemoryRow], list[Check]]:
    fp32_b, fp32_n = _peak(base.arms.get(BASELINE)), _peak(new.arms.get(BASELINE))
    gated = _same(base, new, ("device",))
    rows, checks = [], []
    for name in common:
        b, n = _peak(base.arms[name]), _peak(new.arms[name])
        if b is None or n is None:
            continue
        row = MemoryRow(arm=name, base_peak_bytes=b, new_peak_bytes=n,
                        base_fraction=b / fp32_b if fp32_b else None, new_fraction=n / fp32_n if fp32_n else None)
        rows.append(row)
        if name == BASELINE or row.base_fraction is None or row.new_fraction is None:
            continue
        text = (f"{name} peak memory {byte_size(b)} ({row.base_fraction:.0%} of fp32) → {byte_size(n)} "
                f"({row.new_fraction:.0%} of fp32)")
        growth = row.new_fraction - row.base_fraction
        if not gated:
            checks.append(_note(name, "memory", f"{text}; different devices, not gated."))
        elif growth > tolerance:
            checks.append(Check(name, "memory", REGRESSION,
                                f"{text}: it saves less than before, beyond the allowed {tolerance:.0%} of fp32."))
        elif growth < -tolerance:
            checks.append(Check(name, "memory", IMPROVEMENT, f"{text}: it saves more than before."))
        else:
            checks.append(Check(name, "memory", OK, f"{text}: within {tolerance:.0%} of fp32."))
    if not rows:
        missing = [w for w, r in (("base", base), ("new", new)) if not any(_peak(a) for a in r.arms.values())]
        who = " and ".join(missing) or "no arm both results ran"
        checks.append(_note("", "memory", f"Peak memory not compared: {who} "
                                          f"{'records' if len(missing) == 1 else 'record'} no peak memory."))
    return rows, checks


def to_dict(c: Comparison) -> dict[str, Any]:
    """JSON-ready data for ``mpaudit compare --json`` (derived lists and the exit code first)."""
    out: dict[str, Any] = to_plain(c)
    return {"exit_code": out.pop("exit_code"), "comparable": out.pop("comparable"), **out}
