"""Per-layer error attribution: which layer *introduces* the error of a precision, and how it accumulates.

On a few fixed batches, with the fp32 arm's weights at the end of training (eval mode, no gradients):

* **local error** — each traced module is fed the *fp32* inputs it saw in the fp32 forward pass (in the
  dtype the arm's own forward gave it: fp16 after an fp16 matmul) and run under the arm's precision; its
  output is compared with its fp32 output. This is the error the layer itself introduces, free of what
  earlier layers did.
* **drift** — the whole model runs under the arm's precision and every traced module's output is compared
  with the fp32 pass: the error accumulated up to that layer.

A half-weight arm (``bf16-pure``) runs a bf16 copy of the trained weights with the batch's floating tensors in bf16
and no autocast: every op in bf16, as it trained. A float8 arm runs a copy whose Linear layers torchao converted
under the arm's recipe (:mod:`mpaudit.run.fp8`), under bf16 autocast: a Linear layer's own error is then that of its
float8 forward GEMM. (The held-out batches are what the attribution sees: outliers that only training batches hold
show in the float8 cast statistics, :mod:`mpaudit.trace.fp8_probe`, not here.)

Both are given as SQNR (signal-to-quantisation-noise ratio, dB: higher is better; fp16 rounding alone is
about 70 dB, bf16's about 50 dB; ``-inf`` when the output is not finite) and relative error (‖y−ŷ‖/‖y‖).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpaudit.arms import Arm
from mpaudit.results.model import LayerError
from mpaudit.run.batches import cast_floating, casting_pre_hook, move_to_device
from mpaudit.run.precision import autocast
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import Task

SHADOW_BATCHES = 2
"""Batches the attribution runs on: enough to average out one odd batch, cheap next to training."""

@dataclass
class _Acc:
    """Sums over calls and batches: signal energy, noise energy, and whether any output was not finite."""

    signal: float = 0.0
    noise: float = 0.0
    nonfinite: bool = False

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref64, out64 = ref.detach().double(), out.detach().double()
        if not bool(torch.isfinite(out64).all()):  # one host sync per compared output, after the forward
            self.nonfinite = True
            return
        self.signal += float((ref64 * ref64).sum())
        self.noise += float(((out64 - ref64) ** 2).sum())

    def sqnr_db(self) -> float:
        if self.nonfinite:
            return -math.inf
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    def rel_error(self) -> float:
        if self.nonfinite:
            return math.inf
        if self.signal == 0:
            return 0.0 if self.noise == 0 else math.inf
        return math.sqrt(self.noise / self.signal)


@dataclass
class _Record:
    """What each traced module saw and returned during one forward pass, call by call."""

    inputs: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _first_float(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = _first_float(v)
            if t is not None:
                return t
    return None


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_detach(v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _like(values: Any, arm_values: Any) -> Any:
    """The fp32 ``values``, each floating tensor cast to the dtype its counterpart had in the arm's own
    forward pass (a layer after an fp16 matmul receives fp16): the same numbers, the arm's formats."""
    if isinstance(values, torch.Tensor) and isinstance(arm_values, torch.Tensor):
        same = values.is_floating_point() and arm_values.is_floating_point()
        return values.to(arm_values.dtype) if same else values
    if isinstance(values, tuple) and hasattr(values, "_fields") and isinstance(arm_values, tuple):
        return type(values)(*(_like(v, a) for v, a in zip(values, arm_values, strict=False)))
    if isinstance(values, (tuple, list)) and isinstance(arm_values, (tuple, list)) and len(values) == len(arm_values):
        return type(values)(_like(v, a) for v, a in zip(values, arm_values, strict=True))
    if isinstance(values, dict) and isinstance(arm_values, dict):
        return {k: _like(v, arm_values.get(k)) for k, v in values.items()}
    return values


def _batches(task: Task, n: int) -> Iterator[Any]:
    loader: Iterable[Any] | None = task.eval_loader() if task.has_evaluate else None
    source = loader if loader is not None else task.train_loader()
    for i, batch in enumerate(source):
        if i >= n:
            return
        yield batch


def layer_errors(
    run: RunContext, model: nn.Module, arms: Sequence[Arm], paths: Sequence[str], batches: int = SHADOW_BATCHES,
) -> dict[str, list[LayerError]]:
    """Local error and drift of every module in ``paths`` for each non-fp32 arm in ``arms``, measured on
    ``model`` (the trained fp32 model) in eval mode on the first ``batches`` batches (eval loader first)."""
    targets = [a for a in arms if not a.is_baseline and run.skip_reason(a) is None]
    if not targets or not paths:
        return {}
    local = {a.name: {p: _Acc() for p in paths} for a in targets}
    drift = {a.name: {p: _Acc() for p in paths} for a in targets}
    was_training = model.training
    model.eval()
    models = {a.name: _arm_model(model, a, run) for a in targets}
    try:
        with torch.no_grad():
            for batch in _batches(run.task, batches):
                batch = move_to_device(batch, run.device)
                ref = _recorded_loss(run.task, model, paths, batch)
                for arm in targets:
                    arm_model = models[arm.name]
                    if arm_model is None:
                        continue
                    arm_batch = batch if arm.weights_dtype is None else cast_floating(batch, arm_model.dtype)
                    _compare_arm(run, arm_model.module, dict(arm_model.module.named_modules()), arm, arm_batch, ref,
                                 paths, local[arm.name], drift[arm.name])
    finally:
        model.train(was_training)
    return {
        arm.name: [
            LayerError(layer=p, sqnr_db=local[arm.name][p].sqnr_db(), rel_error=local[arm.name][p].rel_error(),
                       drift_sqnr_db=drift[arm.name][p].sqnr_db(), drift_rel_error=drift[arm.name][p].rel_error())
            for p in paths if _seen(local[arm.name][p], drift[arm.name][p])
        ]
        for arm in targets
    }


@dataclass
class _ArmModel:
    """The model an arm's forward runs: the trained fp32 model itself, or a copy in the arm's weight dtype."""

    module: nn.Module
    dtype: torch.dtype


def _arm_model(model: nn.Module, arm: Arm, run: RunContext | None = None) -> _ArmModel | None:
    """The fp32 model for an autocast arm; for a half-weight arm a copy cast to its weight dtype, taking its inputs in
    that dtype as it trained; for a float8 arm a copy with its Linear layers converted (None when the model cannot be
    copied: that arm is left out of the table)."""
    if arm.fp8 is not None:
        from mpaudit.run.fp8 import convert

        try:
            converted = copy.deepcopy(model)
            convert(converted, arm, run.device if run is not None else torch.device("cpu"))
        except Exception:
            return None
        return _ArmModel(converted, torch.float32)
    if arm.weights_dtype is None:
        return _ArmModel(model, torch.float32)
    dtype = getattr(torch, arm.weights_dtype)
    try:
        copied = copy.deepcopy(model).to(dtype=dtype)
    except Exception:
        return None
    copied.register_forward_pre_hook(casting_pre_hook(dtype), with_kwargs=True)
    return _ArmModel(copied, dtype)


def _recorded_loss(task: Task, model: nn.Module, paths: Sequence[str], batch: Any) -> _Record:
    """The inputs and outputs of the modules at ``paths`` while ``loss_fn`` runs once on ``batch``."""
    rec = _Record()
    modules = dict(model.named_modules())
    handles = []
    for path in paths:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, path: str = path) -> None:
            y = _first_float(out)
            if y is None:
                return
            rec.outputs.setdefault(path, []).append(y.detach())
            rec.inputs.setdefault(path, []).append((_detach(args), _detach(kwargs)))

        handles.append(modules[path].register_forward_hook(hook, with_kwargs=True))
    try:
        task.loss(model, batch)
    finally:
        for h in handles:
            h.remove()
    return rec


def _seen(*accs: _Acc) -> bool:
    """True when anything was compared (the module ran and returned a floating tensor)."""
    return any(a.signal or a.noise or a.nonfinite for a in accs)


def _compare_arm(
    run: RunContext, model: nn.Module, modules: dict[str, nn.Module], arm: Arm, batch: Any, ref: _Record,
    paths: Sequence[str], local: dict[str, _Acc], drift: dict[str, _Acc],
) -> None:
    with run.step_context(arm), autocast(arm, run.device.type):
        seen = _recorded_loss(run.task, model, paths, batch)
        for path in paths:
            calls = zip(ref.inputs.get(path, []), seen.inputs.get(path, []), ref.outputs.get(path, []), strict=False)
            for (args, kwargs), (arm_args, arm_kwargs), y in calls:
                try:
                    out = _first_float(modules[path](*_like(args, arm_args), **_like(kwargs, arm_kwargs)))
                except Exception:  # a module that cannot run on its own (needs state set by its parent)
                    break
                if out is not None and out.shape == y.shape:
                    local[path].add(y, out)
    for path in paths:
        for y, out in zip(ref.outputs.get(path, []), seen.outputs.get(path, []), strict=False):
            if out.shape == y.shape:
                drift[path].add(y, out)


__all__ = ["SHADOW_BATCHES", "layer_errors"]
