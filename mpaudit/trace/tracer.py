"""Tracing per-layer numerics during training: hooks that keep statistics on the device.

``Tracer`` hooks the selected modules of the user's model. On a traced step every floating tensor it
sees (module outputs, the gradients flowing into them, parameter gradients, optimizer updates) is reduced
on the device into one preallocated int64 buffer: a histogram of the fp32 bit pattern's top bits (sign,
exponent, first mantissa bit), the nonzero count, and the finite sum / max / min-nonzero of |x|. Nothing
comes to the host until :meth:`Tracer.finish_step`, which copies that buffer once and folds it into
:class:`~mpaudit.numerics.layerstats.TraceSummary` records. fp16 and bf16 tensors are widened to fp32 first, which
is exact, so their exponents are binned exactly and their sums cannot overflow.

Untraced steps cost one attribute check per hook call. ``TraceSchedule`` decides which steps are traced.
On a CPU the reductions run on one thread (see :func:`_cpu_threads` for why).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpaudit.defaults import DEFAULT_TRACE_EVERY
from mpaudit.errors import UsageError
from mpaudit.numerics.formats import HIST_BINS, HIST_MIN_EXP
from mpaudit.numerics.layerstats import (
    ACTIVATION,
    GRAD_OUTPUT,
    GRAD_PREFIX,
    ROOT_LAYER,
    UPDATE_PREFIX,
    NonfiniteSite,
    TensorStats,
    TraceSummary,
)
from mpaudit.run.distributed import SINGLE, Parallel, local_shard

ANOMALY_FOLLOW_STEPS = 2
"""After an anomaly (non-finite loss, skipped GradScaler step) the next this-many steps are traced."""

UPDATE_SAMPLE = 1 << 15
"""Update statistics use a fixed random sample of at most this many elements per parameter (fractions of
lost updates are then known to about ±0.3%), so they cost next to nothing even on large layers."""
UPDATE_SAMPLE_SEED = 0
"""Seed of the fixed element sample (drawn with replacement, sorted); a local generator, so the user's
RNG is untouched."""

MAX_ANOMALY_TRACES = 20
"""At most this many extra steps are traced because of anomalies, so an fp16 arm that skips step after
step does not end up traced on every step."""


@contextlib.contextmanager
def _cpu_threads(n: int) -> Iterator[None]:
    """Limit torch's intra-op CPU threads to ``n`` inside the block, restoring the setting after it.

    The tracer reduces CPU tensors on one thread. Its passes are memory-bound, so more threads gain little
    on a quiet machine, while on a busy one every parallel pass waits for its slowest thread, up to a
    scheduler time slice per pass (measured on a shared 2-core machine, MLP benchmark: a traced step cost
    1.4-2.6x an untraced one with two threads, 1.1x with one).
    """
    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CHUNK = 1 << 20
"""Tensors are reduced in chunks of at most this many elements (all statistics merge), so the two work
buffers stay at 8 MiB however large a layer is, and a chunk's ten passes run out of the CPU's cache rather
than main memory (on the benchmark MLP's gradients: 31 ms a step at 2^20, 40 ms at 2^22). A chunk's
nonzero count is summed in fp32, exact below 2^24."""

# Layout of one row of the on-device statistics buffer (int64; float columns hold float64 bit patterns).
_KEY_SHIFT = 22
"""fp32 bits >> 22 keeps sign (1 bit), exponent (8) and the top mantissa bit (1): that bit tells a (quiet)
NaN from an infinity in the all-ones exponent. A signalling NaN with that bit clear would count as ±Inf;
arithmetic never produces one."""
_KEY_BINS = 1 << 10
_KEY_MASK = _KEY_BINS - 1
_COL_NONZERO = _KEY_BINS  # float64: nonzero count (exact below 2^53)
_COL_SUM = _KEY_BINS + 1  # float64: sum of finite |x|
_COL_MAX = _KEY_BINS + 2  # float64: max of finite |x|
_COL_MIN = _KEY_BINS + 3  # int: min over 2*bits + _MIN_KEY_ZERO (int32 wrap) of finite values
_ROW_WIDTH = _KEY_BINS + 4
_INT32_MAX = 0x7FFFFFFF
_MIN_KEY_ZERO = 2**31 - 2
"""g = 2*bits + this, in wrapping int32, is 2u - 2^31 - 2 for |x|'s pattern u >= 1 (monotone, from INT32_MIN
up to below this) and exactly this for +-0: the min of g over a tensor is its min nonzero |x|."""
_FP32_BIAS = 127
_FP32_MANTISSA = 23
_FP32_EXP_ALL_ONES = 255
_FP32_EXP_MASK = 0x7F800000
_FIRST_FIELD = _FP32_BIAS + HIST_MIN_EXP  # exponent field of the first histogram bin's binade
_LAST_FIELD = _FIRST_FIELD + HIST_BINS - 1  # ... and of the last bin's
_FP32_TWO_POW_MINUS_E = 0x7F000000


class TraceSchedule:
    """Which steps a tracer records: step 0, every ``every``-th step, and the steps right after an anomaly.

    ``every=0`` disables tracing entirely (anomalies included).
    """

    def __init__(
        self,
        every: int = DEFAULT_TRACE_EVERY,
        follow: int = ANOMALY_FOLLOW_STEPS,
        max_anomaly_traces: int = MAX_ANOMALY_TRACES,
    ) -> None:
        if every < 0:
            raise UsageError(f"The trace interval must be 0 (off) or a positive number of steps, not {every}.")
        self.every = every
        self.follow = follow
        self.max_anomaly_traces = max_anomaly_traces
        self._extra: set[int] = set()

    def wants(self, step: int) -> bool:
        """True when ``step`` should be traced."""
        if self.every == 0:
            return False
        return step % self.every == 0 or step in self._extra

    def notify_anomaly(self, step: int) -> None:
        """Report a non-finite loss or a skipped step at ``step``: the next steps are traced (within budget)."""
        if self.every == 0:
            return
        for s in range(step + 1, step + 1 + self.follow):
            if len(self._extra) >= self.max_anomaly_traces:
                return
            if s % self.every != 0:
                self._extra.add(s)


def layer_name(path: str) -> str:
    """The name a module path is reported under (the root module's empty path becomes ``(model)``)."""
    return path if path else ROOT_LAYER


def _depth(path: str) -> int:
    return 0 if path == "" else path.count(".") + 1


def select_modules(model: nn.Module, include: Sequence[str] = (), depth: int | None = None) -> list[str]:
    """Module paths to trace: every leaf module (or, with ``depth``, modules at that depth and shallower
    leaves), plus the modules named in ``include``, in ``named_modules`` order."""
    if depth is not None and depth < 0:
        raise UsageError(f"The trace depth must be 0 or more, not {depth}.")
    modules = dict(model.named_modules())
    canonical = {id(m): path for path, m in modules.items()}
    chosen: set[str] = set()
    for path, module in modules.items():
        leaf = next(module.children(), None) is None
        if depth is None:
            if leaf:
                chosen.add(path)
        elif _depth(path) == depth or (_depth(path) < depth and leaf):
            chosen.add(path)
    for path in include:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise UsageError(
                f"The model has no module {path!r} to trace; use a path from model.named_modules(), "
                "e.g. 'encoder.layers.0'."
            ) from None
        chosen.add(canonical[id(module)])
    return [path for path in modules if path in chosen]


def _floating_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output: a tensor, or nested tuples/lists/dicts/ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not obj.is_sparse:
            yield obj
    elif depth < 4 and isinstance(obj, Mapping):
        for value in obj.values():
            yield from _floating_tensors(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _floating_tensors(value, depth + 1)


class Tracer:
    """Per-layer numerics of one model during training. Use as ``with tracer:`` around the training loop.

    Per traced step: ``start_step`` → forward/backward → ``after_backward`` → optimizer step →
    ``after_optimizer_step`` (optional, for update statistics) → ``finish_step``. Every method is a no-op
    on an untraced step, so the loop may call them unconditionally.

    In a distributed job (``parallel``), ``finish_step`` merges the ranks' statistics with two all-reduces
    of packed buffers whose size does not grow with the world: a sum of the counts, histograms and sums, and
    a max of the extremes (max |x| and, negated, the min-nonzero key). Activations and output gradients are
    each rank's own batch shard, so they add up; parameter gradients and updates add up when each rank holds
    a shard of them (FSDP) and count once, rank 0's, when every rank holds the same full copy (DDP).
    """

    def __init__(
        self,
        model: nn.Module,
        include: Sequence[str] = (),
        depth: int | None = None,
        updates: bool = True,
        parallel: Parallel = SINGLE,
    ) -> None:
        self.model = model
        self.updates = updates
        self._parallel = parallel
        self.paths = select_modules(model, include, depth)
        self._params = self._owned_params()
        rows: list[tuple[str, str]] = []
        for path in self.paths:
            rows += [(layer_name(path), ACTIVATION), (layer_name(path), GRAD_OUTPUT)]
        rows += [(layer, GRAD_PREFIX + rel) for layer, rel, _ in self._params]
        if updates:
            rows += [(layer, UPDATE_PREFIX + rel) for layer, rel, _ in self._params]
        self._rows = rows
        self._row_of = {key: i for i, key in enumerate(rows)}
        self._param_rows = [i for i, (_, role) in enumerate(rows) if role.startswith((GRAD_PREFIX, UPDATE_PREFIX))]
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._step = 0
        self._loss_scale: float | None = None
        self._merged = TraceSummary()
        self._buf: torch.Tensor | None = None
        self._f32: torch.Tensor | None = None
        self._i32: torch.Tensor | None = None
        self._snapshots: dict[int, torch.Tensor] = {}
        self._sample_idx: dict[int, torch.Tensor] = {}
        self._snapshot_taken = False
        self._consts: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._reset_host()

    # ------------------------------------------------------------------ selection

    def _owned_params(self) -> list[tuple[str, str, nn.Parameter]]:
        """(layer, parameter name relative to it, parameter): each trainable parameter is owned by the deepest
        selected module containing it, or by the root when none does."""
        selected = set(self.paths)
        out: list[tuple[str, str, nn.Parameter]] = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            parts = name.split(".")[:-1]
            owner = ""
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in selected:
                    owner = candidate
                    break
            relative = name[len(owner) + 1 :] if owner else name
            out.append((layer_name(owner), relative, param))
        return out

    @property
    def layers(self) -> list[str]:
        """The traced layers' names, in module order."""
        return [layer_name(p) for p in self.paths]

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> Tracer:
        """Register the forward hooks (inert until ``start_step``)."""
        if self._handles:
            return self
        modules = dict(self.model.named_modules())
        for path in self.paths:
            layer = layer_name(path)
            hook = self._make_forward_hook(layer, self._row_of[(layer, ACTIVATION)], self._row_of[(layer, GRAD_OUTPUT)])
            self._handles.append(modules[path].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        """Remove every hook and free the device buffers; the model is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        self._buf = self._f32 = self._i32 = None
        self._snapshots.clear()
        self._consts.clear()

    def __enter__(self) -> Tracer:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    # ------------------------------------------------------------------ the step protocol

    def start_step(self, step: int, loss_scale: float | None = None) -> None:
        """Trace the next forward/backward as step ``step``; ``loss_scale`` is the GradScaler scale in force."""
        if not self._handles:
            raise RuntimeError("Tracer.start_step() needs attached hooks: call it inside `with tracer:`.")
        device = self._device()
        if self._buf is None or self._buf.device != device:
            self._buf = torch.empty((len(self._rows), _ROW_WIDTH), dtype=torch.int64, device=device)
        self._buf.zero_()
        self._buf[:, _COL_MIN].fill_(_INT32_MAX)
        self._reset_host()
        self._step, self._loss_scale = step, loss_scale
        self._snapshot_taken = False
        self._active = True

    def after_backward(self) -> None:
        """Record parameter gradients (fp16 arm: still multiplied by the loss scale) and, when update
        statistics are on, keep a copy of the weights to diff after the optimizer step."""
        if not self._active:
            return
        with torch.no_grad():
            for layer, rel, param in self._params:
                grad = param.grad
                if grad is None or grad.is_sparse:
                    continue
                self._accumulate(self._row_of[(layer, GRAD_PREFIX + rel)], local_shard(grad))
            if self.updates:
                for _, _, param in self._params:
                    self._snapshot(param)
                self._snapshot_taken = True

    def after_optimizer_step(self) -> None:
        """Record each parameter's update relative to its weight's binade (see ``mpaudit.numerics.layerstats``)."""
        if not (self._active and self._snapshot_taken):
            return
        with torch.no_grad():
            for layer, rel, param in self._params:
                self._accumulate_update(self._row_of[(layer, UPDATE_PREFIX + rel)], param)
        self._snapshot_taken = False

    def finish_step(self) -> TraceSummary | None:
        """End the traced step: one device-to-host copy, folded into this step's summary (None if untraced)."""
        if not self._active or self._buf is None:
            return None
        self._active = False
        if not self._parallel.active:
            host = self._buf.to("cpu", copy=True).numpy()  # the one device-to-host copy of the step
            counts = self._counts
        else:
            host, counts = self._merge_ranks()
        rows = [row for row, count in enumerate(counts) if count]
        records = _fold(host[rows], [counts[r] for r in rows], [self._partial[r] for r in rows])
        stats: dict[tuple[str, str], TensorStats] = {}
        for row, record in zip(rows, records, strict=True):
            stats[self._rows[row]] = replace(record, dtype=",".join(sorted(self._dtypes[row])))
        forward = list(self._forward_order)
        recorded = {layer for layer, _ in stats}
        # forward order, then layers seen only through their parameters, in module order (root last)
        layers = list(dict.fromkeys([*forward, *(lay for lay in self.layers if lay in recorded), *sorted(recorded)]))
        summary = TraceSummary(
            stats=stats,
            steps=(self._step,),
            loss_scales=(self._loss_scale,),
            layers=tuple(layers),
            first_nonfinite_forward=self._first_nonfinite_forward(stats, forward),
            first_nonfinite_backward=self._first_nonfinite_backward(stats, layers),
        )
        self._merged = self._merged.merge(summary)
        return summary

    def _merge_ranks(self) -> tuple[np.ndarray, list[int]]:
        """Every rank's statistics rows and element counts, merged by two all-reduces; returned on the host in
        the buffer's layout. fp64 carries the counts exactly (below 2^53) and the int32-range min keys."""
        assert self._buf is not None
        buf, f64 = self._buf, self._buf.view(torch.float64)
        counts = torch.tensor(self._counts, dtype=torch.float64).to(buf.device)
        added = torch.cat([buf[:, :_KEY_BINS].to(torch.float64), f64[:, [_COL_NONZERO, _COL_SUM]], counts[:, None]], 1)
        extremes = torch.stack([f64[:, _COL_MAX], -buf[:, _COL_MIN].to(torch.float64)], 1)
        if self._parallel.params_replicated and not self._parallel.is_main:  # DDP: the same gradients on every rank
            added[self._param_rows] = 0.0
            extremes[self._param_rows] = torch.tensor([0.0, -float(_INT32_MAX)], dtype=torch.float64, device=buf.device)
        self._parallel.all_reduce(added, "sum")
        self._parallel.all_reduce(extremes, "max")
        total, top = added.to("cpu").numpy(), extremes.to("cpu").numpy()
        merged = np.zeros((len(self._rows), _ROW_WIDTH), dtype=np.int64)
        merged[:, :_KEY_BINS] = total[:, :_KEY_BINS].astype(np.int64)
        floats = merged.view(np.float64)
        floats[:, _COL_NONZERO], floats[:, _COL_SUM] = total[:, _KEY_BINS], total[:, _KEY_BINS + 1]
        floats[:, _COL_MAX] = top[:, 0]
        merged[:, _COL_MIN] = (-top[:, 1]).astype(np.int64)
        return merged, [int(c) for c in total[:, -1]]

    def summary(self) -> TraceSummary:
        """The merge of every finished step (kept merged as steps finish, so memory does not grow)."""
        return self._merged

    # ------------------------------------------------------------------ hooks

    def _make_forward_hook(self, layer: str, row_act: int, row_grad: int) -> Any:
        def grad_hook(grad: torch.Tensor) -> None:
            if not self._active:
                return
            if layer not in self._backward_seen:
                self._backward_seen.add(layer)
                self._backward_order.append(layer)
            with torch.no_grad():
                self._accumulate(row_grad, grad)

        def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            if layer not in self._forward_seen:
                self._forward_seen.add(layer)
                self._forward_order.append(layer)
            tensors = list(_floating_tensors(output))
            with torch.no_grad():
                for t in tensors:
                    self._accumulate(row_act, t.detach())
            # A tensor hook, not a module backward hook: full backward hooks wrap the output in a custom
            # autograd function, which breaks in-place ops (ReLU(inplace=True)) applied to it downstream.
            # (Leaf outputs, e.g. a parameter returned as is, are skipped: a hook on them would outlive
            # the step, and their gradient is recorded as ``grad:<param>`` anyway.)
            for t in tensors:
                if t.requires_grad and not t.is_leaf:
                    t.register_hook(grad_hook)

        return forward_hook

    # ------------------------------------------------------------------ on-device reductions

    def _device(self) -> torch.device:
        for _, _, param in self._params:
            return param.device
        for buffer in self.model.buffers():
            return buffer.device
        return torch.device("cpu")

    def _scratch(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat fp32 and int32 work buffers of at least ``n`` (<= CHUNK) elements, grown as needed."""
        if self._f32 is None or self._f32.numel() < n or self._f32.device != device:
            size = max([n] + [min(p.numel(), CHUNK) for _, _, p in self._params if p.device == device])
            self._f32 = torch.empty(size, dtype=torch.float32, device=device)
            self._i32 = torch.empty(size, dtype=torch.int32, device=device)
        assert self._i32 is not None
        return self._f32[:n], self._i32[:n]

    def _accumulate(self, row: int, t: torch.Tensor, full: bool = True) -> None:
        """Add ``t``'s statistics to buffer row ``row``: all on the device, no host sync, fixed sizes.

        About ten memory passes over ``t``, chunk by chunk (every statistic merges); ``full=False`` (update
        rows) stops after the histogram and the nonzero count, leaving max / min / sum unmeasured.
        """
        n = t.numel()
        if n == 0 or self._buf is None:
            return
        self._counts[row] += n
        self._dtypes[row].add(str(t.dtype).removeprefix("torch."))
        self._partial[row] = self._partial[row] or not full
        flat = t.reshape(-1)
        with _cpu_threads(1) if t.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, n, CHUNK):
                self._reduce(row, flat[start : start + CHUNK], full)

    def _reduce(self, row: int, t: torch.Tensor, full: bool) -> None:
        """One chunk (a flat tensor) into row ``row``."""
        n = t.numel()
        assert self._buf is not None
        f, k = self._scratch(n, t.device)
        if t.dtype == torch.float32 and t.is_contiguous():
            x = t
        else:
            f.copy_(t)  # widening fp16/bf16 to fp32 is exact
            x = f
        buf = self._buf
        x_is_scratch = x.data_ptr() == f.data_ptr()
        torch.bitwise_right_shift(x.view(torch.int32), _KEY_SHIFT, out=k)
        k.bitwise_and_(_KEY_MASK)
        if t.device.type == "cpu":  # bincount is ~30% faster on CPU; k < _KEY_BINS, so its size is fixed
            buf[row, :_KEY_BINS].add_(torch.bincount(k, minlength=_KEY_BINS))
        else:  # (on CUDA bincount reads the max back to size its output: a host sync)
            buf[row, :_KEY_BINS].index_add_(0, k, self._ones(n, t.device))
        if not full:
            # here non-finite values count as nonzero
            buf[row].view(torch.float64)[_COL_NONZERO].add_(torch.count_nonzero(x))
            return
        # |x| with non-finite values zeroed: max / sum / min / nonzero count over finite values only
        if x_is_scratch:
            f.abs_()
        else:
            torch.abs(x, out=f)
        f.nan_to_num_(0.0, 0.0, 0.0)
        # sign(|x|) is 1 or 0: its fp32 sum is the exact nonzero count (chunk < 2^24), ~2x faster than
        # count_nonzero on a CPU. The int32 scratch holds it until the min pass below overwrites it.
        ones = k.view(torch.float32)
        torch.sign(f, out=ones)
        floats = buf[row].view(torch.float64)
        floats[_COL_NONZERO].add_(ones.sum())
        col_max = floats[_COL_MAX : _COL_MAX + 1]
        torch.maximum(col_max, f.amax().view(1), out=col_max)
        floats[_COL_SUM].add_(f.sum())  # fp32 accumulation: fp64 is ~10x slower on CPU
        # min nonzero |x| in one pass: g = 2*bits + C (int32, wrapping) is monotone in |x| for x != 0 and
        # sends 0 (zeros and the zeroed non-finite values) to C, above every nonzero value.
        torch.add(self._const(_MIN_KEY_ZERO, t.device), f.view(torch.int32), alpha=2, out=k)
        col_min = buf[row, _COL_MIN : _COL_MIN + 1]
        torch.minimum(col_min, k.amin().view(1), out=col_min)

    def _sample(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flat parameter and the fixed element sample its update statistics use (None: all elements)."""
        flat = local_shard(param.detach()).reshape(-1)
        if flat.numel() <= UPDATE_SAMPLE:
            return flat, None
        idx = self._sample_idx.get(id(param))
        if idx is None or idx.device != flat.device:
            g = torch.Generator().manual_seed(UPDATE_SAMPLE_SEED)
            # drawn with replacement: O(sample) however large the parameter (no permutation of all of it)
            idx = torch.randint(flat.numel(), (UPDATE_SAMPLE,), generator=g).sort().values.to(flat.device)
            self._sample_idx[id(param)] = idx
        return flat, idx

    def _snapshot(self, param: torch.Tensor) -> None:
        """Keep the (sampled) weights before the optimizer step, in fp32."""
        flat, idx = self._sample(param)
        n = flat.numel() if idx is None else idx.numel()
        snap = self._snapshots.get(id(param))
        if snap is None or snap.device != flat.device:
            snap = self._snapshots[id(param)] = torch.empty(n, dtype=torch.float32, device=flat.device)
        if idx is None:
            snap.copy_(flat)
        else:
            snap.copy_(flat.index_select(0, idx))

    def _accumulate_update(self, row: int, param: torch.Tensor) -> None:
        """Record r = (w_after - w_before) / 2^floor(log2|w_before|) over the sampled elements, built from
        the fp32 bit pattern (no division, so the binade of r is exactly that of Δw minus that of w)."""
        before = self._snapshots[id(param)]
        flat, idx = self._sample(param)
        n = before.numel()
        if n == 0:
            return
        f, k = self._scratch(n, flat.device)
        # The pattern of 2^-e for w's exponent field E is (254 - E) << 23 = 0x7F000000 - (w & 0x7F800000).
        # (A zero or fp32-subnormal weight gets the factor 2^127: its update lands far above any loss edge.)
        torch.bitwise_and(before.view(torch.int32), _FP32_EXP_MASK, out=k)
        torch.sub(self._const(_FP32_TWO_POW_MINUS_E, flat.device), k, out=k)
        after = flat if idx is None else flat.index_select(0, idx)
        torch.sub(after, before, out=f)
        f.mul_(k.view(torch.float32))
        self._accumulate(row, f, full=False)

    def _ones(self, n: int, device: torch.device) -> torch.Tensor:
        return self._const(1, device, torch.int64).expand(n)

    def _const(self, value: int, device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """A cached 0-d device tensor (so no host-to-device copy per call)."""
        key = (value, device, dtype)
        c = self._consts.get(key)
        if c is None:
            c = self._consts[key] = torch.tensor(value, dtype=dtype, device=device)
        return c

    # ------------------------------------------------------------------ host side

    def _reset_host(self) -> None:
        self._counts = [0] * len(self._rows)
        self._partial = [False] * len(self._rows)
        self._dtypes: list[set[str]] = [set() for _ in self._rows]
        self._forward_order: list[str] = []
        self._forward_seen: set[str] = set()
        self._backward_order: list[str] = []
        self._backward_seen: set[str] = set()

    def _first_nonfinite_forward(
        self, stats: dict[tuple[str, str], TensorStats], forward: list[str]
    ) -> NonfiniteSite | None:
        for layer in forward:
            s = stats.get((layer, ACTIVATION))
            if s is not None and s.nonfinite:
                return NonfiniteSite(layer, ACTIVATION, self._step)
        return None

    def _first_nonfinite_backward(
        self, stats: dict[tuple[str, str], TensorStats], layers: list[str]
    ) -> NonfiniteSite | None:
        """First in the order output-gradient hooks fired; failing that, parameter gradients in reverse
        forward order (the order backward reaches them)."""
        for layer in self._backward_order:
            s = stats.get((layer, GRAD_OUTPUT))
            if s is not None and s.nonfinite:
                return NonfiniteSite(layer, GRAD_OUTPUT, self._step)
        bad = {layer: role for (layer, role), s in stats.items() if role.startswith(GRAD_PREFIX) and s.nonfinite}
        for layer in reversed(layers):
            if layer in bad:
                return NonfiniteSite(layer, bad[layer], self._step)
        return None


def _fold(rows: np.ndarray, counts: list[int], partial: list[bool]) -> list[TensorStats]:
    """Turn buffer rows (key histogram and reductions) into :class:`TensorStats`, all rows at once."""
    key = rows[:, :_KEY_BINS].reshape(-1, 2, 256, 2)  # row, sign, exponent field, top mantissa bit
    per_field = key.sum(axis=(1, 3))
    # exponent field E holds binade E - 127: fields up to _FIRST_FIELD clamp into bin 0, fields from
    # _LAST_FIELD up (but not 255: inf/NaN) into the last bin; field 0 (zero/subnormal) is handled below
    hist = np.empty((len(counts), HIST_BINS), dtype=np.int64)
    hist[:, 0] = per_field[:, 1 : _FIRST_FIELD + 1].sum(axis=1)
    hist[:, 1:-1] = per_field[:, _FIRST_FIELD + 1 : _LAST_FIELD]
    hist[:, -1] = per_field[:, _LAST_FIELD:_FP32_EXP_ALL_ONES].sum(axis=1)
    nonfinite = per_field[:, _FP32_EXP_ALL_ONES]
    # the nonzero column counts finite values for full records, finite and non-finite ones for partial ones
    nonzero = rows.view(np.float64)[:, _COL_NONZERO].astype(np.int64)
    zeros = np.asarray(counts, dtype=np.int64) - nonzero - np.where(partial, 0, nonfinite)
    hist[:, 0] += per_field[:, 0] - zeros  # fp32 subnormals: below 2^-126, so in the clamped first bin
    nan = key[:, :, _FP32_EXP_ALL_ONES, 1].sum(axis=1)
    floats = rows.view(np.float64)
    out = []
    for i, count in enumerate(counts):
        min_key = int(rows[i, _COL_MIN])
        if partial[i]:
            max_abs = min_nonzero = sum_abs = math.nan
        else:
            max_abs, sum_abs = float(floats[i, _COL_MAX]), float(floats[i, _COL_SUM])
            min_nonzero = math.inf if min_key >= _MIN_KEY_ZERO else _f32_from_bits((min_key + 2**31 + 2) // 2)
        out.append(
            TensorStats(
                count=count,
                zeros=int(zeros[i]),
                nan=int(nan[i]),
                posinf=int(key[i, 0, _FP32_EXP_ALL_ONES, 0]),
                neginf=int(key[i, 1, _FP32_EXP_ALL_ONES, 0]),
                max_abs=max_abs,
                min_nonzero_abs=min_nonzero,
                sum_abs=sum_abs,
                hist=hist[i].copy(),
            )
        )
    return out


def _f32_from_bits(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])
