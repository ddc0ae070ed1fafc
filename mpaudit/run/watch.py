"""``mpaudit.watch``: observe a training run you already have, and write the same report when it ends.

::

    scaler = torch.amp.GradScaler("cuda")
    with mpaudit.watch(model, optimizer, scaler=scaler, out="reports/run") as w:
        for x, y in loader:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            w.log(loss)                      # optional: the training loss of this step

Nothing in the loop changes. The watch hooks the model (a forward pre-hook on the root opens a step at the first
training-mode forward with gradients on), the optimizer (its step hooks) and, when given, the GradScaler (its
``unscale_``, ``step`` and ``update``, wrapped on that instance and restored at the end). Per optimizer step:

* parameter gradients are read once the step's backwards are done and before anything unscales or clips them —
  inside the first ``scaler.unscale_`` / ``scaler.step`` with a GradScaler (fp16 gradients as fp16 held them,
  multiplied by the loss scale, as ``mpaudit run`` records them), else just before ``optimizer.step()`` (after
  any clipping your loop does);
* the step ends at ``scaler.update()`` with a GradScaler (a lowered scale means the step was skipped), else right
  after ``optimizer.step()``;
* a traced step (step 0, every ``trace_every``-th, the two after an anomaly) records per-layer statistics: the
  same :class:`~mpaudit.trace.tracer.Tracer` as ``mpaudit run``;
* after an anomaly (a non-finite loss, or a step GradScaler skipped once it had found its scale) the next steps
  run under the op-by-op check of :mod:`mpaudit.trace.sites` until the first op that turned finite inputs into a
  non-finite output is found (forward and backward, at most :data:`LOCATE_TRIES` steps each): the failing step
  itself has already run, so the watch catches the trouble the next time it happens.

On leaving the block the watch detaches everything and writes ``report.json``, ``report.html``, ``summary.md`` and
``layers.csv`` into ``out`` — also when the loop raised (the arm is then ``failed`` with the error, which
propagates). The result holds one arm named by its precision (``fp32``, ``bf16`` or ``fp16``, from the autocast
the first forward ran under), marked ``observed``: there is no fp32 baseline, nothing to gate, and the report says
so.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpaudit.defaults import DEFAULT_TRACE_EVERY
from mpaudit.errors import UsageError, error_text
from mpaudit.numerics.causes import link, settle
from mpaudit.numerics.rules import Thresholds, flag
from mpaudit.results.model import ArmResult, AuditResult, LossScale, Site
from mpaudit.run.env import collect_env
from mpaudit.run.train import DIVERGE_PATIENCE, _loop_step_s
from mpaudit.trace.tracer import Tracer, TraceSchedule
from mpaudit.vocab import DIVERGED, FAILED, OK, Status

LOCATE_TRIES = 3
"""Steps checked op by op for the origin of non-finite values after an anomaly, per phase, before giving up."""

PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Watch:
    """Observes a training loop (see the module docstring); use :func:`watch` to make one.

    After the block: ``result`` holds the :class:`~mpaudit.results.model.AuditResult` and ``paths`` the files
    written. ``metrics`` may be filled during the run (``w.metrics["accuracy"] = 0.93``): they become the arm's
    metrics, shown in the report (never gated).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        scaler: Any = None,
        out: str | Path | None = "reports/run",
        *,
        name: str | None = None,
        precision: str | None = None,
        trace_every: int = DEFAULT_TRACE_EVERY,
        trace: Sequence[str] = (),
        trace_depth: int | None = None,
        thresholds: Mapping[str, float] | None = None,
        plotlyjs: str = "inline",
        read_gradients: bool = True,
    ) -> None:
        """``read_gradients=False`` leaves reading gradients (without a GradScaler) to the caller's
        :meth:`gradients_ready`: for frameworks that run forward and backward inside ``optimizer.step()``."""
        if not isinstance(model, nn.Module):
            raise UsageError(f"mpaudit.watch needs the torch.nn.Module you train, not {type(model).__name__}.")
        self.model = model
        self.optimizer = _unwrap_optimizer(optimizer)
        self.scaler = scaler if scaler is not None and _scaler_enabled(scaler) else None
        if precision is not None and precision not in PRECISIONS.values():
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS.values())}, not {precision!r}.")
        self.out = None if out is None else Path(out)
        self.name = name or (self.out.name if self.out is not None else "run")
        self._precision = precision
        self._thresholds = Thresholds.from_mapping(thresholds or {})
        self._plotlyjs = plotlyjs
        self._auto_gradients = read_gradients
        self._trace_args = (tuple(trace), trace_depth)
        self.schedule = TraceSchedule(trace_every)
        self.tracer: Tracer | None = None
        if trace_every > 0:
            self.tracer = Tracer(model, include=trace, depth=trace_depth)
        self.metrics: dict[str, float] = {}
        self.result: AuditResult | None = None
        self.paths: dict[str, Path] = {}
        # the run so far
        self.step = 0
        self.losses: list[float] = []
        self.scales: list[float] = []
        self.skipped: list[int] = []
        self.sites: list[Site] = []
        self.notes: list[str] = []
        self._step_times: list[float] = []
        self._status: Status = OK
        self._error: str | None = None
        self._nonfinite_run = 0
        # the step in progress
        self._open = False
        self._traced = False
        self._gradients_read = False
        self._stepped = False
        self._step_losses: dict[int, list[torch.Tensor]] = {}
        self._unsettled: int | None = None
        self._t0 = 0.0
        self._started = 0.0
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[str] = []
        self._locator: _Locator | None = None
        self._locate_tries = {"forward": 0, "backward": 0}
        self._found = {"forward": False, "backward": False}
        self._armed = False
        self._device_type = "cpu"
        self._autocast_seen: str | None = None

    # ------------------------------------------------------------------ the block

    def __enter__(self) -> Watch:
        self._started = time.perf_counter()
        self._device_type = _device_of(self.model).type
        if self.tracer is not None:
            self.tracer.attach()
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward))
        if self._auto_gradients:
            self._handles.append(self.optimizer.register_step_pre_hook(lambda *_: self.gradients_ready()))
        self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self._on_optimizer_step()))
        if self.scaler is not None:
            self._wrap_scaler()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.fail(exc)
        try:
            self.close()
        except Exception:
            if exc is None:
                raise
            # the user's own exception matters more than a report that could not be written

    def close(self) -> AuditResult:
        """Detach every hook, build the result and write the report (``out``); what leaving the block does."""
        if self._open and self._gradients_read:
            self.end_step()  # a last step whose update never came (the loop raised, or stopped mid-step)
        self._settle()
        self._stop_locating()
        self._open = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unwrap_scaler()
        trace = None
        if self.tracer is not None:
            trace = self.tracer.summary() if self.tracer.summary().steps else None
            self.tracer.detach()
        self.result = self._result(trace)
        if self.out is not None:
            from mpaudit.report import write_report

            self.paths = write_report(self.result, self.out, plotlyjs=self._plotlyjs)
        return self.result

    def fail(self, exc: BaseException) -> None:
        """Mark the run ``failed`` with ``exc`` (the loop raised); the report still holds the steps before it."""
        self._status, self._error = FAILED, error_text(exc)
        self.notes.append(f"The training loop raised {error_text(exc)}; the report holds the steps before it.")

    # ------------------------------------------------------------------ what the loop may call

    def log(self, loss: torch.Tensor | float) -> None:
        """Report a training loss: of the step in progress, or — between ``optimizer.step()`` and the next forward —
        of the step that just ended. Call it any number of times per step: the step's loss is their mean. No host
        sync here (the value is read when the next step begins)."""
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        target = self.step if self._open or self.step == 0 else self.step - 1
        self._step_losses.setdefault(target, []).append(value)

    # ------------------------------------------------------------------ the step protocol (integrations drive it)

    def begin_step(self, _from_forward: bool = False) -> None:
        """Open the next optimizer step (idempotent); the first training forward calls it."""
        if self._open:
            return
        self._settle()
        self._open = True
        self._gradients_read = self._stepped = False
        self._t0 = time.perf_counter()
        self._traced = self.tracer is not None and self.schedule.wants(self.step)
        if self._traced and self.tracer is not None:
            scale = float(self.scaler.get_scale()) if self.scaler is not None else None
            self.tracer.start_step(self.step, scale)
        if self._armed:
            self._start_locating(inside_root=_from_forward)

    def gradients_ready(self) -> None:
        """The step's gradients are complete and not yet unscaled or clipped: read them (once per step)."""
        if not self._open or self._gradients_read:
            return
        self._gradients_read = True
        self._stop_locating()  # forward and backward are done: the optimizer's ops are not origins
        if self._traced and self.tracer is not None:
            self.tracer.after_backward()

    def optimizer_stepped(self) -> None:
        """The optimizer has stepped: record the updates."""
        if not self._open:
            return
        self._stepped = True
        if self._traced and self.tracer is not None:
            self.tracer.after_optimizer_step()

    def end_step(self, skipped: bool = False, scale: float | None = None) -> None:
        """Close the step: its statistics, loss, loss scale and anomalies. ``skipped``: GradScaler skipped it."""
        if not self._open:
            self.begin_step()  # a step whose forward ran outside the model's training mode: still a step
        self._stop_locating()
        if self._traced and self.tracer is not None:
            if not self._gradients_read:  # never told (e.g. a closure ran inside optimizer.step): read them now
                self._gradients_read = True
                self.tracer.after_backward()  # no update statistics: the weights already moved
            self.tracer.finish_step(summary=False)
        step = self.step
        if scale is not None:
            self.scales.append(scale)
            if skipped:
                self.skipped.append(step)
                self.schedule.notify_anomaly(step)
                self._arm_locator(skipped=True, loss=0.0)  # the loss, logged or not yet, is settled later
        self._step_times.append(time.perf_counter() - self._t0)
        self._unsettled = step
        self.step += 1
        self._open = False

    def _settle(self) -> None:
        """Read the loss of the last ended step (its value may be logged after its optimizer step) and act on it:
        a non-finite loss is an anomaly, and a run of them (any one without a GradScaler) is a divergence."""
        step, self._unsettled = self._unsettled, None
        if step is None:
            return
        logged = self._step_losses.pop(step, [])
        if not logged:
            return
        values = [float(v) if v.numel() == 1 else float(v.float().mean()) for v in logged]  # one host sync each
        value = sum(values) / len(values)
        self.losses.append(value)
        if math.isfinite(value):
            self._nonfinite_run = 0
            return
        self._nonfinite_run += 1
        if self._status == OK and (self.scaler is None or self._nonfinite_run >= DIVERGE_PATIENCE):
            why = "" if self.scaler is None else f" for {self._nonfinite_run} steps in a row"
            self._status, self._error = DIVERGED, f"loss became {value} at step {step + 1}{why}"
        self.schedule.notify_anomaly(step)
        self._arm_locator(skipped=step in self.skipped, loss=value)

    # ------------------------------------------------------------------ hooks

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if self._autocast_seen is None:
            self._autocast_seen = _autocast_precision(self._device_type)
        self.begin_step(_from_forward=True)

    def _on_optimizer_step(self) -> None:
        self.optimizer_stepped()
        if self.scaler is None:
            self.end_step()

    def _wrap_scaler(self) -> None:
        scaler, watched = self.scaler, self.optimizer
        assert scaler is not None
        unscale, step, update = scaler.unscale_, scaler.step, scaler.update

        def ours(optimizer: Any) -> bool:
            return optimizer is watched or getattr(optimizer, "optimizer", None) is watched \
                or getattr(optimizer, "_optimizer", None) is watched

        def unscale_(optimizer: Any) -> Any:
            if ours(optimizer):
                self.gradients_ready()
            return unscale(optimizer)

        def step_(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            if ours(optimizer):
                self.gradients_ready()
            return step(optimizer, *args, **kwargs)

        def update_(*args: Any, **kwargs: Any) -> Any:
            before = float(scaler.get_scale())
            out = update(*args, **kwargs)
            self.end_step(skipped=float(scaler.get_scale()) < before, scale=before)
            return out

        scaler.unscale_, scaler.step, scaler.update = unscale_, step_, update_
        self._wrapped = ["unscale_", "step", "update"]

    def _unwrap_scaler(self) -> None:
        for attr in self._wrapped:
            with contextlib.suppress(AttributeError):
                delattr(self.scaler, attr)  # the instance attribute goes; the class's method shows again
        self._wrapped = []

    # ------------------------------------------------------------------ finding where non-finite values start

    def _arm_locator(self, skipped: bool, loss: float) -> None:
        """After an anomaly: check the next step op by op, unless its phase was found or tried enough already."""
        calibrating = self.skipped == list(range(len(self.skipped)))  # GradScaler finding its scale from step 0
        forward_due = not math.isfinite(loss) and not self._found["forward"]
        backward_due = skipped and not calibrating and not self._found["backward"]
        due = [p for p, d in (("forward", forward_due), ("backward", backward_due)) if d]
        self._armed = self._armed or any(self._locate_tries[p] < LOCATE_TRIES for p in due)

    def _start_locating(self, inside_root: bool) -> None:
        from mpaudit.trace.sites import StepLocator

        self._armed = False
        self._locator = _Locator(StepLocator(self.model, self.step, inside_root))
        for phase in self._locate_tries:
            self._locate_tries[phase] += 1

    def _stop_locating(self) -> None:
        locator, self._locator = self._locator, None
        if locator is None:
            return
        try:
            found = locator.close()
        except Exception as exc:  # the report stands without a site
            self.notes.append(f"Locating the first non-finite op failed: {error_text(exc)}")
            return
        for site in found:
            if site is not None and not self._found[site.phase]:
                self._found[site.phase] = True
                self.sites.append(site)
                if site.phase == "forward":
                    self._found["backward"] = True  # a forward failure's backward is its consequence

    # ------------------------------------------------------------------ the result

    @property
    def precision(self) -> str:
        """The precision the run computes in: given, else the autocast of its first training forward, else the
        parameters' dtype (fp16 when a GradScaler scales the loss)."""
        if self._precision is not None:
            return self._precision
        if self._autocast_seen is not None and self._autocast_seen != "fp32":
            return self._autocast_seen
        dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
        if dtype in (torch.float16, torch.bfloat16):
            return PRECISIONS[dtype]
        return "fp16" if self.scaler is not None else "fp32"

    def _result(self, trace: Any) -> AuditResult:
        from mpaudit import __version__

        name = self.precision
        status, error = self._status, self._error
        if status == OK and self.step == 0:
            status, error = FAILED, "no optimizer step was observed inside the watch block"
        notes = list(self.notes)
        if not self.losses and self.step:
            notes.append("No loss was reported (w.log(loss)), so the training curve is empty.")
        arm = ArmResult(
            name=name, status=status, error=error, loss=self.losses, metrics=dict(self.metrics), steps=self.step,
            train_s=time.perf_counter() - self._started,
            loss_scale=LossScale(history=self.scales, skipped_steps=self.skipped) if self.scaler is not None else None,
            train_step_s=_loop_step_s(self._step_times),
            fp16_mode="native" if name == "fp16" else None,
            autocast_policy=self._device_type if name != "fp32" and self._autocast_seen == name else None,
            trace=trace, sites=self.sites, notes=notes, observed=True,
        )
        arms = {name: arm}
        flags = link(flag({name: trace} if trace is not None else {}, arms, self._thresholds), arms)
        flags = settle(flags, set(), {name: trace.layers} if trace is not None else {}, [name])
        device = _device_of(self.model)
        script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("")
        sha = hashlib.sha256(script.read_bytes()).hexdigest() if script.is_file() else ""
        trace_include, trace_depth = self._trace_args
        config: dict[str, Any] = {
            "observed": True, "arms": [name], "steps": self.step, "seeds": [], "trace_every": self.schedule.every,
            "trace": list(trace_include), "trace_depth": trace_depth, "thresholds": dict(self._thresholds.__dict__),
            "optimizer": type(self.optimizer).__name__, "scaler": type(self.scaler).__name__ if self.scaler else None,
        }
        return AuditResult(
            task=self.name, env=collect_env(device, torch.initial_seed(), script, sha, list(sys.argv)), config=config,
            arms=arms, flags=flags,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), mpaudit_version=__version__,
        )


class _Locator:
    """One step checked op by op (:class:`mpaudit.trace.sites.StepLocator`), entered now and closed later."""

    def __init__(self, locator: Any) -> None:
        self.locator = locator
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(locator)

    def close(self) -> list[Site | None]:
        self.stack.close()
        return list(self.locator.sites())


def watch(
    model: nn.Module,
    optimizer: Any,
    scaler: Any = None,
    out: str | Path | None = "reports/run",
    **options: Any,
) -> Watch:
    """Observe your own training loop: ``with mpaudit.watch(model, optimizer, scaler=None, out="reports/run"):``.

    Per-layer numerics on a schedule (``trace_every``, default 50; ``trace``, ``trace_depth`` as in
    ``mpaudit run``), where non-finite values start, the GradScaler's history, what-ifs for every format, flags, and
    the report written into ``out`` when the block ends (``out=None``: only ``w.result``). Call ``w.log(loss)`` in
    the loop to record the training loss. Other options: ``name`` (the report's title), ``precision`` (when it
    cannot be read from autocast), ``thresholds``, ``plotlyjs``. See :mod:`mpaudit.run.watch` for what is hooked.
    """
    return Watch(model, optimizer, scaler, out, **options)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), or ``optimizer`` itself."""
    for _ in range(4):  # AcceleratedOptimizer subclasses Optimizer itself: look inside first
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"mpaudit.watch needs the torch.optim.Optimizer you step, not {type(optimizer).__name__}.")
    return optimizer


def _scaler_enabled(scaler: Any) -> bool:
    for attr in ("unscale_", "step", "update", "get_scale"):
        if not callable(getattr(scaler, attr, None)):
            raise UsageError(f"scaler must be a torch.amp.GradScaler, not {type(scaler).__name__}.")
    enabled = getattr(scaler, "is_enabled", None)
    return bool(enabled()) if callable(enabled) else True


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast_precision(device_type: str) -> str:
    """``bf16`` / ``fp16`` when autocast is on for ``device_type`` (``fp32`` otherwise)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return "fp32"
        return PRECISIONS.get(torch.get_autocast_dtype(device_type), "fp32")
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return "fp32"


__all__ = ["LOCATE_TRIES", "Watch", "watch"]
