"""``audit()``: the whole flow as one call — load, check, train each arm, measure, flag, verify, gate."""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mpaudit.arms import DEFAULT_ARMS, Arm, parse_arms
from mpaudit.ci.gaps import check_declared_directions, directions_for, lower_is_better
from mpaudit.ci.gate import AUTO, DEFAULT_NOISE_K, check_declared_metrics, check_gated_metrics, evaluate_gate
from mpaudit.ci.recommend import DEFAULT_VERIFY_BUDGET
from mpaudit.defaults import DEFAULT_STEPS
from mpaudit.errors import UsageError
from mpaudit.numerics.causes import link, settle
from mpaudit.numerics.rules import Thresholds, flag
from mpaudit.perf.memory import parse_bytes
from mpaudit.perf.speed import DEFAULT_BENCH_SECONDS
from mpaudit.results.model import (
    ArmResult,
    AuditResult,
    DistributedInfo,
    Flag,
    LayerError,
    RankFailure,
    Recommendation,
)
from mpaudit.results.perf import MemoryResult, SpeedResult, Speedup
from mpaudit.run.distributed import DEFAULT_DIST_TIMEOUT_S, Parallel, RankFailed, check_options
from mpaudit.run.env import collect_env, resolve_device, tf32_setting
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import Task, load_task, preflight
from mpaudit.run.train import Progress, TrainSpec, train_arm
from mpaudit.trace.tracer import DEFAULT_TRACE_EVERY, select_modules
from mpaudit.vocab import AUTOCAST_POLICIES, BASELINE, FAILED, FP16_CPU_MODES, OK, MetricDirection


@dataclass(frozen=True)
class AuditConfig:
    """What to run. Mirrors the options of ``mpaudit run``."""

    arms: tuple[str, ...] = DEFAULT_ARMS
    steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    tf32: bool = False
    fp16_cpu: str = "emulate"
    autocast_policy: str = "cuda"
    max_drop: dict[str, float | str] = field(default_factory=dict)
    max_loss_gap: float | None = None
    metric_directions: dict[str, str] = field(default_factory=dict)
    """Declared metric directions (``--metric-direction NAME=min|max``), overriding the task's ``METRICS``."""
    seeds: int = 1
    noise_k: float = DEFAULT_NOISE_K
    trace_every: int = DEFAULT_TRACE_EVERY
    trace: tuple[str, ...] = ()
    trace_depth: int | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    bench: bool = True
    bench_seconds: float = DEFAULT_BENCH_SECONDS
    compile: bool = False
    memory_budget: str | None = None
    verify: bool = False
    verify_budget: int = DEFAULT_VERIFY_BUDGET
    parallel: str = "auto"
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S

    @property
    def seed_list(self) -> list[int]:
        """The seeds every arm trains with: ``seed`` first, then the noise-floor replicates."""
        return [self.seed + i for i in range(self.seeds)]

    def validated(self) -> AuditConfig:
        """Check the options make sense together; fill the default length."""
        parse_arms(self.arms)
        if self.steps is not None and self.epochs is not None:
            raise UsageError("Give --steps or --epochs, not both.")
        if self.steps is not None and self.steps < 1:
            raise UsageError("--steps must be at least 1.")
        if self.epochs is not None and self.epochs < 1:
            raise UsageError("--epochs must be at least 1.")
        gated = bool(self.max_drop) or self.max_loss_gap is not None
        if gated and BASELINE not in self.arms:
            raise UsageError("A gate compares against fp32, so --arms must include fp32.")
        if gated and len(self.arms) < 2:
            raise UsageError("A gate needs at least one mixed-precision arm beside fp32.")
        if self.fp16_cpu not in FP16_CPU_MODES:
            raise UsageError(f"--fp16-cpu must be one of {', '.join(FP16_CPU_MODES)}, not {self.fp16_cpu!r}.")
        if self.autocast_policy not in AUTOCAST_POLICIES:
            raise UsageError(
                f"--autocast-policy must be one of {', '.join(AUTOCAST_POLICIES)}, not {self.autocast_policy!r}."
            )
        check_declared_directions(self.metric_directions, "--metric-direction")
        if self.max_loss_gap is not None and self.max_loss_gap < 0:
            raise UsageError("--max-loss-gap must be >= 0.")
        if self.seeds < 1:
            raise UsageError("--seeds must be at least 1.")
        if self.trace_every < 0:
            raise UsageError("--trace-every must be 0 (off) or a positive number of steps.")
        if self.trace_depth is not None and self.trace_depth < 0:
            raise UsageError("--trace-depth must be 0 or more.")
        Thresholds.from_mapping(self.thresholds)
        if not (math.isfinite(self.bench_seconds) and self.bench_seconds > 0):
            raise UsageError("--bench-seconds must be a positive number.")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
            if not self.bench:
                raise UsageError("--memory-budget needs the memory measurement; drop --no-bench.")
        if self.verify and BASELINE not in self.arms:
            raise UsageError("--verify compares recommendations against fp32, so --arms must include fp32.")
        if self.verify_budget < 1:
            raise UsageError("--verify-budget must be at least 1.")
        check_options(self.parallel, self.dist_timeout)
        if not (math.isfinite(self.noise_k) and self.noise_k > 0):
            raise UsageError("--noise-k must be a positive number.")
        for metric, limit in self.max_drop.items():
            if limit == AUTO and (self.seeds < 2 or BASELINE not in self.arms):
                raise UsageError(f"--max-drop {metric}=auto needs --seeds 2 or more, to measure fp32's seed noise.")
        steps = self.steps if self.steps is not None or self.epochs is not None else DEFAULT_STEPS
        return AuditConfig(**{**asdict(self), "steps": steps, "arms": tuple(self.arms), "trace": tuple(self.trace)})


def audit(
    task: str | Path | Task,
    config: AuditConfig | None = None,
    *,
    progress: Progress | None = None,
    command: Sequence[str] | None = None,
    parallel: Parallel | None = None,
    **overrides: Any,
) -> AuditResult:
    """Train ``task`` once per arm from identical weights on identical batches, and return the result.

    Args:
        task: path to a ``model.py`` (or an already loaded :class:`~mpaudit.run.task.Task`).
        config: the options; keyword ``overrides`` replace single fields (``audit("m.py", steps=50)``).
        progress: receives per-step events (the CLI draws a progress bar from them).
        command: the command line recorded for reproduction (defaults to ``sys.argv``).
        parallel: the distributed job; by default read from torchrun's environment (a single process
            without it). Every rank calls ``audit`` and gets the same result; only rank 0 should write it.

    Raises:
        TaskError: the task file breaks the contract (checked before any arm trains).
        UsageError: the options contradict each other.
    """
    base = config or AuditConfig()
    if overrides:
        base = AuditConfig(**{**asdict(base), **overrides})
    cfg = base.validated()
    if not isinstance(task, Task):
        task = load_task(task)
    device = resolve_device(cfg.device)
    if parallel is None:
        parallel = Parallel.from_env(cfg.parallel, cfg.dist_timeout, device.type)
    device = parallel.device(device)
    arms = parse_arms(cfg.arms)
    failure: RankFailed | None = None

    with tf32_setting(cfg.tf32):
        env = collect_env(device, cfg.seed, task.path, task.sha256, list(command or sys.argv))
        metric_names = preflight(task, device)
        declared = {**task.metric_directions, **cfg.metric_directions}
        check_declared_metrics(cfg.metric_directions, metric_names)
        check_gated_metrics(cfg.max_drop, metric_names, declared)  # a typo or an unknown direction fails now
        if cfg.trace or cfg.trace_depth is not None:
            select_modules(task.build_model(), cfg.trace, cfg.trace_depth)  # a wrong module path fails now
        run = RunContext(task=task, device=device, fp16_cpu=cfg.fp16_cpu, autocast_policy=cfg.autocast_policy,
                         parallel=parallel)
        results: dict[str, ArmResult] = {}
        layer_errors: dict[str, list[LayerError]] = {}
        shadow_notes: list[str] = []
        replicates: dict[str, list[ArmResult]] = {}
        perf = _Perf()
        try:
            for i, seed in enumerate(cfg.seed_list):
                spec = TrainSpec(seed=seed, steps=cfg.steps, epochs=cfg.epochs, data_seed=cfg.seed,
                                 trace_every=cfg.trace_every if i == 0 else 0,  # replicates measure noise only
                                 trace_include=cfg.trace, trace_depth=cfg.trace_depth)
                for arm in arms:
                    label = arm.name if i == 0 else f"{arm.name} s{seed}"
                    keep_model = i == 0 and arm.name == BASELINE and cfg.verify
                    try:
                        trained = train_arm(run, arm, spec, progress, label=label, keep_model=keep_model)
                    except RankFailed as exc:  # keep the failed arm's partial result, then stop
                        if exc.result is not None and i == 0:
                            results[arm.name] = exc.result
                        raise
                    if trained.model is not None:  # attribute errors on the trained weights, then let them go
                        layer_errors, note = _shadow(run, trained.model, arms, cfg)
                        shadow_notes += [note] if note else []
                        trained.model = None
                    if i == 0:
                        results[arm.name] = trained.result
                    else:
                        replicates.setdefault(arm.name, []).append(trained.result)
            if cfg.bench:
                perf = _measure(run, arms, cfg, results, progress)
        except RankFailed as exc:  # the job cannot go on: keep what finished and say who failed
            failure = exc

    returned = [*metric_names, *(m for r in results.values() for m in r.metrics)]
    directions = directions_for(returned, declared)
    gate = evaluate_gate(results, cfg.max_drop, cfg.max_loss_gap, replicates, cfg.noise_k, directions)
    flags = _flags(results, replicates, cfg, directions)
    recommendations: list[Recommendation] = []
    verification: dict[str, ArmResult] = {}
    if cfg.verify and failure is None:
        try:
            with tf32_setting(cfg.tf32):
                recommendations, verification = _verify(run, arms, cfg, results, replicates, flags, progress,
                                                        layer_errors, directions)
        except RankFailed as exc:
            failure = exc
    from mpaudit import __version__

    return AuditResult(
        task=task.name,
        env=env,
        config=_config_dict(cfg),
        arms=results,
        gate=gate,
        flags=flags,
        metric_directions=directions,
        replicates=replicates,
        speedups=perf.speedups,
        compiled=perf.compiled,
        max_batch=perf.max_batch,
        perf_notes=[*perf.notes, *shadow_notes],
        warnings=_warnings(results, replicates),
        recommendations=recommendations,
        verification=verification,
        layer_errors=layer_errors,
        distributed=_distributed_info(parallel, perf, results, failure) if parallel.active else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        mpaudit_version=__version__,
    )


@dataclass
class _Perf:
    speedups: dict[str, Speedup] = field(default_factory=dict)
    compiled: dict[str, SpeedResult] = field(default_factory=dict)
    max_batch: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    step_s_per_rank: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes_per_rank: dict[str, list[int]] = field(default_factory=dict)
    speed_rank: int | None = None


def _measure(
    run: RunContext, arms: list[Arm], cfg: AuditConfig, results: dict[str, ArmResult], progress: Progress | None,
) -> _Perf:
    """The speed and memory phase: fresh models, no tracing, arms interleaved. Never loses the training results.

    In a distributed job every rank measures itself (the step includes its collectives); the slowest rank's
    timings and the largest rank's memory are reported, with every rank's figures beside them. A failure
    there ends the job (:class:`RankFailed`): a rank cannot skip a measurement its peers are stepping through.
    """
    from mpaudit.perf.memory import max_batch_for_budget, measure_memory
    from mpaudit.perf.speed import measure_speed

    perf = _Perf()
    parallel = run.parallel
    ran = [a for a in arms if results[a.name].status != FAILED]
    if not ran:
        return perf

    if progress is not None:
        progress.arm_started("bench", None)
    try:
        speed, speedups = measure_speed(run, ran, cfg.seed, budget_s=cfg.bench_seconds, compile=cfg.compile)
        if parallel.active:
            speed, speedups = _slowest_rank(parallel, speed, speedups, perf)
        perf.speedups = speedups
        for key, sr in speed.items():
            if key in results:
                results[key] = replace(results[key], speed=sr)
            else:
                perf.compiled[key] = sr
    except Exception as exc:  # a measurement failure must not sink the audit
        if parallel.active:
            raise parallel.failed(exc, "speed measurement") from exc
        perf.notes.append(f"Speed measurement failed: {type(exc).__name__}: {exc}")
    if parallel.active and not parallel.params_replicated:
        perf.notes.append("Memory under FSDP: parameters, gradients and optimizer state are each rank's shards; the "
                          "full parameters gathered for forward and backward count as other (as activations where "
                          "autograd saves them).")
    try:
        memory = measure_memory(run, ran, cfg.seed)
        if parallel.active:
            memory = _largest_rank(parallel, memory, perf)
        for key, mr in memory.items():
            results[key] = replace(results[key], memory=mr)
        if cfg.memory_budget is not None:
            budget = parse_bytes(cfg.memory_budget)
            for key, mr in memory.items():
                if mr.error is None and mr.batch_size:
                    perf.max_batch[key] = max_batch_for_budget(mr, mr.batch_size, budget)
    except Exception as exc:
        if parallel.active:
            raise parallel.failed(exc, "memory measurement") from exc
        perf.notes.append(f"Memory measurement failed: {type(exc).__name__}: {exc}")
    return perf


def _slowest_rank(
    parallel: Parallel, speed: dict[str, SpeedResult], speedups: dict[str, Speedup], perf: _Perf
) -> tuple[dict[str, SpeedResult], dict[str, Speedup]]:
    """Every rank's timings gathered; the slowest rank's (by its summed median step times) are the job's."""
    ranks = parallel.gather_objects((speed, speedups))
    keys = list(speed)
    perf.step_s_per_rank = {k: [r[0][k].step_s_median if k in r[0] else math.nan for r in ranks] for k in keys}

    def total(r: tuple[dict[str, SpeedResult], dict[str, Speedup]]) -> float:
        return sum(sr.step_s_median for sr in r[0].values() if sr.error is None and sr.times_s)

    perf.speed_rank = max(range(len(ranks)), key=lambda i: total(ranks[i]))
    chosen: tuple[dict[str, SpeedResult], dict[str, Speedup]] = ranks[perf.speed_rank]
    return chosen


def _largest_rank(parallel: Parallel, memory: dict[str, MemoryResult], perf: _Perf) -> dict[str, MemoryResult]:
    """Every rank's memory gathered; per arm, the rank with the highest peak is the job's figure."""
    ranks = parallel.gather_objects(memory)
    perf.peak_bytes_per_rank = {k: [r[k].peak_bytes for r in ranks] for k in memory}
    return {k: max((r[k] for r in ranks), key=lambda m: m.peak_bytes) for k in memory}


def _distributed_info(
    parallel: Parallel, perf: _Perf, results: dict[str, ArmResult], failure: RankFailed | None
) -> DistributedInfo:
    speeds = {k: r.speed for k, r in results.items() if r.speed is not None}
    return DistributedInfo(
        world_size=parallel.world_size,
        backend=parallel.backend or "",
        parallel=parallel.kind,
        step_s_per_rank=perf.step_s_per_rank,
        speed_rank=perf.speed_rank,
        peak_bytes_per_rank=perf.peak_bytes_per_rank,
        job_samples_per_s={k: sp.samples_per_s * parallel.world_size for k, sp in speeds.items()
                           if sp.samples_per_s is not None},
        failure=RankFailure(rank=failure.rank, arm=failure.arm, error=failure.error) if failure else None,
    )


def _verify(
    run: RunContext, arms: list[Arm], cfg: AuditConfig, results: dict[str, ArmResult],
    replicates: dict[str, list[ArmResult]], flags: list[Flag], progress: Progress | None,
    layer_errors: dict[str, list[LayerError]], directions: dict[str, MetricDirection],
) -> tuple[list[Recommendation], dict[str, ArmResult]]:
    """The verification phase: each recommendation trained as an extra arm (main seed, same batches, no
    tracing), at most ``verify_budget`` runs in all."""
    from mpaudit.ci.recommend import Criteria, recommend

    baseline = results.get(BASELINE)
    if baseline is None or baseline.status != OK:
        return [], {}
    spec = TrainSpec(seed=cfg.seed, steps=cfg.steps, epochs=cfg.epochs, data_seed=cfg.seed, trace_every=0)
    criteria = Criteria(baseline=baseline, max_drop=cfg.max_drop, max_loss_gap=cfg.max_loss_gap,
                        baseline_replicates=replicates.get(BASELINE, []), noise_k=cfg.noise_k,
                        directions=directions)

    def train(arm: Arm) -> ArmResult:
        return train_arm(run, arm, spec, progress).result

    sqnr = {arm: {e.layer: e.sqnr_db for e in errors} for arm, errors in layer_errors.items()}
    return recommend(arms, results, flags, criteria, train, budget=cfg.verify_budget, layer_error_db=sqnr)


def _shadow(
    run: RunContext, model: Any, arms: list[Arm], cfg: AuditConfig,
) -> tuple[dict[str, list[LayerError]], str | None]:
    """Per-layer error attribution on the trained fp32 model; a failure costs only this table.

    Under DDP every rank runs it on its own full copy of the weights (no collectives); under FSDP the
    weights are sharded across ranks, so it is left out."""
    from mpaudit.trace.shadow import layer_errors

    if run.parallel.active and not run.parallel.params_replicated:
        return {}, "Per-layer error attribution is not run under FSDP (each rank holds a shard of the weights)."
    try:
        paths = select_modules(model, cfg.trace, cfg.trace_depth)
        return layer_errors(run, model, arms, paths), None
    except Exception as exc:  # the user's model may not run module by module; the audit stands without it
        return {}, f"Per-layer error attribution failed: {type(exc).__name__}: {exc}"


def _flags(results: dict[str, ArmResult], replicates: dict[str, list[ArmResult]], cfg: AuditConfig,
           directions: Mapping[str, str]) -> list[Flag]:
    """The rules' flags, causes linked to their consequences, noise told from harm, in severity and forward order."""
    from mpaudit.ci.recommend import Criteria

    traces = {name: r.trace for name, r in results.items() if r.trace is not None}
    half_weights = frozenset(a.name for a in parse_arms(cfg.arms) if a.rounds_updates_to_nearest)
    flags = link(flag(traces, results, Thresholds.from_mapping(cfg.thresholds), half_weights), results)
    baseline = results.get(BASELINE)
    matching: set[str] = set()
    if baseline is not None and baseline.status == OK:
        criteria = Criteria(baseline=baseline, max_drop=cfg.max_drop, max_loss_gap=cfg.max_loss_gap,
                            baseline_replicates=replicates.get(BASELINE, []), noise_k=cfg.noise_k,
                            directions=directions)
        matching = {name for name, run in results.items() if name != BASELINE and criteria.passes(run)}
    order = {name: trace.layers for name, trace in traces.items()}
    return settle(flags, matching, order, list(results))


def _config_dict(cfg: AuditConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["arms"] = list(cfg.arms)
    d["seeds"] = cfg.seed_list
    d["trace"] = list(cfg.trace)
    return d


def _warnings(results: dict[str, ArmResult], replicates: dict[str, list[ArmResult]]) -> list[str]:
    """Loud, plain-language warnings that void or qualify the comparison."""
    out = _fingerprint_warnings(results)
    n_replicates = max((len(v) for v in replicates.values()), default=0)
    for i in range(n_replicates):
        group = {name: runs[i] for name, runs in replicates.items() if i < len(runs)}
        out += [f"Seed replicate {i + 1}: {w}" for w in _fingerprint_warnings(group)]
    every_run = [*results.values(), *(r for runs in replicates.values() for r in runs)]
    batch_prints = {r.fingerprints.batches for r in every_run if r.fingerprints}
    if len(batch_prints) > 1 and not out:
        out.append("The seed replicates did not see the same first batches as the main run: train_loader() "
                   "depends on more than the seed mpaudit sets, so the noise floor mixes data-order noise in.")
    return out


def _fingerprint_warnings(results: dict[str, ArmResult]) -> list[str]:
    out: list[str] = []
    prints = {name: r.fingerprints for name, r in results.items() if r.fingerprints}
    if len({p.weights for p in prints.values()}) > 1:
        detail = ", ".join(f"{n}={p.weights}" for n, p in prints.items())
        out.append(
            "The arms did not start from the same initial weights (" + detail + "): build_model() is not "
            "deterministic under a fixed seed, so the comparison between arms is meaningless."
        )
    if len({p.batches for p in prints.values()}) > 1:
        detail = ", ".join(f"{n}={p.batches}" for n, p in prints.items())
        out.append(
            "The arms did not see the same first batches (" + detail + "): train_loader() is not "
            "deterministic under a fixed seed, so the comparison between arms is meaningless."
        )
    return out


__all__ = ["DEFAULT_STEPS", "AuditConfig", "audit", "lower_is_better"]
