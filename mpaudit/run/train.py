"""The training loop of one arm: same seed, same batches, the arm's precision recipe, every step recorded."""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mpaudit.arms import Arm
from mpaudit.defaults import DEFAULT_TRACE_EVERY
from mpaudit.errors import error_text
from mpaudit.numerics.fp8 import Fp8Trace
from mpaudit.numerics.layerstats import TraceSummary
from mpaudit.results.model import ArmResult, Fingerprints, LossScale, Site
from mpaudit.run.batches import move_to_device
from mpaudit.run.distributed import RankFailed
from mpaudit.run.fp16_emulation import missing_fp16_kernel
from mpaudit.run.interrupt import Interrupted
from mpaudit.run.prepare import PreparedArm, RunContext, prepare_arm, release
from mpaudit.run.seeding import FINGERPRINT_BATCHES, BatchFingerprint, fingerprint_model, seed_everything
from mpaudit.trace.sites import RngState, locate
from mpaudit.trace.tracer import Tracer, TraceSchedule
from mpaudit.vocab import DIVERGED, FAILED, INTERRUPTED, OK, SKIPPED, Status

DIVERGE_PATIENCE = 25
"""An fp16 arm is called diverged after this many consecutive non-finite losses (GradScaler skips each
such step, so a few are expected while it finds its scale; a run of them means the forward overflows)."""

WARMUP_FRACTION = 0.1
"""Leading fraction of steps (at least 1) left out of the training-loop step-time median."""


class Progress(Protocol):
    """Receives progress events; the CLI shows them, a notebook may ignore them."""

    def arm_started(self, arm: str, total: int | None) -> None: ...
    def step(self, arm: str, step: int, loss: float) -> None: ...
    def arm_finished(self, arm: str, result: ArmResult) -> None: ...
    def arm_resumed(self, arm: str, result: ArmResult) -> None: ...


class NoProgress:
    """A progress sink that shows nothing."""

    def arm_started(self, arm: str, total: int | None) -> None:
        pass

    def step(self, arm: str, step: int, loss: float) -> None:
        pass

    def arm_finished(self, arm: str, result: ArmResult) -> None:
        pass

    def arm_resumed(self, arm: str, result: ArmResult) -> None:
        pass


@dataclass(frozen=True)
class TrainSpec:
    """How long an arm trains and what is traced. Exactly one of ``steps`` / ``epochs`` is set.

    ``seed`` seeds the model's initial weights and training randomness (dropout); ``data_seed`` seeds the
    loaders, so noise-floor replicates with other seeds still see the same batches in the same order.
    """

    seed: int
    steps: int | None
    epochs: int | None
    data_seed: int | None = None
    trace_every: int = DEFAULT_TRACE_EVERY
    trace_include: tuple[str, ...] = ()
    trace_depth: int | None = None
    fp8_recipes: tuple[str, ...] = ()
    """The float8 recipes the audit trains and their alternatives: on traced steps the fp32 arm records what each
    would do to every Linear layer's GEMM operands (the prediction), a float8 arm what its own recipe does
    (:mod:`mpaudit.trace.fp8_probe`)."""

    @property
    def loader_seed(self) -> int:
        """The seed the loaders run under (``data_seed``, or ``seed`` when none is given)."""
        return self.seed if self.data_seed is None else self.data_seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_batches(run: RunContext, first: Any, spec: TrainSpec) -> Iterator[Any]:
    """Batches epoch after epoch, in the same order for every arm and every seed.

    Each epoch's iterator is created and its first batch drawn under ``data_seed + epoch`` (a shuffling
    DataLoader draws its order then); the generators are then reseeded with ``seed + epoch`` so dropout and
    other training randomness follow the run's seed, not the data's. In a distributed job each rank
    iterates its shard of the loader.
    """
    loader = first
    epoch = 0
    while spec.epochs is None or epoch < spec.epochs:
        seed_everything(spec.loader_seed + epoch)
        if epoch > 0 and iter(loader) is loader:  # a one-shot iterator: ask the task for a fresh one
            loader = run.task.train_loader()
        it = iter(run.parallel.shard(loader))
        head = next(it, _END)
        seed_everything(spec.seed + epoch)
        if head is _END:
            return
        yield head
        yield from it
        epoch += 1


_END = object()


def _groups(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """The micro-batches of each optimizer step: ``size`` batches at a time (the last group of a run that ends
    with ``--epochs`` may be shorter; its losses are then divided by its own length)."""
    while True:
        group = list(itertools.islice(batches, size))
        if not group:
            return
        yield group


def _planned_steps(loader: Any, spec: TrainSpec, accumulation: int = 1) -> int | None:
    if spec.steps is not None:
        return spec.steps
    try:
        return math.ceil(len(loader) * (spec.epochs or 1) / accumulation)
    except TypeError:
        return None


@dataclass
class TrainedArm:
    """An arm's result and, when asked for (``keep_model=True``), its trained model (the bare module)."""

    result: ArmResult
    model: torch.nn.Module | None = None


def train_arm(
    run: RunContext, arm: Arm, spec: TrainSpec, progress: Progress | None = None, label: str | None = None,
    *, keep_model: bool = False,
) -> TrainedArm:
    """Train ``arm`` from the seeded initial weights on the seeded batches and evaluate it in fp32.

    Never raises for the user's errors: an exception marks the arm ``failed`` with its message, so the
    other arms still run. A non-finite loss marks it ``diverged``. With ``keep_model`` the trained model is
    returned beside the result (when the arm finished ``ok``), for analyses on the trained weights.

    In a distributed job (``run.parallel``) a failure on any rank ends the audit instead (the ranks can no
    longer agree on their collectives): :class:`~mpaudit.run.distributed.RankFailed` is raised, naming the rank
    that failed and carrying this arm's partial result.
    """
    progress = progress or NoProgress()
    label = label or arm.name
    reason = run.skip_reason(arm)
    if reason is not None:  # a recipe this device cannot run: recorded, not trained
        skipped_result = ArmResult(name=arm.name, status=SKIPPED, error=reason, recipe=arm.description,
                                   fp8_recipe=arm.fp8, exclude_from_fp8=list(arm.exclude_from_fp8))
        progress.arm_finished(label, skipped_result)
        return TrainedArm(skipped_result)
    losses: list[float] = []
    sites: list[Site] = []
    notes: list[str] = []
    scales: list[float] = []
    skipped: list[int] = []
    step_times: list[float] = []
    fingerprints: Fingerprints | None = None
    status: Status = OK
    error: str | None = None
    metrics: dict[str, float] = {}
    t_start = time.perf_counter()
    parallel = run.parallel
    prepared: PreparedArm | None = None
    tracer: Tracer | None = None
    trace: TraceSummary | None = None
    probe: Any = None
    fp8_casts: Fp8Trace | None = None
    failure: RankFailed | None = None
    kept: torch.nn.Module | None = None
    batch_fp: BatchFingerprint | None = None
    stopped: Interrupted | None = None
    try:
        prepared = prepare_arm(run, arm, spec.seed)
        seed_everything(spec.loader_seed)
        loader = run.task.train_loader()
        batch_fp = BatchFingerprint()
        total = _planned_steps(parallel.shard(loader), spec, run.recipe.grad_accumulation)
        progress.arm_started(label, total)
        schedule = TraceSchedule(spec.trace_every)
        if spec.trace_every > 0:
            tracer = Tracer(prepared.model, include=spec.trace_include, depth=spec.trace_depth, parallel=parallel)
        probe = _fp8_probe(prepared, spec)
        hooks = tracer if tracer is not None else contextlib.nullcontext()
        with hooks, probe if probe is not None else contextlib.nullcontext():
            status, error = _loop(prepared, spec, loader, batch_fp, tracer, schedule, progress, label, losses,
                                  scales, skipped, step_times, sites, notes, probe)
        if tracer is not None:
            trace = tracer.summary()
        if probe is not None:
            fp8_casts = probe.summary()
        if not losses:
            raise RuntimeError("train_loader() yielded no batch for this arm")
        fingerprints = Fingerprints(weights=prepared.weights_fingerprint, batches=batch_fp.hexdigest())
        if run.task.has_evaluate:
            prepared.for_evaluation()  # a half-weight arm's bf16 weights, widened to fp32
            prepared.model.eval()
            seed_everything(spec.loader_seed)
            with torch.no_grad():  # every rank evaluates the whole eval set; rank 0's metrics are kept
                metrics = parallel.broadcast(run.task.evaluate(prepared.model, run.task.eval_loader() or []))
        if keep_model and status == OK:
            kept = prepared.model
    except Exception as exc:  # one failing arm never sinks the others
        status, error = FAILED, error_text(exc)
        if run.fp16_mode(arm) == "native" and run.device.type == "cpu" and missing_fp16_kernel(exc):
            error = (f"{error} (native fp16 on this CPU has no kernel for an op of the model; the default "
                     "--fp16-cpu emulate computes it as a GPU would)")
        if parallel.active:
            failure = parallel.failed(exc, label)
            error = str(failure)
        if tracer is not None and tracer.summary().steps:
            trace = tracer.summary()  # what was traced before the failure is evidence too
        if probe is not None and probe.summary().steps:
            fp8_casts = probe.summary()
    except Interrupted as exc:  # stopped from outside: keep the steps so far, then let the audit stop
        status, error, stopped = INTERRUPTED, f"{exc} after {len(losses)} steps", exc
        if prepared is not None and batch_fp is not None:
            fingerprints = Fingerprints(weights=prepared.weights_fingerprint, batches=batch_fp.hexdigest())
        if tracer is not None and tracer.summary().steps:
            trace = tracer.summary()
    finally:
        if prepared is not None and prepared.keep is not None and kept is None:
            prepared.keep.remove()
        conversion = prepared.fp8 if prepared is not None else None
        del prepared
        release(arm, run)

    result = ArmResult(
        name=arm.name,
        status=status,
        error=error,
        loss=losses,
        metrics=metrics,
        steps=len(losses),
        train_s=time.perf_counter() - t_start,
        loss_scale=LossScale(history=scales, skipped_steps=skipped) if arm.grad_scaler else None,
        fingerprints=fingerprints,
        train_step_s=_loop_step_s(step_times),
        fp16_mode=run.fp16_mode(arm),
        autocast_policy=run.autocast_policy_of(arm),
        recipe=arm.description,
        trace=trace,
        sites=sites,
        notes=[*notes, *(conversion.all_notes() if conversion is not None else [])],
        weights_dtype=arm.weights_dtype,
        fp32_master=list(arm.fp32_master),
        update_rounding=arm.update_rounding,
        fp8_recipe=arm.fp8,
        fp8_mode=run.fp8_mode(arm),
        fp8_layers=conversion.in_float8() if conversion is not None else [],
        exclude_from_fp8=list(arm.exclude_from_fp8),
        fp8_casts=fp8_casts,
    )
    progress.arm_finished(label, result)
    if failure is not None:
        failure.result = result
        raise failure
    if stopped is not None:
        stopped.result = result
        raise stopped
    return TrainedArm(result, kept)


def initial_fingerprints(run: RunContext, spec: TrainSpec) -> Fingerprints:
    """The fingerprints an arm trained with ``spec`` starts from: its initial weights and first batches, computed
    exactly as :func:`train_arm` computes them (to check a saved run still matches, see :mod:`mpaudit.run.resume`)."""
    seed_everything(spec.seed)
    weights = fingerprint_model(run.task.build_model())
    seed_everything(spec.loader_seed)
    batches = BatchFingerprint()
    for i, batch in enumerate(_epoch_batches(run, run.task.train_loader(), spec)):
        if i >= FINGERPRINT_BATCHES:
            break
        batches.add(batch)
    return Fingerprints(weights=weights, batches=batches.hexdigest())


def _fp8_probe(prepared: PreparedArm, spec: TrainSpec) -> Any:
    """The float8 cast probe of this arm's traced steps: every recipe of the audit on every Linear layer of the fp32
    arm, the arm's own recipe on its converted layers for a float8 arm; None for other arms, or without tracing."""
    arm = prepared.arm
    if spec.trace_every <= 0 or not spec.fp8_recipes or (arm.fp8 is None and not arm.is_baseline):
        return None
    from mpaudit.run.fp8 import linear_paths
    from mpaudit.trace.fp8_probe import Fp8Probe

    if arm.fp8 is not None:
        paths = prepared.fp8.converted if prepared.fp8 is not None else []
        return Fp8Probe(prepared.model, paths, [arm.fp8], autocast_input=True) if paths else None
    return Fp8Probe(prepared.model, linear_paths(prepared.model), list(spec.fp8_recipes))


def _loop(
    prepared: PreparedArm, spec: TrainSpec, loader: Any, batch_fp: BatchFingerprint, tracer: Tracer | None,
    schedule: TraceSchedule, progress: Progress, label: str, losses: list[float], scales: list[float],
    skipped: list[int], step_times: list[float], sites: list[Site], notes: list[str], probe: Any = None,
) -> tuple[Status, str | None]:
    """The optimizer steps of one arm; fills the lists in place and returns (status, error)."""
    run, scaler = prepared.run, prepared.scaler
    device = run.device
    nonfinite_run = 0
    finder = _SiteFinder(prepared, sites, notes)
    accumulation = run.recipe.grad_accumulation
    for step, group in enumerate(_groups(_epoch_batches(run, loader, spec), accumulation)):
        if spec.steps is not None and step >= spec.steps:
            break
        for batch in group:
            batch_fp.add(batch)
        group = [move_to_device(batch, device) for batch in group]
        t0 = time.perf_counter()
        scale = scaler.get_scale() if scaler is not None else None
        traced = tracer is not None and schedule.wants(step)
        if traced and tracer is not None:
            tracer.start_step(step, scale)
        if traced and probe is not None:
            probe.start_step(step)
        rng = finder.before_step()
        with prepared.context():
            loss = prepared.step(
                group[0],
                group=group,
                after_backward=tracer.after_backward if traced and tracer else None,
                after_step=tracer.after_optimizer_step if traced and tracer else None,
                hold_nonfinite=scaler is None,
            )
        if traced and tracer is not None:
            tracer.finish_step(summary=False)
        if traced and probe is not None:
            probe.finish_step()
        anomaly = False
        if scaler is not None and scale is not None:
            scales.append(scale)
            if scaler.get_scale() < scale:
                skipped.append(step)
                anomaly = True
        loss = run.parallel.mean(loss)  # the mean over ranks (a no-op in a single process)
        value = float(loss.float().item())  # the one host sync of the step (progress, divergence)
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        losses.append(value)
        finder.after_step(step, group, rng, value, scale, skipped)
        progress.step(label, step + 1, value)
        if math.isfinite(value):
            nonfinite_run = 0
        else:
            anomaly = True
            nonfinite_run += 1
            if scaler is None or nonfinite_run >= DIVERGE_PATIENCE:
                why = "" if scaler is None else f" for {nonfinite_run} steps in a row"
                return DIVERGED, f"loss became {value} at step {step + 1}{why}"
        if anomaly:
            schedule.notify_anomaly(step)
    return OK, None


class _SiteFinder:
    """Replays an arm's first failing steps to find where its non-finite values start (:mod:`mpaudit.trace.sites`):
    the first step with a non-finite loss (a forward origin), and the first step GradScaler skips with a finite
    loss once it has found its scale (a backward origin). The weights are still those the step started from:
    GradScaler skipped the update, or the loop held it back (``hold_nonfinite``)."""

    def __init__(self, prepared: PreparedArm, sites: list[Site], notes: list[str]) -> None:
        self.prepared = prepared
        self.sites = sites
        self.notes = notes
        parallel = prepared.run.parallel
        self.enabled = not (parallel.active and not parallel.params_replicated)  # FSDP: no rank holds the model
        self.forward_done = self.backward_done = False

    def before_step(self) -> RngState | None:
        return RngState() if self.enabled and not (self.forward_done and self.backward_done) else None

    def after_step(self, step: int, group: list[Any], rng: RngState | None, loss: float, scale: float | None,
                   skipped: list[int]) -> None:
        if rng is None:
            return
        forward = not math.isfinite(loss) and not self.forward_done
        calibrating = skipped == list(range(len(skipped)))  # GradScaler lowering its scale from step 0 on
        backward = bool(skipped) and skipped[-1] == step and math.isfinite(loss) and not calibrating
        if not (forward or (backward and not self.backward_done)):
            return
        self.forward_done = self.forward_done or forward
        self.backward_done = True  # a forward failure's backward is its consequence
        try:
            found = locate(self.prepared, group[0], step, scale, rng, group=group)
        except Exception as exc:  # the audit stands without a site
            self.notes.append(f"Locating the first non-finite op failed: {error_text(exc)}")
            return
        self.sites.extend(site for site in found if site is not None)


def _loop_step_s(step_times: list[float]) -> float | None:
    """Median training-loop step time after warm-up (includes the per-step loss sync; tracing steps too).

    For honest speed numbers use the separate measurement phase (``arms.<name>.speed``); this one only says
    how long the audit's own steps took.
    """
    if not step_times:
        return None
    skip = max(1, math.ceil(len(step_times) * WARMUP_FRACTION)) if len(step_times) > 2 else 0
    return statistics.median(step_times[skip:])
