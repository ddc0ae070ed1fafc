"""The one result model every renderer, the gate and ``compare`` read: frozen dataclasses, no torch.

``AuditResult.to_json()`` writes the versioned ``report.json`` (documented in the README) and
``AuditResult.from_json()`` reads it back, so a report can be re-rendered or gated without torch objects.
Serialisation is :mod:`mpaudit.results.codec`'s: non-finite floats are written as the strings ``"NaN"``,
``"Infinity"``, ``"-Infinity"`` and read back as floats; derived numbers (``final_loss``, ``loss_scale.skipped``,
``fingerprints_match``, ...) are written for readers outside Python but are computed properties here, never
stored twice. ``mpaudit schema`` prints the JSON Schema of ``report.json``.

When ``schema_version`` is bumped: when a key that CI scripts read changes meaning, changes type or moves.
Adding a key is not a bump (readers ignore keys they do not know; a missing key reads as its default), and
readers accept every older version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError, computed_field, model_validator
from pydantic.dataclasses import dataclass

from mpaudit.errors import ResultError
from mpaudit.numerics.fp8 import Fp8Trace
from mpaudit.numerics.layerstats import TraceSummary
from mpaudit.results.codec import RESULT_CONFIG, JsonFloat, dumps, from_plain, json_schema, to_plain
from mpaudit.results.perf import MemoryResult, SpeedResult, Speedup, activation_savings
from mpaudit.vocab import BASELINE, FAILED, FlagKind, MetricDirection, Severity, Status

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1
"""Bumped whenever a key CI scripts read changes meaning, type or place; readers accept every older version."""

FINAL_LOSS_WINDOW = 0.1
"""``final_loss`` is the mean training loss over this last fraction of steps (at least one step)."""


@dataclass(frozen=True, config=RESULT_CONFIG)
class LossScale:
    """GradScaler trajectory of an fp16 arm: the scale in force at each step and the skipped steps."""

    history: list[JsonFloat]
    skipped_steps: list[int]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def skipped(self) -> int:
        return len(self.skipped_steps)


@dataclass(frozen=True, config=RESULT_CONFIG)
class Fingerprints:
    """Hashes of an arm's initial weights and first training batches; equal across arms or the comparison is void."""

    weights: str
    batches: str


@dataclass(frozen=True, config=RESULT_CONFIG)
class Site:
    """Where an arm's trouble started: the first op whose inputs were finite and whose output was not.

    Found by replaying the first failing step (:mod:`mpaudit.trace.sites`). ``module`` is the innermost module
    whose forward was running (for a backward op: the module whose forward created its autograd node),
    ``(loss_fn)`` outside the model; ``source`` the ``file:line`` of the user's code that ran it and ``code`` that
    line; ``feeds`` the ops that ran next in the forward (does a softmax consume the overflowing scores?).
    """

    phase: Literal["forward", "backward"]
    module: str
    module_class: str
    op: str
    source: str
    code: str
    step: int
    dtype: str
    detail: str
    feeds: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        """``aten.bmm.default in block.attn (SelfAttention) at model.py:52`` for people."""
        cls = f" ({self.module_class})" if self.module_class else ""
        return f"{self.op} in {self.module}{cls}" + (f" at {self.short_source}" if self.source else "")

    @property
    def short_source(self) -> str:
        """``model.py:52``: the file's name and the line."""
        path, _, line = self.source.rpartition(":")
        return f"{Path(path).name}:{line}" if path else self.source


@dataclass(frozen=True, config=RESULT_CONFIG)
class ArmResult:
    """What one arm did: status, per-step losses, final metrics, loss-scale history, fingerprints."""

    name: str
    status: Status
    loss: list[JsonFloat] = field(default_factory=list, kw_only=True)
    metrics: dict[str, JsonFloat] = field(default_factory=dict, kw_only=True)
    steps: int = field(default=0, kw_only=True)
    train_s: JsonFloat = field(default=math.nan, kw_only=True)
    error: str | None = None
    loss_scale: LossScale | None = None
    fingerprints: Fingerprints | None = None
    train_step_s: JsonFloat | None = None
    speed: SpeedResult | None = None
    memory: MemoryResult | None = None
    fp16_mode: str | None = None
    autocast_policy: str | None = None
    """Whose autocast op lists the arm followed (``cuda`` or ``cpu``); None for fp32 and older results."""
    notes: list[str] = field(default_factory=list)
    trace: TraceSummary | None = None
    sites: list[Site] = field(default_factory=list)
    """Where the arm's first non-finite values came from (forward and/or backward), when a step failed."""
    recipe: str = ""
    """The arm's recipe in words (its keep-list and loss scale included), how a resumed audit recognises it."""
    resumed: bool = False
    """True when this run was kept from a saved result (``--resume``) instead of trained again."""
    observed: bool = False
    """True for a run mpaudit watched (:func:`mpaudit.watch`, the Trainer and Lightning callbacks) rather than
    trained itself: the user's own loop, one precision, no matched fp32 arm to compare with."""
    weights_dtype: str | None = None
    """The dtype the arm stored its weights, gradients and optimizer state in (``bfloat16`` for ``bf16-pure``); None
    for arms with fp32 (master) weights and older results."""
    fp32_master: list[str] = field(default_factory=list)
    """Modules of a half-weight arm whose parameters kept an fp32 master copy (a recommendation under test)."""
    update_rounding: str | None = None
    """How a half-weight arm rounded updates into its bf16 weights: ``stochastic``, ``kahan``, or None (to nearest)."""
    fp8_recipe: str | None = None
    """A float8 arm's scaling recipe (``tensorwise``, ``rowwise``, ``mxfp8``); None for other arms and older results."""
    fp8_mode: str | None = None
    """How a float8 arm's GEMMs ran: ``emulated`` (torchao's emulation on a CPU or a GPU without float8 units) or
    ``real`` (torchao's float8 kernels)."""
    fp8_layers: list[str] = field(default_factory=list)
    """The Linear layers a float8 arm converted to float8 (torchao's conversion, after its module filter)."""
    exclude_from_fp8: list[str] = field(default_factory=list)
    """The Linear layers a float8 arm kept out of float8 (a recommendation under test)."""
    fp8_casts: Fp8Trace | None = None
    """Float8 cast statistics per Linear layer, recipe, GEMM and operand on the traced steps: in the fp32 arm every
    recipe asked for and its alternative (the prediction), in a float8 arm its own recipe (its own tensors, cast with
    its own scales)."""

    @model_validator(mode="before")
    @classmethod
    def _older_files(cls, data: Any) -> Any:
        """Minimal and older files may leave out the step count: it is the number of losses."""
        if isinstance(data, dict) and "steps" not in data:
            data = {"steps": len(data.get("loss") or []), **data}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def final_loss(self) -> JsonFloat | None:
        """Mean training loss over the last :data:`FINAL_LOSS_WINDOW` of steps; None without steps."""
        if not self.loss:
            return None
        n = max(1, math.ceil(len(self.loss) * FINAL_LOSS_WINDOW))
        tail = self.loss[-n:]
        return sum(tail) / len(tail)


@dataclass(frozen=True, config=RESULT_CONFIG)
class Cause:
    """The flag another flag follows from: its layer and kind (same arm)."""

    layer: str
    kind: FlagKind


@dataclass(frozen=True, config=RESULT_CONFIG)
class Flag:
    """A rule that fired: which layer, in which arm, what kind, how bad, the numbers, and what to do.

    ``caused_by`` is None for a root cause; a consequence names the flag it follows from and carries no
    recommendation of its own. ``site`` says where the trouble started, down to the op and the line, when the
    failing step was replayed.
    """

    layer: str
    arm: str
    kind: FlagKind
    severity: Severity
    evidence: dict[str, Any]
    recommendation: str = ""
    rule: str = ""
    site: Site | None = None
    caused_by: Cause | None = None

    @property
    def is_root(self) -> bool:
        return self.caused_by is None


@dataclass(frozen=True, config=RESULT_CONFIG)
class Recommendation:
    """A change to one arm's recipe, tried by training it: the modules to keep in fp32 and/or the
    GradScaler's initial scale (autocast arms), the modules that keep an fp32 master copy and/or how updates are
    rounded into bf16 weights (half-weight arms), or the Linear layers kept out of float8 or another scaling recipe
    (float8 arms); the extra arm that tested it, whether it passed, and why."""

    arm: str
    keep_fp32: list[str] = field(default_factory=list)
    init_scale: JsonFloat | None = None
    fp32_master: list[str] = field(default_factory=list)
    """Modules whose parameters keep a persistent fp32 master copy the optimizer steps (``mpaudit.bf16_optimizer``)."""
    update_rounding: str | None = None
    """``stochastic`` or ``kahan``: how the other bf16 parameters' updates are rounded (``mpaudit.bf16_optimizer``)."""
    exclude_from_fp8: list[str] = field(default_factory=list)
    """Linear layers a float8 arm keeps out of float8 (torchao ``module_filter_fn``, torchtitan ``filter_fqns``)."""
    fp8_recipe: str | None = None
    """Another float8 scaling recipe for the arm (``rowwise`` for ``fp8``), tried as the alternative to a filter."""
    verified_arm: str | None = None
    passed: bool = False
    metrics: dict[str, JsonFloat] = field(default_factory=dict)
    runs_used: int = 0
    reason: str = ""


@dataclass(frozen=True, config=RESULT_CONFIG)
class RankFailure:
    """The rank of a distributed audit that failed first, the arm (or phase) it was in, and its error."""

    rank: int
    arm: str | None
    error: str


@dataclass(frozen=True, config=RESULT_CONFIG)
class DistributedInfo:
    """How a distributed audit ran: world size, backend, parallelism, and every rank's speed and memory.

    ``arms.<name>.speed`` holds the slowest rank's timings (rank ``speed_rank``) and ``arms.<name>.memory``
    the rank with the highest peak; the per-rank lists here are in rank order.
    """

    world_size: int
    backend: str = ""
    parallel: str = ""
    step_s_per_rank: dict[str, list[JsonFloat]] = field(default_factory=dict)
    """Median step time of each timed arm on each rank, seconds."""
    speed_rank: int | None = None
    peak_bytes_per_rank: dict[str, list[int]] = field(default_factory=dict)
    job_samples_per_s: dict[str, JsonFloat] = field(default_factory=dict)
    """Training samples per second of the whole job per arm: every rank's batch at the slowest rank's pace."""
    failure: RankFailure | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def peak_bytes_max(self) -> dict[str, int]:
        """Per arm, the highest peak over ranks."""
        return {k: max(v) for k, v in self.peak_bytes_per_rank.items() if v}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def peak_bytes_mean(self) -> dict[str, JsonFloat]:
        """Per arm, the mean peak over ranks."""
        return {k: sum(v) / len(v) for k, v in self.peak_bytes_per_rank.items() if v}


def fingerprints_match(arms: Mapping[str, ArmResult],
                       replicates: Mapping[str, Sequence[ArmResult]] | None = None) -> bool:
    """True when the arms' runs with the same seed (the main runs, then each replicate) all started from the same
    initial weights and first batches: the one condition under which comparing arms means anything."""
    groups: list[list[ArmResult]] = [list(arms.values())]
    for runs in (replicates or {}).values():
        for i, run in enumerate(runs):
            while len(groups) <= i + 1:
                groups.append([])
            groups[i + 1].append(run)
    return all(len({(r.fingerprints.weights, r.fingerprints.batches) for r in group if r.fingerprints}) <= 1
               for group in groups)


POOR_SQNR_DB = 20.0
"""An own-error SQNR below this (noise above 1% of the signal's power) is highlighted in the report: far worse
than the format's rounding alone, the layer itself loses precision or range."""


@dataclass(frozen=True, config=RESULT_CONFIG)
class LayerError:
    """The error one layer introduces in an arm (its fp32 inputs run at the arm's precision) and the error
    accumulated up to it (the whole model at the arm's precision), against fp32: SQNR in dB and relative."""

    layer: str
    sqnr_db: JsonFloat
    rel_error: JsonFloat
    drift_sqnr_db: JsonFloat
    drift_rel_error: JsonFloat


@dataclass(frozen=True, config=RESULT_CONFIG)
class NoiseFloor:
    """Seed-to-seed spread of one fp32 metric over ``n`` seeds: what "no real change" looks like."""

    mean: JsonFloat
    std: JsonFloat
    min: JsonFloat
    max: JsonFloat
    n: int


@dataclass(frozen=True, config=RESULT_CONFIG)
class GateCheck:
    """One comparison of an arm against the fp32 baseline under a limit given by the user."""

    arm: str
    metric: str
    kind: str
    limit: JsonFloat
    passed: bool
    message: str = ""
    baseline: JsonFloat | None = None
    value: JsonFloat | None = None
    delta: JsonFloat | None = None
    delta_low: JsonFloat | None = None
    delta_high: JsonFloat | None = None
    seeds: int = 1


@dataclass(frozen=True, config=RESULT_CONFIG)
class Gate:
    """The CI gate: every check, and whether all passed (true when no gate was asked for)."""

    checks: list[GateCheck] = field(default_factory=list)
    max_drop: dict[str, JsonFloat | str] = field(default_factory=dict)
    """Per metric, the allowed drop, or ``"auto"`` (k·σ of fp32's seed noise)."""
    max_loss_gap: JsonFloat | None = None
    noise_floor: dict[str, NoiseFloor] = field(default_factory=dict)
    noise_k: JsonFloat | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def given(self) -> bool:
        return bool(self.max_drop) or self.max_loss_gap is not None

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


@dataclass(frozen=True, config=RESULT_CONFIG)
class AuditResult:
    """Everything one ``mpaudit run`` found. Renderers read only this."""

    schema_version: int = field(default=SCHEMA_VERSION, kw_only=True)
    """Written first, for people reading the file; see the module docstring for when it is bumped."""
    task: str
    env: dict[str, Any] = field(default_factory=dict, kw_only=True)
    config: dict[str, Any] = field(default_factory=dict, kw_only=True)
    arms: dict[str, ArmResult]
    gate: Gate = field(default_factory=Gate)
    flags: list[Flag] = field(default_factory=list)
    metric_directions: dict[str, MetricDirection] = field(default_factory=dict)
    """Per metric ``evaluate`` returned: ``min`` (lower is better), ``max`` or ``unknown`` (neither declared nor
    known by name). Older results have none: readers fall back to declarations and the metric's name."""
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
    complete: bool = True
    """False while the audit is still running or was interrupted (a result written as it goes); a result without
    the key (older mpaudit) reads as complete."""

    @model_validator(mode="before")
    @classmethod
    def _named_arms(cls, data: Any) -> Any:
        """Arm entries of older, minimal files may leave out their ``name``: it is their key."""
        if isinstance(data, dict):
            for group in ("arms", "verification"):
                entries: Any = data.get(group)
                for key, entry in entries.items() if isinstance(entries, dict) else []:
                    if isinstance(entry, dict) and "name" not in entry:
                        entries[key] = {"name": key, **entry}
            replicates: Any = data.get("replicates")
            for key, runs in replicates.items() if isinstance(replicates, dict) else []:
                if isinstance(runs, list):
                    replicates[key] = [{"name": key, **r} if isinstance(r, dict) and "name" not in r else r
                                       for r in runs]
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fingerprints_match(self) -> bool:
        """True when every arm that started saw the same initial weights and first batches (with ``--seeds``:
        every arm's run with the same seed)."""
        return fingerprints_match(self.arms, self.replicates)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def activation_savings(self) -> dict[str, JsonFloat]:
        """Fraction of fp32's activation memory each mixed-precision arm saves (the part autocast shrinks)."""
        return activation_savings({n: a.memory for n, a in self.arms.items() if a.memory is not None})

    @property
    def observed(self) -> bool:
        """True when the result is an observed run (:func:`mpaudit.watch`), not a matched comparison of arms."""
        return any(arm.observed for arm in self.arms.values())

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
        arm = self.arms.get(BASELINE)
        return arm if arm is not None and arm.status != FAILED else None

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
        import pandas as pd  # only the tables need it; reading and gating results stays light
        frames = [a.trace.to_frame().assign(arm=name) for name, a in self.arms.items() if a.trace is not None]
        if not frames:
            return pd.DataFrame()
        frame = pd.concat(frames, ignore_index=True)
        return frame[["arm", *[c for c in frame.columns if c != "arm"]]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data of this result (derived numbers included), as ``report.json`` holds it."""
        data: dict[str, Any] = to_plain(self)
        return data

    def to_json(self, indent: int | None = 1) -> str:
        """The text of ``report.json``."""
        return dumps(self, indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> AuditResult:
        """Read a result of any known schema version; ResultError when it is not one or is malformed."""
        if not isinstance(d, dict) or "schema_version" not in d:
            raise ResultError("This file is not an mpaudit result: it has no schema_version.")
        version = d["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > SCHEMA_VERSION:
            raise ResultError(
                f"This result has schema_version {version!r}, which this mpaudit (reads 1..{SCHEMA_VERSION}) "
                "does not know; upgrade mpaudit."
            )
        try:
            return from_plain(cls, d)
        except (ValidationError, ValueError, TypeError) as exc:
            raise ResultError(f"This mpaudit result is malformed: {_first_problem(exc)}.") from exc

    @classmethod
    def from_json(cls, text: str) -> AuditResult:
        """Read ``report.json`` text; ResultError when it is not JSON or not a result this mpaudit reads."""
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ResultError(f"This file is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """The JSON Schema of ``report.json`` (every float that may be non-finite admits the three strings)."""
        schema = json_schema(AuditResult)
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "mpaudit report.json",
                **{k: v for k, v in schema.items() if k != "title"}}


def _first_problem(exc: Exception) -> str:
    """One line naming where a result is malformed: ``arms.fp16.status: Input should be 'ok', ...``."""
    if isinstance(exc, ValidationError) and exc.errors():
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return f"{where}: {err.get('msg', '')}" if where else str(err.get("msg", ""))
    return f"{type(exc).__name__}: {exc}"
