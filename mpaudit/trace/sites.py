"""Where trouble starts: the first op that produced a non-finite value, forward and backward.

Statistics on module outputs say which *module's output* first went bad, but the op that overflowed may sit
inside a module's own ``forward`` (attention scores ``q @ k.T`` in an attention module whose leaves all output
finite values). :func:`locate` replays one failing step of an arm — same weights (GradScaler skipped the step,
or the training loop held the update back), same batch, same random state, same precision — under a dispatch
mode that checks every op's output, and reports the first op whose inputs were finite and whose output is not:
the aten op, the innermost module whose forward was running (path and class), the phase, and the line of code
that called it. Backward ops are attributed to the module whose forward created their autograd node, with the
forward line that created it (autograd's anomaly mode records it). The replay costs one extra forward and
backward with a host sync per op, and runs only when a step fails, at most once per phase per arm.

An op whose output is non-finite *by design* is not an origin: it takes a non-finite scalar (``masked_fill(m,
-inf)``) or non-finite inputs (what consumes a mask). The replay leaves the model, its buffers and the random
state as they were.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mpaudit.results.model import Site
from mpaudit.run.precision import autocast
from mpaudit.run.prepare import PreparedArm

OUTSIDE_MODEL = "(loss_fn)"
"""The module name of ops that ran outside every module of the model (in ``loss_fn`` itself)."""
ROOT_MODULE = "(model)"
"""The module name of the model's root module (whose path is empty)."""
NEXT_OPS = 4
"""After a forward origin, the names of this many following ops are kept (``feeds`` in the site: does a softmax
consume the overflowing scores?)."""
_NODE_MODULE = "mpaudit_module"
"""Key of an autograd node's metadata holding the path of the module whose forward created it."""

_SKIP_DIRS = tuple(str(Path(p).resolve()) for p in (Path(torch.__file__).parent, Path(__file__).parent.parent))
"""Frames in these folders (torch, mpaudit) are not the user's code."""


class RngState:
    """The random state a step started from (CPU and every CUDA device), so a replay draws the same dropout."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _floats(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def _nonfinite_scalar(obj: Any) -> bool:
    leaves, _ = tree_flatten(obj)
    return any(isinstance(x, float) and not math.isfinite(x) for x in leaves)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())  # a host sync: the replay's whole point


def _user_frame() -> tuple[str, str]:
    """``file:line`` and the text of the innermost frame outside torch and mpaudit (the user's model code)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith("<") and not str(Path(filename).resolve()).startswith(_SKIP_DIRS):
            import linecache

            return f"{filename}:{frame.f_lineno}", linecache.getline(filename, frame.f_lineno).strip()
        frame = frame.f_back  # type: ignore[assignment]
    return "", ""


def _traceback_frame(lines: Sequence[str]) -> tuple[str, str]:
    """The innermost user frame of an autograd node's forward traceback (``File "x.py", line 3, in f\\n code``)."""
    for entry in reversed(list(lines)):
        head, _, code = entry.strip().partition("\n")
        if not head.startswith('File "'):
            continue
        filename = head[len('File "'):head.index('"', len('File "'))]
        if filename.startswith("<") or str(Path(filename).resolve()).startswith(_SKIP_DIRS):
            continue
        line = head.split(", line ", 1)[1].split(",", 1)[0]
        return f"{filename}:{line}", code.strip()
    return "", ""


def _describe(t: torch.Tensor) -> str:
    finite = torch.isfinite(t)
    bad = int((~finite).sum())
    kinds = [name for name, mask in (("inf", torch.isinf(t)), ("NaN", torch.isnan(t))) if bool(mask.any())]
    largest = float(t[finite].abs().max()) if bool(finite.any()) else math.nan
    return f"{' and '.join(kinds)} in {bad} of {t.numel()} values (largest finite |x| {largest:.4g})"


class _Watch(TorchDispatchMode):
    """Checks every op's outputs; keeps the first forward and the first backward origin of non-finite values."""

    def __init__(self, stack: list[tuple[str, str]], step: int) -> None:
        super().__init__()
        self.stack = stack
        self.step = step
        self.phase = "forward"
        self.forward: Site | None = None
        self.backward: Site | None = None
        self.after: list[str] = []
        self.tainted = False
        """A non-finite value appeared in the forward pass: the backward's are consequences, not origins."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.forward is not None and len(self.after) < NEXT_OPS and self.phase == "forward":
            self.after.append(_op_name(func))
        if self.backward is not None or (self.phase == "backward" and self.tainted):
            return out
        if self.phase == "forward" and self.forward is not None:
            return out
        outs = _floats(out)
        bad = next((t for t in outs if not _finite(t)), None)
        if bad is None:
            return out
        if self.phase == "forward":
            self.tainted = True
        if _nonfinite_scalar((args, kwargs)) or not all(_finite(t) for t in _floats((args, kwargs))):
            return out  # non-finite by design (a mask), or handed on from an earlier op
        if self.phase == "forward":
            module, cls = self.stack[-1] if self.stack else (OUTSIDE_MODEL, "")
            source, code = _user_frame()
            self.forward = Site(phase="forward", module=module, module_class=cls, op=_op_name(func),
                                source=source, code=code, step=self.step, dtype=_dtype(bad), detail=_describe(bad))
        else:
            node = torch._C._current_autograd_node()
            meta = _metadata(node) if node is not None else {}
            source, code = _traceback_frame(meta.get("traceback_", []))
            module, cls = meta.get(_NODE_MODULE, (OUTSIDE_MODEL, ""))
            node_name = node.name() if node is not None else "the backward's start"
            self.backward = Site(phase="backward", module=module, module_class=cls,
                                 op=f"{_op_name(func)} in {node_name}", source=source, code=code, step=self.step,
                                 dtype=_dtype(bad), detail=_describe(bad))
        return out


def _op_name(func: Any) -> str:
    return str(func)  # e.g. aten.bmm.default


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _metadata(node: Any) -> dict[str, Any]:
    """An autograd node's metadata dict (a property at run time; the stubs call it a method)."""
    meta = node.metadata
    return meta() if callable(meta) else meta


def _mark_nodes(outputs: Any, owner: tuple[str, str]) -> None:
    """Label the autograd nodes behind ``outputs`` that no inner module claimed with the module that made them."""
    todo: list[Any] = [t.grad_fn for t in _floats(outputs) if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None:
            continue
        meta = _metadata(node)
        if _NODE_MODULE in meta:
            continue
        meta[_NODE_MODULE] = owner
        todo.extend(next_node for next_node, _ in node.next_functions)


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[tuple[str, str]]]:
    """The (path, class) of the modules of ``model`` whose forward is running, innermost last; on leaving a
    module's forward its autograd nodes are labelled with it."""
    names = {id(m): (path or ROOT_MODULE, type(m).__name__) for path, m in model.named_modules()}
    stack: list[tuple[str, str]] = []

    def enter(module: nn.Module, args: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        name = names.get(id(module))
        if name is not None and stack and stack[-1] == name:
            stack.pop()
            _mark_nodes(output, name)

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


def locate(
    prepared: PreparedArm, batch: Any, step: int, loss_scale: float | None, rng: RngState,
    group: Sequence[Any] | None = None,
) -> tuple[Site | None, Site | None]:
    """Replay ``step`` of ``prepared``'s arm from the random state ``rng`` (the weights must be those the step
    started from) and return its first forward and first backward origin of non-finite values.

    ``group`` is the step's micro-batches (``grad_accumulation``; without it, ``batch`` alone): each is replayed
    through ``loss_fn``, its loss divided by their count as the step did, until an origin turns up. A task with a
    ``custom_step`` is replayed through its ``loss_fn`` too: the forward mpaudit can run on its own.

    The model's gradients, buffers (BatchNorm statistics) and the random state are restored afterwards; the
    optimizer and GradScaler are not touched. Errors in the replay are the caller's to catch.
    """
    model = prepared.model
    group = [prepared.cast_batch(b) for b in group] if group is not None else [prepared.cast_batch(batch)]
    after_state = RngState()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}  # a custom step may be accumulating across calls
    was_training = model.training
    model.train()
    rng.restore()
    watch = _Watch([], step)
    try:
        for p in model.parameters():
            p.grad = None
        with _module_stack(model) as stack, prepared.context(), \
                torch.autograd.set_detect_anomaly(True, check_nan=False):
            watch.stack = stack
            with watch:
                for batch in group:
                    watch.phase = "forward"
                    with autocast(prepared.arm, prepared.run.device.type):
                        loss = prepared.run.task.loss(model, batch)
                    if len(group) > 1:
                        loss = loss / len(group)
                    if loss.requires_grad:
                        watch.phase = "backward"
                        (loss * loss_scale if loss_scale is not None else loss).backward()
                    if watch.forward is not None or watch.backward is not None:
                        break
        if watch.forward is not None and watch.after:
            watch.forward = _with_feeds(watch.forward, watch.after)
        return watch.forward, watch.backward
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        model.train(was_training)
        after_state.restore()


def _with_feeds(site: Site, after: list[str]) -> Site:
    from dataclasses import replace

    return replace(site, feeds=list(after))


class _LiveWatch(_Watch):
    """:class:`_Watch` over a step mpaudit does not run itself: the phase is backward while autograd's engine runs
    a node, forward otherwise (so micro-batches that alternate forward and backward are told apart)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.phase = "backward" if torch._C._current_autograd_node() is not None else "forward"
        return super().__torch_dispatch__(func, types, args, kwargs)


class StepLocator:
    """Checks every op of one live training step (:func:`mpaudit.watch`), for the first forward and first backward
    origin of non-finite values: enter it before the step's forward (from the model's forward pre-hook), leave it
    once the step's backwards are done, then read :meth:`sites`.

    Entered from inside the root module's forward pre-hook (``inside_root``), the root is put on the module stack by
    hand (the global hooks that keep the stack are registered too late for its own call). Costs a host sync per op while
    entered, like :func:`locate`; the watch enters it only on a few steps after an anomaly.
    """

    def __init__(self, model: nn.Module, step: int, inside_root: bool = False) -> None:
        self.model = model
        self.inside_root = inside_root
        """Entered from the root module's forward pre-hook (its forward is starting): put it on the stack by hand."""
        self._stack = contextlib.ExitStack()
        self._watch = _LiveWatch([], step)

    def __enter__(self) -> StepLocator:
        stack = self._stack.enter_context(_module_stack(self.model))
        if self.inside_root:
            stack.append((ROOT_MODULE, type(self.model).__name__))
        self._watch.stack = stack
        self._stack.enter_context(torch.autograd.set_detect_anomaly(True, check_nan=False))
        self._stack.enter_context(self._watch)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def sites(self) -> tuple[Site | None, Site | None]:
        """The first forward and the first backward origin seen while entered (None where there was none)."""
        forward = self._watch.forward
        if forward is not None and self._watch.after:
            forward = _with_feeds(forward, self._watch.after)
        return forward, self._watch.backward
