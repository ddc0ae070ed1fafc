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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpaudit.arms import BASELINE
from mpaudit.ci.gate import AUTO, DEFAULT_NOISE_K, Limit, lower_is_better, noise_floor, t_interval
from mpaudit.errors import ResultError, UsageError
from mpaudit.results.model import ArmResult, AuditResult, Flag, NoiseFloor, to_jsonable

DEFAULT_SPEEDUP_TOLERANCE = 0.10
"""A benchmark speedup regresses when it shrinks by more than this fraction of the base ratio *and* the two
confidence intervals do not overlap, so timing noise on a busy machine alone never fails CI."""

DEFAULT_MEMORY_TOLERANCE = 0.05
"""A mixed-precision arm's peak memory, as a fraction of fp32's peak in the same result, may grow by this
much (0.05: five percent of fp32's peak) before it counts as a regression."""

FINAL_LOSS = "final_loss"
"""Pseudo-metric: the mean training loss over the last steps (``ArmResult.final_loss``), lower is better."""

ERROR_SEVERITY = "error"
"""The flag severity whose appearance is a regression."""

OUTCOMES = ("regression", "improvement", "ok", "note")
"""A check's outcome: got worse beyond tolerance, got better beyond it, within tolerance, or information."""

MAX_ERROR_CHARS = 200
"""Error messages quoted in a sentence are cut to their first line and this many characters."""

MAX_LISTED = 5
"""A note lists at most this many items (flags, ...) and counts the rest."""

EXIT_OK, EXIT_REGRESSION, EXIT_NOT_COMPARABLE = 0, 1, 2

_SPEED_BENCHMARK, _SPEED_TRAIN_LOOP = "benchmark", "train_loop"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class MetricRow:
    """How an arm's gap to fp32 on one metric changed from base to new, and what growth was allowed."""

    arm: str
    metric: str
    base: Gap | None
    new: Gap | None
    allowed: float | None
    """The largest growth of the gap that is not a regression; None when this metric is not gated."""
    limit_text: str
    base_noise: NoiseFloor | None = None
    new_noise: NoiseFloor | None = None

    _derived = ("lower_is_better", "growth", "outcome")

    @property
    def lower_is_better(self) -> bool:
        return self.metric == FINAL_LOSS or lower_is_better(self.metric)

    @property
    def growth(self) -> float | None:
        """How much further behind fp32 the arm fell from base to new (positive: worse); None if unknown."""
        if self.base is None or self.new is None:
            return None
        sign = 1.0 if self.lower_is_better else -1.0
        return sign * (self.new.delta - self.base.delta)

    @property
    def outcome(self) -> str | None:
        """``regression`` / ``improvement`` when the gap moved beyond the allowed growth, ``ok`` within it,
        None when not gated or unknown."""
        growth = self.growth
        if self.allowed is None or growth is None:
            return None
        if growth > self.allowed:
            return "regression"
        return "improvement" if growth < -self.allowed else "ok"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SpeedPoint:
    """One result's speedup of an arm over fp32 (>1: faster), with its interval when it was benchmarked."""

    ratio: float
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: str | None = None


@dataclass(frozen=True)
class SpeedRow:
    """An arm's speedup in base and in new. ``source`` is ``benchmark`` (interleaved rounds with an
    interval, gated) or ``train_loop`` (ratio of training-loop median step times, shown but never gated)."""

    name: str
    base: SpeedPoint
    new: SpeedPoint
    source: str
    gated: bool

    _derived = ("change",)

    @property
    def change(self) -> float:
        """Relative change of the speedup from base to new (-0.25: a quarter smaller)."""
        return self.new.ratio / self.base.ratio - 1.0 if self.base.ratio > 0 else math.nan


@dataclass(frozen=True)
class MemoryRow:
    """An arm's peak memory of one training step in base and in new, and as a fraction of fp32's peak."""

    arm: str
    base_peak_bytes: int
    new_peak_bytes: int
    base_fraction: float | None = None
    new_fraction: float | None = None


@dataclass(frozen=True)
class Check:
    """One thing compare judged, with its outcome (see :data:`OUTCOMES`) and one sentence for people."""

    arm: str
    """The arm it concerns; empty for the task as a whole."""
    subject: str
    """What was looked at: ``status``, ``gap accuracy``, ``speedup``, ``memory``, ``flags``, ``task``, ..."""
    outcome: str
    message: str


@dataclass(frozen=True)
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
    tolerance: dict[str, Limit] = field(default_factory=dict)
    noise_k: float = DEFAULT_NOISE_K
    speedup_tolerance: float = DEFAULT_SPEEDUP_TOLERANCE
    memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE

    _derived = ("regressions", "improvements", "notes", "exit_code")

    def _messages(self, outcome: str) -> list[str]:
        return [c.message for c in self.checks if c.outcome == outcome]

    @property
    def regressions(self) -> list[str]:
        """One sentence per thing that got worse beyond its tolerance."""
        return self._messages("regression")

    @property
    def improvements(self) -> list[str]:
        return self._messages("improvement")

    @property
    def notes(self) -> list[str]:
        """What changed without being judged, and what could not be compared (and why)."""
        return self._messages("note")

    @property
    def exit_code(self) -> int:
        """0 nothing got worse beyond tolerance, 1 something did, 2 not comparable (no arm in common)."""
        if not self.comparable:
            return EXIT_NOT_COMPARABLE
        return EXIT_REGRESSION if self.regressions else EXIT_OK


def _num(x: float | None, digits: int = 4) -> str:
    """A number for people, ``digits`` significant digits; None as a dash. (Not ``report.html.fmt``: the
    report package imports this module, and the reverse import would make a cycle.)"""
    return "–" if x is None else f"{x:.{digits}g}"


# ---------------------------------------------------------------------------------------------- reading


def load_result(path: str | Path) -> AuditResult:
    """Read a ``report.json`` of any known schema version; ResultError when missing, unreadable or unknown.

    Older and hand-trimmed files may lack every optional key; an arm entry without ``name`` takes its key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultError(f"Result file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultError(f"Result file {path} cannot be read: {exc}.") from None
    try:
        return result_from_json(text)
    except ResultError as exc:
        raise ResultError(f"{path}: {exc}") from None


def result_from_json(text: str) -> AuditResult:
    """``AuditResult.from_json`` that also accepts arm entries without their ``name`` (older, minimal files)."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultError(f"This file is not valid JSON: {exc}.") from exc
    if isinstance(data, dict):
        arms, replicates = data.get("arms"), data.get("replicates")
        named = [*(arms.items() if isinstance(arms, dict) else [])]
        for key, runs in replicates.items() if isinstance(replicates, dict) else []:
            named += [(key, run) for run in (runs if isinstance(runs, list) else [])]
        for key, entry in named:
            if isinstance(entry, dict):
                entry.setdefault("name", key)
    return AuditResult.from_dict(data)


# ------------------------------------------------------------------------------------------- arithmetic


def metric_value(arm: ArmResult, metric: str) -> float | None:
    """The arm's value of ``metric`` (``final_loss`` is the training loss); None when it has none."""
    return arm.final_loss if metric == FINAL_LOSS else arm.metrics.get(metric)


def gap_to_fp32(result: AuditResult, arm: str, metric: str) -> Gap | None:
    """The arm's mean paired difference to fp32 (arm − fp32) over the seeds where both finished ``ok`` with a
    finite value; None when no such pair exists (the arm or fp32 did not finish, or lacks the metric)."""
    deltas, values, baselines = [], [], []
    for base_run, arm_run in zip(result.runs(BASELINE), result.runs(arm), strict=False):
        if base_run.status != "ok" or arm_run.status != "ok":
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
    values = [v for run in result.runs(BASELINE) if run.status == "ok"
              for v in [metric_value(run, metric)] if v is not None and math.isfinite(v)]
    return noise_floor(values) if len(values) >= 2 else None


# ---------------------------------------------------------------------------------------------- compare


def compare(
    base: AuditResult,
    new: AuditResult,
    tolerance: Mapping[str, Limit] | None = None,
    speedup_tolerance: float = DEFAULT_SPEEDUP_TOLERANCE,
    noise_k: float = DEFAULT_NOISE_K,
    memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE,
) -> Comparison:
    """Compare two results of the same task (usually main vs a pull request) arm by arm.

    ``tolerance`` maps a metric (or ``final_loss``) to the largest allowed growth of an arm's gap to fp32,
    or to ``"auto"`` (``noise_k`` σ of the larger fp32 noise floor). UsageError for a tolerance naming a
    metric neither result has, a negative one, or ``auto`` when neither result has a noise estimate.
    """
    limits = _validated(tolerance or {}, base, new, speedup_tolerance, noise_k, memory_tolerance)
    checks = _context_notes(base, new)
    common = [name for name in new.arms if name in base.arms]
    only_base = [name for name in base.arms if name not in new.arms]
    only_new = [name for name in new.arms if name not in base.arms]
    if only_base:
        checks.append(_note("", "arms", f"Only base ran {', '.join(only_base)}; not compared."))
    if only_new:
        checks.append(_note("", "arms", f"Only new ran {', '.join(only_new)}; not compared."))
    settings: dict[str, Any] = {"tolerance": dict(limits), "noise_k": noise_k,
                                "speedup_tolerance": speedup_tolerance, "memory_tolerance": memory_tolerance}
    if not common:
        checks.append(_note("", "arms", f"Nothing to compare: base ran {_names(base.arms)} and new ran "
                                        f"{_names(new.arms)}, no arm in common."))
        return Comparison(task=new.task, base=_identity(base), new=_identity(new), arms=[], speed=[], memory=[],
                          checks=checks, comparable=False, **settings)

    gated = _gated_metrics(limits, base, new, noise_k, checks)
    if BASELINE not in common:
        checks.append(_note("", "gaps", "fp32 is not in both results, so no gap to fp32 could be compared."))
    rows = []
    for name in common:
        row = _arm_row(base, new, name, gated, noise_k)
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


def _validated(tolerance: Mapping[str, Limit], base: AuditResult, new: AuditResult, speedup_tolerance: float,
               noise_k: float, memory_tolerance: float) -> dict[str, Limit]:
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
                   checks: list[Check]) -> dict[str, Limit]:
    """The metrics whose gap growth is judged: the given tolerances, else the primary metric at ``auto``."""
    gated = dict(limits)
    if not gated:
        primary = new.primary_metric or base.primary_metric or FINAL_LOSS
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


def _arm_row(base: AuditResult, new: AuditResult, name: str, gated: Mapping[str, Limit], noise_k: float) -> ArmRow:
    b, n = base.arms[name], new.arms[name]
    rows: list[MetricRow] = []
    if name != BASELINE and BASELINE in base.arms and BASELINE in new.arms:
        rows = [_metric_row(base, new, name, metric, gated.get(metric), noise_k)
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
                noise_k: float) -> MetricRow:
    base_noise, new_noise = fp32_noise(base, metric), fp32_noise(new, metric)
    allowed: float | None = None
    text = "not gated"
    if limit == AUTO:
        floors = [(f.std, f.n, which) for f, which in ((base_noise, "base"), (new_noise, "new")) if f is not None]
        if floors:
            std, n, which = max(floors)
            allowed = noise_k * std
            text = f"{_num(allowed)} (= {noise_k:g}σ, σ={_num(std, 3)} over {n} seeds in {which})"
        else:
            text = "not gated (no noise estimate)"
    elif limit is not None:
        allowed = float(limit)
        text = _num(allowed)
    return MetricRow(arm=arm, metric=metric, base=gap_to_fp32(base, arm, metric), new=gap_to_fp32(new, arm, metric),
                     allowed=allowed, limit_text=text, base_noise=base_noise, new_noise=new_noise)


def _noise_notes(base: AuditResult, new: AuditResult, metrics: Sequence[str], tolerance_given: bool) -> list[Check]:
    """One note with fp32's seed noise per metric in base and new, or that there is no noise estimate."""
    def floor_text(floor: NoiseFloor | None) -> str:
        return f"{_num(floor.std, 3)} ({floor.n} seeds)" if floor else "none"

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
    return Check(arm=arm, subject=subject, outcome="note", message=message)


def _names(arms: Mapping[str, Any]) -> str:
    return ", ".join(arms) or "no arms"


def _short(text: str | None) -> str:
    """The first line of an error message, cut to :data:`MAX_ERROR_CHARS`."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"


def _identity(result: AuditResult) -> dict[str, Any]:
    env = result.env
    return {
        "task": result.task, "created": result.created, "task_sha256": env.get("task_sha256"),
        "mpaudit_version": result.mpaudit_version or env.get("mpaudit_version"),
        "torch_version": env.get("torch_version"), "device": env.get("device"),
        "device_name": env.get("device_name"), "steps": result.config.get("steps"), "seeds": len(result.seeds),
    }


_ENV_KEYS = ("device", "device_name", "torch_version", "mpaudit_version", "threads")
_CONFIG_KEYS = ("steps", "epochs", "fp16_cpu", "tf32", "device")


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
    if b == "ok" and n != "ok":
        why = f": {_short(row.new_error)}" if row.new_error else ""
        return [Check(row.arm, "status", "regression", f"{row.arm} {n} in new (it was ok in base){why}.")]
    if b != "ok" and n == "ok":
        return [Check(row.arm, "status", "improvement", f"{row.arm} finished ok in new (it {b} in base).")]
    if b != "ok":
        return [_note(row.arm, "status", f"{row.arm} {b} in base and {n} in new.")]
    return [Check(row.arm, "status", "ok", f"{row.arm} finished ok in both.")]


def _gap_text(gap: Gap) -> str:
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
        outcome = m.outcome or "ok"
        growth = m.growth if m.growth is not None else math.nan
        moved = (f"grew by {_num(growth)}" if growth > 0 else
                 f"shrank by {_num(-growth)}" if growth < 0 else "did not change")
        where = {"regression": "beyond", "improvement": "beyond", "ok": "within"}[outcome]
        checks.append(Check(row.arm, subject, outcome,
                            f"{row.arm} {m.metric}: the gap to fp32 {moved} ({_gap_text(m.base)} → "
                            f"{_gap_text(m.new)}), {where} the allowed {m.limit_text}."))
    return checks


def _flag_key(flag: Flag) -> tuple[str, str, str]:
    return (flag.layer, flag.kind, flag.severity)


def _flag_changes(base_flags: Sequence[Flag], new_flags: Sequence[Flag], arm: str) -> tuple[list[Flag], list[Flag]]:
    """Flags of ``arm`` present only in new (appeared) and only in base (disappeared), by layer/kind/severity."""
    b = {_flag_key(f): f for f in base_flags if f.arm == arm}
    n = {_flag_key(f): f for f in new_flags if f.arm == arm}
    return [f for k, f in n.items() if k not in b], [f for k, f in b.items() if k not in n]


def _flag_checks(row: ArmRow) -> list[Check]:
    checks = [Check(row.arm, f"flag {f.kind} {f.layer}", "regression",
                    f"{row.arm}: new error flag {f.kind} on layer {f.layer}"
                    + (f" ({_short(f.recommendation)})." if f.recommendation else "."))
              for f in row.flags_appeared if f.severity == ERROR_SEVERITY]
    checks += [Check(row.arm, f"flag {f.kind} {f.layer}", "improvement",
                     f"{row.arm}: error flag {f.kind} on layer {f.layer} is gone.")
               for f in row.flags_disappeared if f.severity == ERROR_SEVERITY]
    if not any(c.outcome == "regression" for c in checks):
        checks.append(Check(row.arm, "flags", "ok", f"{row.arm}: no new error flag."))
    others = [(f, "appeared") for f in row.flags_appeared if f.severity != ERROR_SEVERITY]
    others += [(f, "disappeared") for f in row.flags_disappeared if f.severity != ERROR_SEVERITY]
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


def _ratio_text(p: SpeedPoint) -> str:
    text = f"{p.ratio:.3g}×"
    if p.ci_low is not None and p.ci_high is not None:
        text += f" (95% CI {p.ci_low:.3g}–{p.ci_high:.3g})"
    return text


def _speed_check(row: SpeedRow, tolerance: float) -> Check:
    b, n = row.base, row.new
    if not row.gated:
        return _note(row.name, "speedup", f"{row.name} speedup {_ratio_text(b)} → {_ratio_text(n)}.")
    both_ci = None not in (b.ci_low, b.ci_high, n.ci_low, n.ci_high)
    below = not both_ci or (n.ci_high or 0.0) < (b.ci_low or 0.0)
    above = not both_ci or (n.ci_low or 0.0) > (b.ci_high or 0.0)
    change = f"{_ratio_text(b)} → {_ratio_text(n)}, {row.change:+.0%}"
    if n.ratio < b.ratio * (1 - tolerance) and below:
        return Check(row.name, "speedup", "regression",
                     f"{row.name} speedup fell ({change}), more than the allowed {tolerance:.0%}"
                     + (" with the intervals apart." if both_ci else "."))
    if n.ratio > b.ratio * (1 + tolerance) and above:
        return Check(row.name, "speedup", "improvement", f"{row.name} speedup rose ({change}).")
    return Check(row.name, "speedup", "ok", f"{row.name} speedup {change}: within {tolerance:.0%} or noise.")


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
        text = (f"{name} peak memory {_bytes(b)} ({row.base_fraction:.0%} of fp32) → {_bytes(n)} "
                f"({row.new_fraction:.0%} of fp32)")
        growth = row.new_fraction - row.base_fraction
        if not gated:
            checks.append(_note(name, "memory", f"{text}; different devices, not gated."))
        elif growth > tolerance:
            checks.append(Check(name, "memory", "regression",
                                f"{text}: it saves less than before, beyond the allowed {tolerance:.0%} of fp32."))
        elif growth < -tolerance:
            checks.append(Check(name, "memory", "improvement", f"{text}: it saves more than before."))
        else:
            checks.append(Check(name, "memory", "ok", f"{text}: within {tolerance:.0%} of fp32."))
    if not rows:
        missing = [w for w, r in (("base", base), ("new", new)) if not any(_peak(a) for a in r.arms.values())]
        who = " and ".join(missing) or "no arm both results ran"
        checks.append(_note("", "memory", f"Peak memory not compared: {who} "
                                          f"{'records' if len(missing) == 1 else 'record'} no peak memory."))
    return rows, checks


def _bytes(n: float) -> str:
    """Bytes for people: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


# -------------------------------------------------------------------------------------------- renderers


def to_dict(c: Comparison) -> dict[str, Any]:
    """JSON-ready data for ``mpaudit compare --json`` (derived lists and the exit code included)."""
    out: dict[str, Any] = to_jsonable(c)
    return {"exit_code": out.pop("exit_code"), "comparable": out.pop("comparable"), **out}


def _verdict_line(c: Comparison) -> str:
    if not c.comparable:
        return "not comparable: no arm in common (exit 2)"
    n = len(c.regressions)
    if n:
        return f"{n} regression{'s' if n != 1 else ''} (exit 1)"
    return "no regression (exit 0)"


def _growth_text(m: MetricRow) -> str:
    g = m.growth
    if g is None:
        return "–"
    return "same" if g == 0 else f"{_num(abs(g), 3)} {'worse' if g > 0 else 'better'}"


def _metric_cells(m: MetricRow) -> list[str]:
    fp32 = " → ".join(_num(g.baseline) if g else "–" for g in (m.base, m.new))
    gaps = [_gap_text(g) if g else "–" for g in (m.base, m.new)]
    return [m.arm, m.metric, fp32, *gaps, _growth_text(m), m.limit_text, m.outcome or "–"]


_METRIC_HEADERS = ["arm", "metric", "fp32 base → new", "gap base", "gap new", "growth", "allowed", "verdict"]


def _status_cells(row: ArmRow) -> list[str]:
    status = row.base_status if row.base_status == row.new_status else f"{row.base_status} → {row.new_status}"
    skipped = ("–" if row.base_skipped is None and row.new_skipped is None
               else f"{row.base_skipped if row.base_skipped is not None else '–'}/{row.base_steps} → "
                    f"{row.new_skipped if row.new_skipped is not None else '–'}/{row.new_steps}")
    flags = (f"+{len(row.flags_appeared)} / -{len(row.flags_disappeared)}"
             if row.flags_appeared or row.flags_disappeared else "–")
    return [row.arm, status, skipped, flags]


_STATUS_HEADERS = ["arm", "status", "fp16 skipped steps", "flags new / gone"]


def _speed_cells(row: SpeedRow) -> list[str]:
    change = f"{row.change:+.0%}" if math.isfinite(row.change) else "–"
    return [row.name, _ratio_text(row.base), _ratio_text(row.new), change,
            row.source + ("" if row.gated else ", not gated")]


_SPEED_HEADERS = ["speedup vs fp32", "base", "new", "change", "source"]


def _memory_cells(row: MemoryRow) -> list[str]:
    def one(peak: int, frac: float | None) -> str:
        return _bytes(peak) + (f" ({frac:.0%} of fp32)" if frac is not None and row.arm != BASELINE else "")

    return [row.arm, one(row.base_peak_bytes, row.base_fraction), one(row.new_peak_bytes, row.new_fraction)]


_MEMORY_HEADERS = ["peak memory", "base", "new"]


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def _label(identity: Mapping[str, Any]) -> str:
    sha = identity.get("task_sha256")
    parts = [str(identity.get("created") or "undated"), f"sha256 {sha[:8]}" if sha else ""]
    return " ".join(p for p in parts if p)


def to_text(c: Comparison) -> str:
    """A plain-text report for the terminal: tables of status, gaps, speed and memory, then the verdicts."""
    out = [f"mpaudit compare: {c.task}  (base {_label(c.base)}  →  new {_label(c.new)})", ""]
    if c.arms:
        out += [_text_table(_STATUS_HEADERS, [_status_cells(r) for r in c.arms]), ""]
    metric_rows = [_metric_cells(m) for r in c.arms for m in r.metrics]
    if metric_rows:
        out += ["Gap to fp32 (arm − fp32; base → new):", _text_table(_METRIC_HEADERS, metric_rows), ""]
    if c.speed:
        out += [_text_table(_SPEED_HEADERS, [_speed_cells(r) for r in c.speed]), ""]
    if c.memory:
        out += [_text_table(_MEMORY_HEADERS, [_memory_cells(r) for r in c.memory]), ""]
    for title, items in (("REGRESSIONS", c.regressions), ("IMPROVEMENTS", c.improvements), ("NOTES", c.notes)):
        if items:
            out += [f"{title} ({len(items)})", *(f"  - {x}" for x in items), ""]
    out.append(f"result: {_verdict_line(c)}")
    return "\n".join(out) + "\n"


def to_markdown(c: Comparison) -> str:
    """GitHub-flavoured Markdown for a pull-request comment: the verdict first, then the tables."""
    # imported here: the Markdown renderer reads gaps from this module
    from mpaudit.report.markdown import md_escape, md_table

    icon = "❌" if c.exit_code == EXIT_REGRESSION else "⚠️" if not c.comparable else "✅"
    out = [f"### {icon} mpaudit compare: {md_escape(c.task)}: {_verdict_line(c)}", "",
           f"base {md_escape(_label(c.base))} → new {md_escape(_label(c.new))}", ""]
    if c.regressions:
        out += ["**Regressions**", "", *(f"- {md_escape(x)}" for x in c.regressions), ""]
    if c.improvements:
        out += ["**Improvements**", "", *(f"- {md_escape(x)}" for x in c.improvements), ""]
    if c.arms:
        out += [md_table(_STATUS_HEADERS, [_status_cells(r) for r in c.arms]), ""]
    metric_rows = [_metric_cells(m) for r in c.arms for m in r.metrics]
    if metric_rows:
        out += ["Gap to fp32 (arm − fp32), base → new:", "", md_table(_METRIC_HEADERS, metric_rows), ""]
    if c.speed:
        out += [md_table(_SPEED_HEADERS, [_speed_cells(r) for r in c.speed]), ""]
    if c.memory:
        out += [md_table(_MEMORY_HEADERS, [_memory_cells(r) for r in c.memory]), ""]
    if c.notes:
        out += ["<details><summary>Notes</summary>", "", *(f"- {md_escape(x)}" for x in c.notes), "", "</details>",
                ""]
    return "\n".join(out)
