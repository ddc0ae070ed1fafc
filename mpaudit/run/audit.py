"""``audit()``: the whole flow as one call — load, check, train each arm, measure, flag, verify, gate."""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mpaudit.arms import ALTERNATIVE_RECIPE, DEFAULT_ARMS, Arm, parse_arms
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
    Gate,
    LayerError,
    RankFailure,
    Recommendation,
)
from mpaudit.results.perf import MemoryResult, SpeedResult, Speedup
from mpaudit.run import autocast_policy
from mpaudit.run.distributed import DEFAULT_DIST_TIMEOUT_S, Parallel, RankFailed, check_options
from mpaudit.run.env import collect_env, resolve_device, tf32_setting
from mpaudit.run.interrupt import Interrupted
from mpaudit.run.prepare import RunContext
from mpaudit.run.resume import Resumable
from mpaudit.run.step import Recipe
from mpaudit.run.task import Task, load_task, preflight
from mpaudit.run.train import Progress, TrainSpec, train_arm
from mpaudit.trace.tracer import DEFAULT_TRACE_EVERY, select_modules
from mpaudit.vocab import AUTOCAST_POLICIES, BASELINE, FAILED, FP16_CPU_MODES, OK, SKIPPED, MetricDirection


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
    clip_grad_norm: float | None = None
    """Overrides the task's ``clip_grad_norm`` (``--clip-grad-norm``); None keeps the task's."""
    grad_accumulation: int | None = None
    """Overrides the task's ``grad_accumulation`` (``--grad-accumulation``); None keeps the task's."""

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
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise UsageError("--clip-grad-norm must be a positive number (the max gradient norm).")
        if self.grad_accumulation is not None and (isinstance(self.grad_accumulation, bool)
                                                   or int(self.grad_accumulation) != self.grad_accumulation
                                                   or self.grad_accumulation < 1):
            raise UsageError("--grad-accumulation must be a whole number of micro-batches per step, at least 1.")
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
    on_update: Callable[[AuditResult], None] | None = None,
    resume: AuditResult | None = None,
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
        on_update: called with the result so far (``complete`` false) after every arm, seed replicate,
            measurement and verification run, so a caller can keep it on disk as the audit goes.
        resume: a partial (or complete) earlier result of the same task and options: its finished runs
            whose initial fingerprints still match are kept (``resumed``) instead of trained again, and only
            missing speed and memory figures are measured (:mod:`mpaudit.run.resume`).

    Raises:
        TaskError: the task file breaks the contract (checked before any arm trains).
        UsageError: the options contradict each other, or ``resume`` does not match them.
        Interrupted: SIGINT or SIGTERM arrived (under :func:`mpaudit.run.interrupt.interruptible`); its
            ``result`` holds the audit so far, the arm in flight ``interrupted`` with its steps.
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
    from mpaudit.run.fp8 import require_torchao

    require_torchao(arms)
    asked = [a.fp8 for a in arms if a.fp8 is not None]  # each recipe and its alternative, predicted by fp32
    fp8_recipes = tuple(dict.fromkeys([*asked, *(ALTERNATIVE_RECIPE[r] for r in asked)]))

    if task.has_custom_step and (cfg.clip_grad_norm is not None or cfg.grad_accumulation is not None):
        given = "--clip-grad-norm" if cfg.clip_grad_norm is not None else "--grad-accumulation"
        raise UsageError(f"{given} cannot apply to {task.path.name}: its custom_step() owns clipping and "
                         "accumulation itself.")

    with tf32_setting(cfg.tf32), autocast_policy.process_restored():
        env = collect_env(device, cfg.seed, task.path, task.sha256, list(command or sys.argv))
        found: dict[str, Any] = {}
        metric_names = preflight(task, device, found)
        declared = {**task.metric_directions, **cfg.metric_directions}
        check_declared_metrics(cfg.metric_directions, metric_names)
        check_gated_metrics(cfg.max_drop, metric_names, declared)  # a typo or an unknown direction fails now
        if cfg.trace or cfg.trace_depth is not None:
            select_modules(task.build_model(), cfg.trace, cfg.trace_depth)  # a wrong module path fails now
        run = RunContext(task=task, device=device, fp16_cpu=cfg.fp16_cpu, autocast_policy=cfg.autocast_policy,
                         parallel=parallel, clip_grad_norm=cfg.clip_grad_norm, grad_accumulation=cfg.grad_accumulation)
        config_dict = _config_dict(cfg, run.recipe, found.get("scheduler"))
        saved = Resumable.check(resume, task, config_dict) if resume is not None else None
        state = _State(task=task, cfg=cfg, env=env, config=config_dict, parallel=parallel,
                       metric_names=metric_names, declared=declared, on_update=on_update)
        try:
            for i, seed in enumerate(cfg.seed_list):
                spec = TrainSpec(seed=seed, steps=cfg.steps, epochs=cfg.epochs, data_seed=cfg.seed,
                                 trace_every=cfg.trace_every if i == 0 else 0,  # replicates measure noise only
                                 trace_include=cfg.trace, trace_depth=cfg.trace_depth, fp8_recipes=fp8_recipes)
                for arm in arms:
                    label = arm.name if i == 0 else f"{arm.name} s{seed}"
                    keep_model = i == 0 and arm.name == BASELINE and cfg.verify
                    kept = saved.run(arm.name, i, run, spec) if saved is not None else None
                    needs_model = keep_model and (saved is None or not saved.layer_errors)  # for the attribution
                    if kept is not None and saved is not None and not (needs_model and kept.status == OK):
                        if progress is not None:
                            progress.arm_resumed(label, kept)
                        state.add_run(arm.name, i, kept)
                        if keep_model:
                            state.layer_errors = saved.layer_errors
                        continue
                    try:
                        trained = train_arm(run, arm, spec, progress, label=label, keep_model=keep_model)
                    except (RankFailed, Interrupted) as exc:  # keep the arm's partial result, then stop
                        if exc.result is not None and i == 0:
                            state.results[arm.name] = exc.result
                        raise
                    if trained.model is not None:  # attribute errors on the trained weights, then let them go
                        state.layer_errors, note = _shadow(run, trained.model, arms, cfg)
                        state.shadow_notes += [note] if note else []
                        trained.model = None
                    state.add_run(arm.name, i, trained.result)
            if cfg.bench:
                state.perf = _measure(run, arms, cfg, state.results, progress, saved)
                state.update()
        except RankFailed as exc:  # the job cannot go on: keep what finished and say who failed
            state.failure = exc
        except Interrupted as exc:
            exc.result = state.assemble(complete=False)
            raise

    directions = state.directions()
    flags = state.flags()
    if cfg.verify and state.failure is None:
        try:
            with tf32_setting(cfg.tf32), autocast_policy.process_restored():
                state.recommendations, state.verification = _verify(
                    run, arms, cfg, state.results, state.replicates, flags, progress, state.layer_errors, directions,
                    saved, state)
        except RankFailed as exc:
            state.failure = exc
        except Interrupted as exc:
            exc.result = state.assemble(complete=False)
            raise
    return state.assemble(complete=True)


@dataclass
class _State:
    """What an audit has found so far, and how to turn it into a result at any moment."""

    task: Task
    cfg: AuditConfig
    env: dict[str, Any]
    config: dict[str, Any]
    parallel: Parallel
    metric_names: list[str]
    declared: dict[str, str]
    on_update: Callable[[AuditResult], None] | None = None
    results: dict[str, ArmResult] = field(default_factory=dict)
    replicates: dict[str, list[ArmResult]] = field(default_factory=dict)
    layer_errors: dict[str, list[LayerError]] = field(default_factory=dict)
    shadow_notes: list[str] = field(default_factory=list)
    perf: _Perf = field(default_factory=lambda: _Perf())
    recommendations: list[Recommendation] = field(default_factory=list)
    verification: dict[str, ArmResult] = field(default_factory=dict)
    failure: RankFailed | None = None

    def add_run(self, arm: str, seed_index: int, result: ArmResult) -> None:
        if seed_index == 0:
            self.results[arm] = result
        else:
            self.replicates.setdefault(arm, []).append(result)
        self.update()

    def update(self) -> None:
        """Hand the result so far to ``on_update`` (the CLI writes it to disk)."""
        if self.on_update is not None and self.parallel.is_main:
            self.on_update(self.assemble(complete=False))

    def directions(self) -> dict[str, MetricDirection]:
        returned = [*self.metric_names, *(m for r in self.results.values() for m in r.metrics)]
        return directions_for(returned, self.declared)

    def flags(self) -> list[Flag]:
        return _flags(self.results, self.replicates, self.cfg, self.directions())

    def assemble(self, complete: bool) -> AuditResult:
        """The result of what has run so far; ``complete`` says whether every phase asked for has finished."""
        from mpaudit import __version__

        cfg, perf, directions = self.cfg, self.perf, self.directions()
        try:
            gate = evaluate_gate(self.results, cfg.max_drop, cfg.max_loss_gap, self.replicates, cfg.noise_k,
                                 directions)
        except UsageError:
            if complete:
                raise
            gate = Gate(max_drop=dict(cfg.max_drop), max_loss_gap=cfg.max_loss_gap)  # e.g. auto before the seeds ran
        return AuditResult(
            task=self.task.name,
            env=self.env,
            config=self.config,
            arms=dict(self.results),
            gate=gate,
            flags=self.flags(),
            metric_directions=directions,
            replicates={k: list(v) for k, v in self.replicates.items()},
            speedups=perf.speedups,
            compiled=perf.compiled,
            max_batch=perf.max_batch,
            perf_notes=[*perf.notes, *self.shadow_notes],
            warnings=_warnings(self.results, self.replicates),
            recommendations=list(self.recommendations),
            verification=dict(self.verification),
            layer_errors=self.layer_errors,
            distributed=(_distributed_info(self.parallel, perf, self.results, self.failure)
                         if self.parallel.active else None),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            mpaudit_version=__version__,
            complete=complete,
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
    saved: Resumable | None = None,
) -> _Perf:
    """The speed and memory phase: fresh models, no tracing, arms interleaved. Never loses the training results.

    In a distributed job every rank measures itself (the step includes its collectives); the slowest rank's
    timings and the largest rank's memory are reported, with every rank's figures beside them. A failure
    there ends the job (:class:`RankFailed`): a rank cannot skip a measurement its peers are stepping through.
    """
    perf = _Perf()
    ran = [a for a in arms if results[a.name].status not in (FAILED, SKIPPED)]
    if not ran:
        return perf

    if progress is not None:
        progress.arm_started("bench", None)
    try:
        return _measure_into(perf, run, ran, cfg, results, saved)
    except Interrupted:
        perf.notes.append("The audit was interrupted during the speed and memory phase: the figures missing here "
                          "were not measured (run again with --resume to measure only them).")
        raise


def _measure_into(
    perf: _Perf, run: RunContext, ran: list[Arm], cfg: AuditConfig, results: dict[str, ArmResult],
    saved: Resumable | None,
) -> _Perf:
    """Measure speed, then memory, into ``perf`` and ``results`` (kept from ``saved`` where they can be)."""
    from mpaudit.perf.memory import max_batch_for_budget, measure_memory
    from mpaudit.perf.speed import measure_speed

    parallel = run.parallel
    try:
        if saved is not None and saved.speed(ran, cfg.compile):
            speed = {a.name: sr for a in ran if (sr := saved.saved.arms[a.name].speed) is not None}
            speed.update(saved.saved.compiled)
            speedups = dict(saved.saved.speedups)
        else:
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
        kept = {a.name: saved.memory(a.name) for a in ran} if saved is not None else {}
        memory = {name: mr for name, mr in kept.items() if mr is not None}
        memory.update(measure_memory(run, [a for a in ran if a.name not in memory], cfg.seed))
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
    saved: Resumable | None = None, state: _State | None = None,
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
        done = saved.verification_run(arm) if saved is not None else None
        if done is not None:
            if progress is not None:
                progress.arm_resumed(arm.name, done)
        else:
            done = train_arm(run, arm, spec, progress).result
        if state is not None:  # on disk as it goes, each trial under its own name
            key = arm.name
            while key in state.verification and state.verification[key].recipe != arm.description:
                key += "'"
            state.verification[key] = done
            state.update()
        return done

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
        try:
            matching = {name for name, run in results.items() if name != BASELINE and criteria.passes(run)}
            bf16 = results.get("bf16")
            if bf16 is not None and bf16.status == OK:  # a float8 arm is judged against the bf16 it builds on, too
                against_bf16 = replace(criteria, baseline=bf16, baseline_replicates=replicates.get("bf16", []))
                matching |= {name for name, run in results.items() if run.fp8_recipe is not None
                             and against_bf16.passes(run)}
        except UsageError:  # a partial result: `auto` before the seed replicates have run
            matching = set()
    order = {name: trace.layers for name, trace in traces.items()}
    return settle(flags, matching, order, list(results))


def _config_dict(cfg: AuditConfig, recipe: Recipe, scheduler: str | None) -> dict[str, Any]:
    """The options as ``report.json``'s ``config``; the recipe keys hold what every arm trained with (the task's
    values, or the command line's overrides)."""
    d = asdict(cfg)
    d["arms"] = list(cfg.arms)
    d["seeds"] = cfg.seed_list
    d["trace"] = list(cfg.trace)
    d["clip_grad_norm"] = recipe.clip_grad_norm
    d["grad_accumulation"] = recipe.grad_accumulation
    d["scheduler"] = scheduler
    d["custom_step"] = recipe.custom_step
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
