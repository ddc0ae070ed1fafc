"""CUDA autocast's op policy on a CPU: each op of a CPU arm runs in the dtype a GPU's autocast would give it.

``torch.autocast("cpu")`` and ``torch.autocast("cuda")`` follow different op lists
(:mod:`mpaudit.numerics.op_policy`): on a CPU ``exp``, ``softmax``, ``log_softmax``, ``sum``, ``layer_norm``,
``pow`` and ``norm`` of a half tensor run in half precision, on a GPU in fp32. A CPU audit that predicts GPU
training runs its arms inside :func:`cuda_autocast_policy`, where CPU tensors follow CUDA's lists.

How: CPU autocast stays on with the arm's dtype, so the dispatcher still routes every op on a CPU tensor through
the ``AutocastCPU`` key. For each op the two policies treat differently
(:func:`~mpaudit.numerics.op_policy.differing_ops`: ``exp``, ``softmax``, ``sum``, ``layer_norm``, ``pow``, ``norm``,
``einsum``, ``addmv``, ``cat``, ``avg_pool3d``...) a Python kernel is registered at that key, once per process
(:func:`install`, through ``torch.library``). It applies CUDA's rule while its thread is inside
:func:`cuda_autocast_policy` and CPU's rule otherwise, so ``torch.autocast("cpu")`` elsewhere behaves as before.
Ops both policies treat alike (Linear, convolutions, matmul: lower precision; most losses: fp32) keep CPU
autocast's own C++ kernels, its weight-cast cache included.

Why at the autocast key: it is where CUDA autocast itself acts. Above autograd, so the casts are recorded and
backward runs each op in the dtype its forward ran in (softmax backward in fp32 when its forward was fp32, then the
gradient is cast back to the input's dtype), exactly as on a GPU. Before composite ops decompose, so ``softmax``,
``layer_norm`` and ``einsum`` are seen whole, and the ops inside a handled op run without autocast, as CUDA's
kernels run them. Per overload, so in-place and ``out=`` variants are left alone as CUDA leaves them. (A
``TorchFunctionMode`` sees Python calls instead of aten ops, missing what a composite call such as
``F.cross_entropy`` runs inside; a ``TorchDispatchMode`` runs below autograd, after decomposition.)

Autocast state: inside :func:`gpu_autocast_state`, which the arm's forward context
(:func:`mpaudit.run.precision.autocast`) enters under this policy, CUDA autocast's state reads as it would on the
GPU: ``torch.is_autocast_enabled()`` is True and ``torch.get_autocast_dtype("cuda")`` is the arm's dtype
(torchao's float8 layers read these to cast their input), besides CPU autocast's own state. ``keep_fp32`` regions
turn off every autocast that is on, so kept modules still run in fp32. Code that turns autocast off for a region
should name the tensors' device (``x.device.type``), as device-agnostic code does.

Composes with :mod:`mpaudit.run.fp16_emulation`: the policy picks dtypes above autograd, the emulation computes
the fp16 matmuls and convolutions that reach it below.

Cast cache: as CUDA autocast does, the lower-precision cast of an fp32 leaf tensor that requires grad (a weight) is
made once per forward and reused while :func:`gpu_autocast_state` is entered, so a weight used several times (an
RNN cell's, once per time step) accumulates its gradient in half precision before the one cast back, as on a GPU.
Outside it (CPU's rules for the overridden ops), casts are not cached.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch._C import DispatchKey, DispatchKeySet
from torch._ops import OpOverload

from mpaudit.numerics.op_policy import (
    CPU_POLICY,
    CUDA_BANNED,
    CUDA_FP32_APPEND_DTYPE,
    CUDA_POLICY,
    NOT_APPLICABLE,
    PINNED_TORCH,
    CastPolicy,
    differing_ops,
)

AUTOCAST_KEY: Final = "AutocastCPU"
"""The dispatch key the policy's kernels are registered at: CPU autocast's."""
_AUTOCAST_CPU = DispatchKeySet(DispatchKey.AutocastCPU)
_FP32: Final = torch.float32
_HALF_DTYPES: Final = frozenset({torch.float16, torch.bfloat16})
_OVERRIDE_WARNING = r"(?s).*Overriding a previously registered kernel"
"""The dispatcher's warning when a kernel replaces CPU autocast's own (expected for the ops the policies treat
differently; the replaced kernel comes back when the registration is destroyed)."""
_PRIORITIZE_ERROR = "Unexpected floating ScalarType in at::autocast::prioritize"
"""CUDA autocast's error when a promote op gets fp16 and bf16 inputs together."""
_MAX_LISTED_OPS = 8
"""Op names a version warning lists before it says how many more there are."""


# ------------------------------------------------------------------------------------------------ state


class _State(threading.local):
    """Per-thread: whether CUDA's rules apply, and the cast cache of the current forward (None: no caching)."""

    def __init__(self) -> None:
        self.cuda = False
        self.cache: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] | None = None


_STATE = _State()


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Inside this block, ``torch.autocast("cpu")`` on this thread follows CUDA autocast's op lists.

    Wrap a whole training step (forward, backward, optimizer): the rules apply wherever CPU autocast is on, which
    is the forward. Installs the kernels on first use. Nesting is harmless; other threads are not affected.
    """
    install()
    previous = _STATE.cuda
    _STATE.cuda = True
    try:
        yield
    finally:
        _STATE.cuda = previous


def cuda_policy_active() -> bool:
    """Whether this thread is inside :func:`cuda_autocast_policy`."""
    return _STATE.cuda


@contextlib.contextmanager
def gpu_autocast_state(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast's state as the GPU run shows it (enabled, ``dtype``), and a fresh cast cache, in this block.

    Enter it inside ``torch.autocast("cpu", dtype=dtype)``: only the state reads change
    (``torch.is_autocast_enabled()``, ``torch.get_autocast_dtype("cuda")``); no CUDA tensor is involved. The cache
    is dropped when the outermost such block exits, as CUDA autocast drops its own when the outermost autocast
    region exits.
    """
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    outermost = _STATE.cache is None
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    if outermost:
        _STATE.cache = {}
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)
        if outermost:
            _STATE.cache = None


# ------------------------------------------------------------------------------------------------ install

_LOCK = threading.Lock()
_LIBRARY: torch.library.Library | None = None
_REGISTERED: tuple[str, ...] = ()


def install() -> tuple[str, ...]:
    """Register the policy's kernels at ``AutocastCPU`` (once per process; later calls return at once).

    Warns once when the installed torch is not the version the tables were copied from (:data:`PINNED_TORCH`).
    Returns the names of the ops that got a kernel.
    """
    global _LIBRARY, _REGISTERED
    if _LIBRARY is not None:
        return _REGISTERED
    with _LOCK:
        if _LIBRARY is not None:
            return _REGISTERED
        message = version_mismatch(torch.__version__)
        if message is not None:
            warnings.warn(message, stacklevel=3)
        library = torch.library.Library("aten", "IMPL")
        registered = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_OVERRIDE_WARNING)
            for name, (cuda, cpu) in differing_ops().items():
                op = resolve(name)
                if op is None:  # an op this torch does not have (another version: the warning above says so)
                    continue
                library.impl(name, _kernel(op, cuda, cpu), AUTOCAST_KEY, with_keyset=True)
                registered.append(name)
        _LIBRARY, _REGISTERED = library, tuple(registered)
        return _REGISTERED


def uninstall() -> None:
    """Remove the kernels again: CPU autocast's own kernels and fallthroughs come back (tests use this to compare
    with CPU autocast as shipped). Call it only while no thread runs under the policy."""
    global _LIBRARY, _REGISTERED
    with _LOCK:
        if _LIBRARY is not None:
            _LIBRARY._destroy()
        _LIBRARY, _REGISTERED = None, ()


def installed() -> bool:
    """Whether the policy's kernels are registered in this process."""
    return _LIBRARY is not None


@contextlib.contextmanager
def process_restored() -> Iterator[None]:
    """Leave the process as this block found it: kernels the block installed are removed when it ends, so code
    that runs after an audit in the same process (a notebook's own ``torch.compile`` under ``torch.autocast``,
    which the Python kernels at ``AutocastCPU`` would trip) sees CPU autocast as shipped."""
    before = installed()
    try:
        yield
    finally:
        if not before:
            uninstall()


def resolve(name: str) -> OpOverload | None:
    """The aten overload named ``name`` (``"sum"``, ``"sum.dim_IntList"``), None when this torch has none."""
    base, _, overload = name.partition(".")
    try:
        return getattr(getattr(torch.ops.aten, base), overload or "default")
    except AttributeError:
        return None


def version_mismatch(version: str) -> str | None:
    """Why the tables may not fit torch ``version`` (None when its major.minor is :data:`PINNED_TORCH`): the ops
    its CUDA autocast handles that no table lists, and the listed ops it lacks."""
    installed = ".".join(version.split("+")[0].split(".")[:2])
    if installed == PINNED_TORCH:
        return None
    unknown = sorted(set(cuda_autocast_ops()) - set(CUDA_POLICY) - set(NOT_APPLICABLE))
    missing = sorted(name for name in set(CUDA_POLICY) | set(CPU_POLICY) if resolve(name) is None)
    details = ""
    if unknown:
        details += (f" Ops this torch's CUDA autocast handles that the tables lack (they run as CPU autocast runs "
                    f"them): {_listed(unknown)}.")
    if missing:
        details += f" Listed ops this torch does not have: {_listed(missing)}."
    return (
        f"mpaudit's autocast op tables copy PyTorch {PINNED_TORCH}'s autocast source, but torch {version} is "
        f"installed: CPU arms follow CUDA autocast's {PINNED_TORCH} op lists, which may differ from this version's."
        + details
    )


def cuda_autocast_ops() -> list[str]:
    """The aten ops (``name`` or ``name.overload``) the installed torch has a CUDA autocast kernel for (a CPU build
    registers them too)."""
    names = torch._C._dispatch_get_all_op_names()
    return [n.removeprefix("aten::") for n in names
            if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")]


def _listed(names: list[str]) -> str:
    more = len(names) - _MAX_LISTED_OPS
    return ", ".join(names[:_MAX_LISTED_OPS]) + (f" and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------------------------ kernels

Rule = Callable[[DispatchKeySet, tuple[Any, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class _Slots:
    """Where an op's arguments of each kind sit: (position, name) pairs from its schema."""

    tensors: tuple[tuple[int, str], ...]
    """``Tensor`` and ``Tensor?``: cast (autocast's ``cached_cast``)."""
    lists: tuple[tuple[int, str], ...]
    """``Tensor[]``: each element cast. (``Tensor?[]``, index lists, are left alone, as autocast leaves them.)"""
    promoted: tuple[tuple[int, str], ...]
    """``Tensor`` and ``Tensor[]`` (not ``Tensor?``): the arguments a promote op takes its widest type from."""
    dtypes: tuple[tuple[int, str], ...]
    """``ScalarType?``: the dtype arguments ``fp32_set_opt_dtype`` fills in."""

    @classmethod
    def of(cls, op: OpOverload) -> _Slots:
        tensors, lists, promoted, dtypes = [], [], [], []
        for i, arg in enumerate(op._schema.arguments):
            kind = str(arg.real_type)
            slot = (i, arg.name)
            if kind in ("Tensor", "Optional[Tensor]"):
                tensors.append(slot)
                if kind == "Tensor":
                    promoted.append(slot)
            elif kind == "List[Tensor]":
                lists.append(slot)
                promoted.append(slot)
            elif kind == "Optional[ScalarType]":
                dtypes.append(slot)
        return cls(tuple(tensors), tuple(lists), tuple(promoted), tuple(dtypes))


def _kernel(op: OpOverload, cuda: CastPolicy | None, cpu: CastPolicy | None) -> Callable[..., Any]:
    """The ``AutocastCPU`` kernel of ``op``: CUDA's rule under the policy, CPU's otherwise."""
    slots = _Slots.of(op)
    rules = (
        _rule(op, cpu, slots, cache=False, gpu_half_kernel=False),  # _STATE.cuda False
        _rule(op, cuda, slots, cache=True, gpu_half_kernel=True),  # _STATE.cuda True
    )
    state = _STATE

    def kernel(keyset: DispatchKeySet, *args: Any, **kwargs: Any) -> Any:
        return rules[state.cuda](keyset, args, kwargs)

    kernel.__name__ = f"autocast_policy_{op.name().replace('::', '_').replace('.', '_')}"
    return kernel


def _rule(op: OpOverload, policy: CastPolicy | None, slots: _Slots, cache: bool, gpu_half_kernel: bool) -> Rule:
    """What autocast does to ``op`` under ``policy`` (``at::autocast::WrapFunction_``), as a function of the
    dispatch key set and the arguments. Every rule but the fallthrough runs the op with autocast excluded, as the
    C++ kernels do, so the ops inside a composite op see no autocast.

    ``cache``: cache the lower-precision casts of weights (see the module docstring). ``gpu_half_kernel``: when the
    op, left alone, has no CPU kernel for its half-precision inputs (CPU autocast lists it as fp32 for that reason,
    e.g. ``avg_pool3d``), compute it as a GPU's half kernel does: in fp32, the result rounded to the input dtype.
    """
    call = op._op  # the C++ entry point: what ``op(...)`` calls, without its Python frame
    redispatch = op._handle.redispatch_boxed
    exclude = torch._C._ExcludeDispatchKeyGuard
    if policy is None:
        # Fallthrough: the op runs in its inputs' dtype; the ops a composite op calls still see autocast.
        def fallthrough(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            below = keyset.remove(DispatchKey.AutocastCPU)
            if not gpu_half_kernel:
                return redispatch(below, *args, **kwargs)
            try:
                return redispatch(below, *args, **kwargs)
            except NotImplementedError:  # "... not implemented for 'Half'": the CPU lacks the kernel a GPU has
                half = _common_half_dtype(slots, args, kwargs)
                if half is None:
                    raise
            with exclude(_AUTOCAST_CPU):
                args, kwargs = _cast_all(slots, args, kwargs, _FP32, None)
                return _round_floats(call(*args, **kwargs), half)

        return fallthrough
    if policy == "banned":
        message = CUDA_BANNED[op.name().removeprefix("aten::")]

        def banned(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            raise RuntimeError(message)

        return banned
    if policy == "lower_precision_fp":

        def lower(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with exclude(_AUTOCAST_CPU):
                lower_dtype = torch.get_autocast_dtype("cpu")
                args, kwargs = _cast_all(slots, args, kwargs, lower_dtype, _cache_for(cache))
                return call(*args, **kwargs)

        return lower
    if policy == "fp32":

        def fp32(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with exclude(_AUTOCAST_CPU):
                args, kwargs = _cast_all(slots, args, kwargs, _FP32, None)  # only half casts are cached
                return call(*args, **kwargs)

        return fp32
    if policy == "fp32_set_opt_dtype":

        def set_opt_dtype(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with exclude(_AUTOCAST_CPU):
                if args and _eligible(args[0]):
                    args, kwargs = _fill_dtypes(slots, args, kwargs)
                return call(*args, **kwargs)

        return set_opt_dtype
    if policy == "fp32_append_dtype":
        target = resolve(CUDA_FP32_APPEND_DTYPE[op.name().removeprefix("aten::")])
        if target is None:
            raise RuntimeError(f"{op.name()}: this torch has no overload to append a dtype to")
        defaults = _defaults(op)

        def append_dtype(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with exclude(_AUTOCAST_CPU):
                first = args[0]
                out_type = _FP32 if _eligible(first) else first.dtype
                full = _with_defaults(args, kwargs, defaults)
                return target(*full, dtype=out_type)

        return append_dtype
    if policy == "promote":

        def promote(keyset: DispatchKeySet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with exclude(_AUTOCAST_CPU):
                lower_dtype = torch.get_autocast_dtype("cpu")
                to_type = _promote_type(slots, args, kwargs, lower_dtype)
                store = _cache_for(cache) if to_type == lower_dtype else None
                args, kwargs = _cast_all(slots, args, kwargs, to_type, store)
                return call(*args, **kwargs)

        return promote
    raise ValueError(f"unknown cast policy {policy!r} for {op.name()}")


def _eligible(value: Any) -> bool:
    """Autocast's ``is_eligible``: a CPU (or mkldnn) floating tensor that is not fp64."""
    return (
        isinstance(value, torch.Tensor)
        and (value.is_cpu or value.is_mkldnn)
        and value.is_floating_point()
        and value.dtype != torch.float64
    )


def _common_half_dtype(slots: _Slots, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.dtype | None:
    """The half-precision dtype (fp16 or bf16) every eligible tensor argument has, None when they differ or are
    not all half."""
    dtypes: set[torch.dtype] = set()
    for slot in (*slots.tensors, *slots.lists):
        value = _get(args, kwargs, slot)
        dtypes.update(t.dtype for t in (value if isinstance(value, (list, tuple)) else (value,)) if _eligible(t))
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= _HALF_DTYPES else None


def _round_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every fp32 tensor (also inside tuples and lists) rounded to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype == _FP32 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_round_floats(v, dtype) for v in value)
    return value


def _get(args: tuple[Any, ...], kwargs: Mapping[str, Any], slot: tuple[int, str]) -> Any:
    position, name = slot
    return args[position] if position < len(args) else kwargs.get(name)


def _cache_for(cache: bool) -> dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] | None:
    """The cast cache a lower-precision cast may use: the current forward's, when caching applies."""
    return _STATE.cache if cache and torch.is_autocast_cache_enabled() else None


def _cast_all(
    slots: _Slots, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype,
    store: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with every eligible tensor (and tensor-list element) cast to ``dtype``, the casts of
    weights from and to ``store`` when given. Returns the inputs themselves when nothing needed a cast."""
    new_args: list[Any] | None = None
    new_kwargs: dict[str, Any] | None = None
    n_args = len(args)
    for slots_of_kind, is_list in ((slots.tensors, False), (slots.lists, True)):
        for position, name in slots_of_kind:
            if position < n_args:
                value = args[position]
            elif name in kwargs:
                value = kwargs[name]
            else:
                continue
            if is_list:
                cast = [_cast(t, dtype, store) for t in value]
                if all(c is t for c, t in zip(cast, value, strict=True)):
                    continue
                new = type(value)(cast) if isinstance(value, tuple) else cast
            else:
                new = _cast(value, dtype, store)
                if new is value:
                    continue
            if position < n_args:
                if new_args is None:
                    new_args = list(args)
                new_args[position] = new
            else:
                if new_kwargs is None:
                    new_kwargs = dict(kwargs)
                new_kwargs[name] = new
    return (args if new_args is None else tuple(new_args)), (kwargs if new_kwargs is None else new_kwargs)


def _cast(
    value: Any, dtype: torch.dtype, store: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] | None
) -> Any:
    """Autocast's ``cached_cast``: ``value`` as ``dtype`` when eligible; an fp32 leaf weight's lower-precision
    cast comes from (and goes to) ``store`` when one is given."""
    if not _eligible(value) or value.dtype == dtype:
        return value
    if (
        store is not None
        and value.dtype == _FP32
        and value.requires_grad
        and value.is_leaf
        and not value._is_view()
    ):
        hit = store.get(id(value))
        if hit is not None and hit[0]() is value:
            return hit[1]
        cast = value.to(dtype)
        store[id(value)] = (weakref.ref(value), cast)
        return cast
    return value.to(dtype)


def _promote_type(slots: _Slots, args: tuple[Any, ...], kwargs: Mapping[str, Any], lower: torch.dtype) -> torch.dtype:
    """Autocast's ``promote_type``: start from the lower dtype; any fp32 input makes it fp32; fp64 is ignored."""
    current = lower
    for slot in slots.promoted:
        value = _get(args, kwargs, slot)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if not _eligible(t):
                continue
            if current == _FP32 or t.dtype == _FP32:
                current = _FP32
            elif not (current == lower and t.dtype == lower):
                raise RuntimeError(_PRIORITIZE_ERROR)
    return current


def _fill_dtypes(
    slots: _Slots, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``set_opt_dtype``: every ``ScalarType?`` argument left unset becomes fp32; a given dtype is respected."""
    new_args, new_kwargs = list(args), dict(kwargs)
    for position, name in slots.dtypes:
        if position < len(args):
            if args[position] is None:
                new_args[position] = _FP32
        elif kwargs.get(name) is None:
            new_kwargs[name] = _FP32
    return tuple(new_args), new_kwargs


def _defaults(op: OpOverload) -> tuple[tuple[str, Any], ...]:
    """(name, default) of ``op``'s positional arguments, for the call to the overload with the appended dtype."""
    return tuple(
        (arg.name, arg.default_value if arg.has_default_value() else None)
        for arg in op._schema.arguments
        if not arg.kwarg_only
    )


def _with_defaults(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], defaults: tuple[tuple[str, Any], ...]
) -> list[Any]:
    """Every positional argument, given or default (the appended-dtype overloads have no defaults)."""
    return [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, default) in enumerate(defaults)]


__all__ = [
    "AUTOCAST_KEY",
    "cuda_autocast_ops",
    "cuda_autocast_policy",
    "cuda_policy_active",
    "gpu_autocast_state",
    "install",
    "resolve",
    "uninstall",
    "version_mismatch",
]
