"""Loading the task file (``model.py``) and checking it keeps the contract (the README's "The task file").

A task file is plain Python with module-level functions: ``build_model``, ``train_loader`` and
``loss_fn`` are required; ``eval_loader``, ``evaluate``, ``build_optimizer``, ``build_scheduler`` and
``custom_step`` are optional, and so are the module-level numbers ``clip_grad_norm`` and ``grad_accumulation``
(the training recipe: see :mod:`mpaudit.run.step`) and a module-level ``METRICS = {"mae": "min"}`` declaring which
way each metric improves. Every breach is reported as a :class:`~mpaudit.errors.TaskError` with one sentence
naming the problem.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mpaudit.ci.gaps import check_declared_directions
from mpaudit.errors import TaskError, UsageError
from mpaudit.run.fp8 import quiet_import

REQUIRED = ("build_model", "train_loader", "loss_fn")
OPTIONAL = ("eval_loader", "evaluate", "build_optimizer", "build_scheduler", "custom_step")
RECIPE_NUMBERS = ("clip_grad_norm", "grad_accumulation")
"""Module-level numbers of the training recipe (each overridable on the command line)."""
CUSTOM_STEP_EXCLUDES = ("clip_grad_norm", "grad_accumulation", "build_scheduler")
"""What a ``custom_step`` owns itself: defining any of these beside it is a contract error."""
DIRECTIONS = "METRICS"
"""The optional module-level dict declaring each metric's direction: ``METRICS = {"mae": "min", "bleu": "max"}``."""


@dataclass(frozen=True)
class Task:
    """A loaded task file: its path, content hash and the contract functions it defines."""

    path: Path
    sha256: str
    module: ModuleType

    @property
    def name(self) -> str:
        """The task's name: the file stem, or the folder name for a ``model.py`` inside a suite."""
        if self.path.stem == "model" and self.path.parent.name:
            return self.path.parent.name
        return self.path.stem

    def fn(self, name: str) -> Callable[..., Any] | None:
        """The contract function ``name``, or None when the optional function is absent."""
        return getattr(self.module, name, None)

    @property
    def has_evaluate(self) -> bool:
        return self.fn("evaluate") is not None

    @property
    def metric_directions(self) -> dict[str, str]:
        """The task's declared ``METRICS``: metric name to ``min`` (lower is better) or ``max``; empty without."""
        return dict(getattr(self.module, DIRECTIONS, None) or {})

    @property
    def has_custom_step(self) -> bool:
        return self.fn("custom_step") is not None

    @property
    def has_scheduler(self) -> bool:
        return self.fn("build_scheduler") is not None

    @property
    def clip_grad_norm(self) -> float | None:
        """The task's ``clip_grad_norm`` (checked by :func:`load_task`), None when it defines none."""
        value = getattr(self.module, "clip_grad_norm", None)
        return None if value is None else float(value)

    @property
    def grad_accumulation(self) -> int | None:
        """The task's ``grad_accumulation`` (checked by :func:`load_task`), None when it defines none."""
        value = getattr(self.module, "grad_accumulation", None)
        return None if value is None else int(value)

    # The calls below wrap user code so that a raise is reported as the user's error, not ours.

    def build_model(self) -> nn.Module:
        model = _call(self, "build_model")
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"build_model() in {self.path.name} must return a torch.nn.Module, "
                f"but it returned {_describe(model)}."
            )
        return model

    def train_loader(self) -> Iterable[Any]:
        return _iterable(self, "train_loader", _call(self, "train_loader"))

    def eval_loader(self) -> Iterable[Any] | None:
        if self.fn("eval_loader") is None:
            return None
        return _iterable(self, "eval_loader", _call(self, "eval_loader"))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.fn("build_optimizer") is None:
            return torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt = _call(self, "build_optimizer", model)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TaskError(
                f"build_optimizer(model) in {self.path.name} must return a torch.optim.Optimizer, "
                f"but it returned {_describe(opt)}."
            )
        return opt

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The task's LR scheduler for ``optimizer``, None without ``build_scheduler``; TaskError when what it
        returns is not a scheduler mpaudit can step after every optimizer step."""
        if self.fn("build_scheduler") is None:
            return None
        scheduler = _call(self, "build_scheduler", optimizer)
        return check_scheduler(scheduler, optimizer, self.path.name)

    def custom_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, amp: Any) -> torch.Tensor:
        """Call the task's ``custom_step`` and return the loss it reports as a detached scalar tensor."""
        result = self.module.custom_step(model, batch, optimizer, amp)
        return check_step_loss(result, self.path.name)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Call ``loss_fn`` and check it returned a scalar floating-point tensor."""
        loss = self.module.loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise TaskError(
                f"loss_fn(model, batch) in {self.path.name} must return a scalar tensor, "
                f"but it returned {_describe(loss)}."
            )
        if loss.numel() != 1 or loss.dim() > 1:
            raise TaskError(
                f"loss_fn(model, batch) in {self.path.name} must return a scalar tensor, "
                f"but it returned a tensor of shape {tuple(loss.shape)}."
            )
        if not loss.is_floating_point():
            raise TaskError(
                f"loss_fn(model, batch) in {self.path.name} must return a floating-point tensor, "
                f"but it returned dtype {loss.dtype}."
            )
        return loss.reshape(())

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """Call ``evaluate`` and check it returned a dict of numbers (converted to floats)."""
        metrics = _call(self, "evaluate", model, loader)
        return check_metrics(metrics, self.path.name)


def check_metrics(metrics: Any, filename: str) -> dict[str, float]:
    """Return ``metrics`` as ``{str: float}`` or raise TaskError naming what is wrong with it."""
    if not isinstance(metrics, Mapping):
        raise TaskError(
            f"evaluate(model, loader) in {filename} must return a dict of numbers, "
            f"but it returned {_describe(metrics)}."
        )
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TaskError(
                f"evaluate(model, loader) in {filename} must return a dict of numbers, "
                f"but metric {str(key)!r} is {_describe(value)}."
            )
        out[str(key)] = float(value)
    return out


def check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, filename: str) -> Any:
    """``scheduler`` when it is an LR scheduler of ``optimizer`` that steps without arguments; TaskError otherwise."""
    where = f"build_scheduler(optimizer) in {filename}"
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    if isinstance(scheduler, plateau):
        raise TaskError(
            f"{where} returned a ReduceLROnPlateau, which needs a metric at every step; mpaudit steps the "
            "scheduler after every optimizer step without one, so return a schedule such as LambdaLR or OneCycleLR."
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TaskError(
            f"{where} must return a torch.optim.lr_scheduler.LRScheduler, but it returned {_describe(scheduler)}."
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise TaskError(f"{where} returned a scheduler of another optimizer; build it on the optimizer it is given.")
    return scheduler


def check_step_loss(result: Any, filename: str) -> torch.Tensor:
    """The loss a ``custom_step`` returned, as a detached 0-d tensor (a number is accepted); TaskError otherwise."""
    where = f"custom_step(model, batch, optimizer, amp) in {filename}"
    if isinstance(result, torch.Tensor):
        if result.numel() != 1 or not result.is_floating_point():
            raise TaskError(f"{where} must return its loss as a scalar floating-point tensor or a number, but it "
                            f"returned {_describe(result)} of dtype {result.dtype}.")
        return result.detach().reshape(())
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        raise TaskError(f"{where} must return its loss (a scalar tensor or a number) for mpaudit to record, but it "
                        f"returned {_describe(result)}.")
    return torch.tensor(float(result))


def _check_recipe(module: ModuleType, filename: str) -> None:
    """The recipe numbers have the right type and sign, and a custom step does not come with what it owns."""
    clip = getattr(module, "clip_grad_norm", None)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real)
                             or not math.isfinite(float(clip)) or float(clip) <= 0):
        raise TaskError(f"clip_grad_norm in {filename} must be a positive number (the max gradient norm), "
                        f"but it is {_describe(clip)}.")
    accumulation = getattr(module, "grad_accumulation", None)
    if accumulation is not None and (isinstance(accumulation, bool) or not isinstance(accumulation, numbers.Integral)
                                     or int(accumulation) < 1):
        raise TaskError(f"grad_accumulation in {filename} must be a positive whole number of micro-batches per "
                        f"optimizer step, but it is {_describe(accumulation)}.")
    if hasattr(module, "custom_step"):
        clash = [name for name in CUSTOM_STEP_EXCLUDES if getattr(module, name, None) is not None]
        if clash:
            raise TaskError(
                f"Task file {filename} defines custom_step() and {', '.join(clash)}: a custom step owns clipping, "
                "accumulation and its scheduler itself, so do them inside custom_step() and remove "
                f"{', '.join(clash)}."
            )


def load_task(path: str | Path) -> Task:
    """Import a task file and check the required functions exist; raise TaskError otherwise."""
    path = Path(path)
    if not path.exists():
        raise TaskError(f"Task file {path} does not exist.")
    if path.is_dir():
        if (path / "model.py").is_file():
            path = path / "model.py"
        else:
            raise TaskError(f"{path} is a folder without a model.py; pass the task file itself.")
    if path.suffix != ".py":
        raise TaskError(f"Task file {path} is not a Python file (expected a .py file).")
    source = path.read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    try:
        compile(source, str(path), "exec")
    except (SyntaxError, ValueError) as exc:
        line = f" line {exc.lineno}:" if isinstance(exc, SyntaxError) and exc.lineno else ""
        msg = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise TaskError(f"Task file {path.name} is not valid Python:{line} {msg}.") from exc

    module = _import(path, sha)
    for name in REQUIRED:
        if not hasattr(module, name):
            raise TaskError(f"Task file {path.name} has no {name}() function, which the contract requires.")
    for name in REQUIRED + OPTIONAL:
        if hasattr(module, name) and not callable(getattr(module, name)):
            raise TaskError(f"{name} in {path.name} must be a function, but it is {_describe(getattr(module, name))}.")
    if hasattr(module, "evaluate") and not hasattr(module, "eval_loader"):
        raise TaskError(f"Task file {path.name} defines evaluate() but no eval_loader() to feed it.")
    if hasattr(module, DIRECTIONS):
        try:
            check_declared_directions(getattr(module, DIRECTIONS), f"{DIRECTIONS} in {path.name}")
        except UsageError as exc:
            raise TaskError(str(exc)) from None
    _check_recipe(module, path.name)
    return Task(path=path.resolve(), sha256=sha, module=module)


def preflight(task: Task, device: torch.device, found: dict[str, Any] | None = None) -> list[str]:
    """Exercise every contract function once in fp32 so a broken task fails before any arm trains.

    Catches: a non-Module model, an empty loader, a non-scalar or gradient-free loss, a bad optimizer or
    scheduler, a custom step that bypasses ``amp``, an evaluate that returns something other than a dict of
    numbers. Returns the metric names; ``found`` (when given) receives ``scheduler``: the scheduler's class name
    (None without ``build_scheduler``).
    """
    from mpaudit.run.batches import move_to_device

    model = task.build_model().to(device)
    batch = first_batch(task, "train_loader", task.train_loader())
    batch = move_to_device(batch, device)
    optimizer = task.build_optimizer(model)
    scheduler = task.build_scheduler(optimizer)
    if found is not None:
        found["scheduler"] = type(scheduler).__name__ if scheduler is not None else None
    model.train()
    loss = _guard(task, "loss_fn", lambda: task.loss(model, batch))
    if not loss.requires_grad:
        raise TaskError(
            f"loss_fn(model, batch) in {task.path.name} returned a tensor that does not require grad; "
            "compute it from the model's outputs without torch.no_grad() or .detach()."
        )
    if task.has_custom_step:
        _check_custom_step(task, model, batch, optimizer, device)
    loader = task.eval_loader()
    if loader is None:
        return []
    first_batch(task, "eval_loader", loader)
    model.eval()
    with torch.no_grad():
        return list(task.evaluate(model, task.eval_loader() or []))


def _check_custom_step(task: Task, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                       device: torch.device) -> None:
    """Run ``custom_step`` once in fp32 and check it does its precision work through ``amp``: a loss returned,
    gradients made by ``amp.backward`` and the optimizer stepped only by ``amp.step``."""
    from mpaudit.arms import ARMS
    from mpaudit.run.amp import Amp

    name = f"custom_step(model, batch, optimizer, amp) in {task.path.name}"
    model.zero_grad(set_to_none=True)
    amp = Amp(ARMS["fp32"], device.type, None)
    direct: list[bool] = []
    handle = optimizer.register_step_pre_hook(lambda *_: direct.append(True))
    try:
        _guard(task, "custom_step", lambda: task.custom_step(model, batch, optimizer, amp))
    finally:
        handle.remove()
    if len(direct) > amp.step_calls:
        raise TaskError(f"{name} called optimizer.step() itself; call amp.step(optimizer) instead, so the fp16 arm "
                        "steps through its GradScaler (which skips steps whose gradients overflowed).")
    has_grads = any(p.grad is not None for p in model.parameters())
    if amp.backward_calls == 0 and (has_grads or direct):
        raise TaskError(f"{name} ran a backward without amp.backward(loss); call amp.backward(loss) instead of "
                        "loss.backward(), so the fp16 arm scales the loss.")


def first_batch(task: Task, name: str, loader: Iterable[Any]) -> Any:
    """The first batch of ``loader``; TaskError when it yields nothing."""
    try:
        batches = list(itertools.islice(iter(loader), 1))
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"Iterating {name}() in {task.path.name} raised {_user_error(exc, task.path)}.") from exc
    if not batches:
        raise TaskError(f"{name}() in {task.path.name} yielded no batch; the loader is empty.")
    return batches[0]


def _import(path: Path, sha: str) -> ModuleType:
    mod_name = f"mpaudit_task_{path.stem}_{sha[:12]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"Task file {path} cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the task may import files beside it
    try:
        with quiet_import():  # transformers imports torchao when it is installed: no notices of missing GPU kernels
            spec.loader.exec_module(module)
    except Exception as exc:
        raise TaskError(f"Task file {path.name} failed to import: {_user_error(exc, path)}.") from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _call(task: Task, name: str, *args: Any) -> Any:
    return _guard(task, name, lambda: getattr(task.module, name)(*args))


def _guard(task: Task, name: str, thunk: Callable[[], Any]) -> Any:
    try:
        return thunk()
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"{name}() in {task.path.name} raised {_user_error(exc, task.path)}.") from exc


def _iterable(task: Task, name: str, obj: Any) -> Iterable[Any]:
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise TaskError(
            f"{name}() in {task.path.name} must return an iterable of batches, but it returned {_describe(obj)}."
        )
    return obj


def _user_error(exc: BaseException, path: Path) -> str:
    """``ExcType: message`` plus the line of the user's file where it was raised, when there is one."""
    text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    if frames:
        text += f" (at {path.name} line {frames[-1].lineno}: {(frames[-1].line or '').strip()})"
    return text


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"a {type(obj).__name__} ({text})"
