"""The one result model every renderer, the gate and ``compare`` read: plain frozen dataclasses.

``AuditResult.to_json()`` writes the versioned ``report.json`` (documented in the README) and
``AuditResult.from_json()`` reads it back, so a report can be re-rendered or gated without torch
objects. Non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
(strict JSON has no literal for them) and read back as floats. Derived numbers (``final_loss``,
``loss_scale.skipped``, ``fingerprints_match``) are written for readers outside Python but are
computed properties here, never stored twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import pandas as pd

from mpaudit.errors import ResultError
from mpaudit.numerics.layerstats import TraceSummary
from mpaudit.results.codec import decode_float, encode_float
from mpaudit.results.perf import MemoryResult, SpeedResult, Speedup, activation_savings

SCHEMA_VERSION = 1
"""Bumped whenever a key CI scripts read changes meaning or moves; readers accept every older version."""

STATUSES = ("ok", "diverged", "failed")
FINAL_LOSS_WINDOW = 0.1
"""``final_loss`` is the mean training loss over this last fraction of steps (at least one step)."""

def to_jsonable(obj: Any) -> Any:
    """Plain JSON-ready data from dataclasses, dicts, lists and floats (non-finite as strings)."""
    if is_dataclass(obj) and type(obj).__module__ != __name__ and callable(getattr(obj, "to_dict", None)):
        return to_jsonable(obj.to_dict())  # type: ignore[union-attr]  # perf and trace results serialise themselves
    if is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
        for name in getattr(type(obj), "_derived", ()):
            out[name] = to_jsonable(getattr(obj, name))
        return out
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return encode_float(obj)
    return obj


@dataclass(frozen=True)
class LossScale:
    """GradScaler trajectory of an fp16 arm: the scale in force at each step and the skipped steps."""

    history: list[float]
    skipped_steps: list[int]

    _derived = ("skipped",)

    @property
    def skipped(self) -> int:
        return len(self.skipped_steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossScale:
        return cls(history=[decode_float(x) for x in d["history"]], skipped_steps=[int(s) for s in d["skipped_steps"]])


@dataclass(frozen=True)
class Fingerprints:
    """Hashes of an arm's initial weights and first training batches; equal across arms or the comparison is void."""

    weights: str
    batches: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprints:
        return cls(weights=str(d["weights"]), batches=str(d["batches"]))


@dataclass(frozen=True)
class ArmResult:
    """What one arm did: status, per-step losses, final metrics, loss-scale history, fingerprints."""

    name: str
    status: str
    loss: list[float]
    metrics: dict[str, float]
    steps: int
    train_s: float
    error: str | None = None
    loss_scale: LossScale | None = None
    fingerprints: Fingerprints | None = None
    train_step_s: float | None = None
    speed: SpeedResult | None = None
    memory: MemoryResult | None = None
    fp16_mode: str | None = None
    autocast_policy: str | None = None
    """Whose autocast op lists the arm followed (``cuda`` or ``cpu``); None for fp32 and older results."""
    notes: list[str] = field(default_factory=list)
    trace: TraceSummary | None = None

    _derived = ("final_loss",)

    @property
    def final_loss(self) -> float | None:
        """Mean training loss over the last :data:`FINAL_LOSS_WINDOW` of steps; None without steps."""
        if not self.loss:
            return None
        n = max(1, math.ceil(len(self.loss) * FINAL_LOSS_WINDOW))
        tail = self.loss[-n:]
        return sum(tail) / len(tail)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArmResult:
        return cls(
            name=str(d["name"]),
            status=str(d["status"]),
            loss=[decode_float(x) for x in d.get("loss", [])],
            metrics={str(k): decode_float(v) for k, v in d.get("metrics", {}).items()},
            steps=int(d.get("steps", len(d.get("loss", [])))),
            train_s=decode_float(d.get("train_s", math.nan)),
            error=d.get("error"),
            loss_scale=LossScale.from_dict(d["loss_scale"]) if d.get("loss_scale") else None,
            fingerprints=Fingerprints.from_dict(d["fingerprints"]) if d.get("fingerprints") else None,
            train_step_s=None if d.get("train_step_s") is None else decode_float(d["train_step_s"]),
            speed=SpeedResult.from_dict(d["speed"]) if d.get("speed") else None,
            memory=MemoryResult.from_dict(d["memory"]) if d.get("memory") else None,
            fp16_mode=d.get("fp16_mode"),
            autocast_policy=d.get("autocast_policy"),
            notes=[str(n) for n in d.get("notes", [])],
            trace=TraceSummary.from_dict(d["trace"]) if d.get("trace") else None,
        )


@dataclass(frozen=True)
class Flag:
    """A rule that fired: which layer, in which arm, what kind, how bad, the numbers, and what to do."""

    layer: str
    arm: str
    kind: str
    severity: str
    evidence: dict[str, Any]
    recommendation: str
    rule: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Flag:
        return cls(
            layer=str(d["layer"]),
            arm=str(d["arm"]),
            kind=str(d["kind"]),
            severity=str(d["severity"]),
            evidence=dict(d.get("evidence", {})),
            recommendation=str(d.get("recommendation", "")),
            rule=str(d.get("rule", "")),
        )


@dataclass(frozen=True)
class Recommendation:
    """A change to one arm's recipe, tried by training it: the modules to keep in fp32 and/or the
    GradScaler's initial scale, the extra arm that tested it, whether it passed, and why."""

    arm: str
    keep_fp32: list[str]
    init_scale: float | None
    verified_arm: str | None
    passed: bool
    metrics: dict[str, float]
    runs_used: int
    reason: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recommendation:
        return cls(
            arm=str(d["arm"]),
            keep_fp32=[str(p) for p in d.get("keep_fp32", [])],
            init_scale=None if d.get("init_scale") is None else decode_float(d["init_scale"]),
            verified_arm=None if d.get("verified_arm") is None else str(d["verified_arm"]),
            passed=bool(d.get("passed", False)),
            metrics={str(k): decode_float(v) for k, v in d.get("metrics", {}).items()},
            runs_used=int(d.get("runs_used", 0)),
            reason=str(d.get("reason", "")),
        )


@dataclass(frozen=True)
class RankFailure:
    """The rank of a distributed audit that failed first, the arm (or phase) it was in, and its error."""

    rank: int
    arm: str | None
    error: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankFailure:
        return cls(rank=int(d["rank"]), arm=None if d.get("arm") is None else str(d["arm"]), error=str(d["error"]))


@dataclass(frozen=True)
class DistributedInfo:
    """How a distributed audit ran: world size, backend, parallelism, and every rank's speed and memory.

    ``arms.<name>.speed`` holds the slowest rank's timings (rank ``speed_rank``) and ``arms.<name>.memory``
    the rank with the highest peak; the per-rank lists here are in rank order.
    """

    world_size: int
    backend: str
    parallel: str
    step_s_per_rank: dict[str, list[float]] = field(default_factory=dict)
    """Median step time of each timed arm on each rank, seconds."""
    speed_rank: int | None = None
    peak_bytes_per_rank: dict[str, list[int]] = field(default_factory=dict)
    job_samples_per_s: dict[str, float] = field(default_factory=dict)
    """Training samples per second of the whole job per arm: every rank's batch at the slowest rank's pace."""
    failure: RankFailure | None = None

    _derived = ("peak_bytes_max", "peak_bytes_mean")

    @property
    def peak_bytes_max(self) -> dict[str, int]:
        """Per arm, the highest peak over ranks."""
        return {k: max(v) for k, v in self.peak_bytes_per_rank.items() if v}

    @property
    def peak_bytes_mean(self) -> dict[str, float]:
        """Per arm, the mean peak over ranks."""
        return {k: sum(v) / len(v) for k, v in self.peak_bytes_per_rank.items() if v}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistributedInfo:
        return cls(
            world_size=int(d["world_size"]),
            backend=str(d.get("backend", "")),
            parallel=str(d.get("parallel", "")),
            step_s_per_rank={str(k): [decode_float(x) for x in v] for k, v in d.get("step_s_per_rank", {}).items()},
            speed_rank=None if d.get("speed_rank") is None else int(d["speed_rank"]),
            peak_bytes_per_rank={str(k): [int(x) for x in v] for k, v in d.get("peak_bytes_per_rank", {}).items()},
            job_samples_per_s={str(k): decode_float(v) for k, v in d.get("job_samples_per_s", {}).items()},
            failure=None if d.get("failure") is None else RankFailure.from_dict(d["failure"]),
        )


@dataclass(frozen=True)
class LayerError:
    """The error one layer introduces in an arm (its fp32 inputs run at the arm's precision) and the error
    accumulated up to it (the whole model at the arm's precision), against fp32: SQNR in dB and relative."""

    layer: str
    sqnr_db: float
    rel_error: float
    drift_sqnr_db: float
    drift_rel_error: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerError:
        return cls(layer=str(d["layer"]), sqnr_db=decode_float(d["sqnr_db"]), rel_error=decode_float(d["rel_error"]),
                   drift_sqnr_db=decode_float(d["drift_sqnr_db"]), drift_rel_error=decode_float(d["drift_rel_error"]))


@dataclass(frozen=True)
class NoiseFloor:
    """Seed-to-seed spread of one fp32 metric over ``n`` seeds: what "no real change" looks like."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseFloor:
        return cls(mean=decode_float(d["mean"]), std=decode_float(d["std"]), min=decode_float(d["min"]),
                   max=decode_float(d["max"]), n=int(d["n"]))


@dataclass(frozen=True)
class GateCheck:
    """One comparison of an arm against the fp32 baseline under a limit given by the user."""

    arm: str
    metric: str
    kind: str
    limit: float
    passed: bool
    message: str
    baseline: float | None = None
    value: float | None = None
    delta: float | None = None
    delta_low: float | None = None
    delta_high: float | None = None
    seeds: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateCheck:
        def opt(k: str) -> float | None:
            return None if d.get(k) is None else decode_float(d[k])

        return cls(
            arm=str(d["arm"]),
            metric=str(d["metric"]),
            kind=str(d["kind"]),
            limit=decode_float(d["limit"]),
            passed=bool(d["passed"]),
            message=str(d.get("message", "")),
            baseline=opt("baseline"),
            value=opt("value"),
            delta=opt("delta"),
            delta_low=opt("delta_low"),
            delta_high=opt("delta_high"),
            seeds=int(d.get("seeds", 1)),
        )


@dataclass(frozen=True)
class Gate:
    """The CI gate: every check, and whether all passed (true when no gate was asked for)."""

    checks: list[GateCheck] = field(default_factory=list)
    max_drop: dict[str, float | str] = field(default_factory=dict)
    max_loss_gap: float | None = None
    noise_floor: dict[str, NoiseFloor] = field(default_factory=dict)
    noise_k: float | None = None

    _derived = ("passed", "given")

    @property
    def given(self) -> bool:
        return bool(self.max_drop) or self.max_loss_gap is not None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        mlg = d.get("max_loss_gap")
        k = d.get("noise_k")
        return cls(
            checks=[GateCheck.from_dict(c) for c in d.get("checks", [])],
            max_drop={str(m): (v if v == "auto" else decode_float(v)) for m, v in d.get("max_drop", {}).items()},
            max_loss_gap=None if mlg is None else decode_float(mlg),
            noise_floor={str(m): NoiseFloor.from_dict(v) for m, v in d.get("noise_floor", {}).items()},
            noise_k=None if k is None else decode_float(k),
        )


@dataclass(frozen=True)
class AuditResult:
    """Everything one ``mpaudit run`` found. Renderers read only this."""

    task: str
    env: dict[str, Any]
    config: dict[str, Any]
    arms: dict[str, ArmResult]
    gate: Gate = field(default_factory=Gate)
    flags: list[Flag] = field(default_factory=list)
    replicates: dict[str, list[ArmResult]] = field(default_factory=dict)
    speedups: dict[str, Speedup] = field(default_factory=dict)
    compiled: dict[str, SpeedResult] = field(default_factory=dict)
    max_batch: dict[str, int] = field(default_factory=dict)
    perf_notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    verification: dict[str, ArmResult] = field(default_factory=dict)
    layer_errors: dict[str, list[LayerError]] = field(default_factory=dict)
    distributed: DistributedInfo | None = None
    """Set when the audit ran on several ranks (``torchrun``): world size, backend, per-rank figures."""
    created: str = ""
    mpaudit_version: str = ""
    schema_version: int = SCHEMA_VERSION

    _derived = ("fingerprints_match", "activation_savings")

    @property
    def activation_savings(self) -> dict[str, float]:
        """Fraction of fp32's activation memory each mixed-precision arm saves (the part autocast shrinks)."""
        return activation_savings({n: a.memory for n, a in self.arms.items() if a.memory is not None})

    @property
    def seeds(self) -> list[int]:
        """Every seed an arm was trained with: the main seed first, then the noise-floor replicates."""
        return [int(s) for s in self.config.get("seeds", [self.env.get("seed", 0)])]

    def runs(self, arm: str) -> list[ArmResult]:
        """All runs of ``arm``, one per seed (the main run first); empty when the arm did not run."""
        if arm not in self.arms:
            return []
        return [self.arms[arm], *self.replicates.get(arm, [])]

    @property
    def baseline(self) -> ArmResult | None:
        """The fp32 arm, when it ran and finished (ok or diverged)."""
        arm = self.arms.get("fp32")
        return arm if arm is not None and arm.status != "failed" else None

    @property
    def primary_metric(self) -> str | None:
        """The first key ``evaluate`` returned (the primary metric), if any arm has metrics."""
        for arm in self.arms.values():
            if arm.metrics:
                return next(iter(arm.metrics))
        return None

    def layers(self) -> pd.DataFrame:
        """The per-layer table of every traced arm: one row per arm × layer × tensor (``layers.csv``).

        Gradient what-if columns are at the scale each arm actually trained with (fp16: the loss scale)."""
        frames = [a.trace.to_frame().assign(arm=name) for name, a in self.arms.items() if a.trace is not None]
        if not frames:
            return pd.DataFrame()
        frame = pd.concat(frames, ignore_index=True)
        return frame[["arm", *[c for c in frame.columns if c != "arm"]]]

    @property
    def fingerprints_match(self) -> bool:
        """True when every arm that started saw the same initial weights and first batches."""
        prints = {(a.fingerprints.weights, a.fingerprints.batches) for a in self.arms.values() if a.fingerprints}
        return len(prints) <= 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = to_jsonable(self)
        # schema_version first, for humans reading the file
        return {"schema_version": d.pop("schema_version"), **d}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditResult:
        if not isinstance(d, dict) or "schema_version" not in d:
            raise ResultError("This file is not an mpaudit result: it has no schema_version.")
        version = d["schema_version"]
        if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
            raise ResultError(
                f"This result has schema_version {version!r}, which this mpaudit (reads 1..{SCHEMA_VERSION}) "
                "does not know; upgrade mpaudit."
            )
        try:
            return cls(
                task=str(d["task"]),
                env=dict(d.get("env", {})),
                config=dict(d.get("config", {})),
                arms={k: ArmResult.from_dict(v) for k, v in d["arms"].items()},
                gate=Gate.from_dict(d.get("gate", {})),
                flags=[Flag.from_dict(f) for f in d.get("flags", [])],
                replicates={k: [ArmResult.from_dict(a) for a in v] for k, v in d.get("replicates", {}).items()},
                speedups={k: Speedup.from_dict(v) for k, v in d.get("speedups", {}).items()},
                compiled={k: SpeedResult.from_dict(v) for k, v in d.get("compiled", {}).items()},
                max_batch={str(k): int(v) for k, v in d.get("max_batch", {}).items()},
                perf_notes=[str(n) for n in d.get("perf_notes", [])],
                warnings=[str(w) for w in d.get("warnings", [])],
                recommendations=[Recommendation.from_dict(r) for r in d.get("recommendations", [])],
                verification={k: ArmResult.from_dict(v) for k, v in d.get("verification", {}).items()},
                layer_errors={k: [LayerError.from_dict(e) for e in v] for k, v in d.get("layer_errors", {}).items()},
                distributed=None if d.get("distributed") is None else DistributedInfo.from_dict(d["distributed"]),
                created=str(d.get("created", "")),
                mpaudit_version=str(d.get("mpaudit_version", "")),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResultError(f"This mpaudit result is malformed: {type(exc).__name__}: {exc}.") from exc

    @classmethod
    def from_json(cls, text: str) -> AuditResult:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ResultError(f"This file is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)
