"""Tracing per-layer numerics during training: hooks that keep statistics on the device.

``Tracer`` hooks the selected modules of the user's model. On a traced step every floating tensor it
sees (module outputs, the gradients flowing into them, parameter gradients, optimizer updates) is reduced
on the device into one preallocated int64 buffer (:class:`~mpaudit.trace.reduce.StatsRows`): a histogram of
the fp32 bit pattern's top bits (sign, exponent, first mantissa bit), the nonzero count, and the finite
sum / max / min-nonzero of |x|. Small tensors are staged and reduced together, so a traced step costs a few
batched reductions rather than ten passes per tensor. Nothing comes to the host until
:meth:`Tracer.finish_step`, which copies that buffer once and folds it into
:class:`~mpaudit.numerics.layerstats.TraceSummary` records. fp16 and bf16 tensors are widened to fp32 first,
which is exact, so their exponents are binned exactly and their sums cannot overflow.

The hook is registered by ``start_step`` and removed by ``finish_step``: untraced steps run the model without
any. ``TraceSchedule`` decides which steps are traced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpaudit.defaults import DEFAULT_TRACE_EVERY
from mpaudit.errors import UsageError
from mpaudit.numerics.layerstats import (
    ACTIVATION,
    GRAD_OUTPUT,
    GRAD_PREFIX,
    ROOT_LAYER,
    UPDATE_PREFIX,
    NonfiniteSite,
    TraceSummary,
)
from mpaudit.run.distributed import SINGLE, Parallel, local_shard
from mpaudit.trace import reduce
from mpaudit.trace.reduce import StatsRows, dtype_names, fold, rows_for

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


class _UpdateBlock:
    """The sampled weights of some parameters before and after the optimizer step, laid out as staging is
    (:func:`~mpaudit.trace.reduce.StatsRows.add_block`): the relative updates of all of them are computed and
    reduced in one go. A parameter small enough to be taken whole has slots shaped like it (so no view of the
    parameter is needed per step); a sampled one, flat slots of ``UPDATE_SAMPLE``."""

    def __init__(self, members: list[tuple[nn.Parameter, int, torch.Size]], stats: StatsRows,
                 device: torch.device) -> None:
        """``members``: (parameter, its update row, the shape of its local shard)."""
        self.params = [param for param, _, _ in members]
        self.rows = rows = [row for _, row, _ in members]
        shapes = [shape for _, _, shape in members]
        self.sizes = [min(shape.numel(), UPDATE_SAMPLE) for shape in shapes]
        self.sampled = [shape.numel() > UPDATE_SAMPLE for shape in shapes]
        starts = np.cumsum([0] + [rows_for(n) for n in self.sizes]).tolist()
        self.layout = stats.layout([row for row, n in zip(rows, self.sizes, strict=True) for _ in range(rows_for(n))])
        self.before = torch.zeros((starts[-1], reduce.ROW), dtype=torch.float32, device=device)
        self.after = torch.zeros_like(self.before)
        slots = [(start * reduce.ROW, n, torch.Size([n]) if sampled else shape)
                 for start, n, sampled, shape in zip(starts[:-1], self.sizes, self.sampled, shapes, strict=True)]
        self.before_slots = [self.before.view(-1)[at : at + n].view(shape) for at, n, shape in slots]
        self.after_slots = [self.after.view(-1)[at : at + n].view(shape) for at, n, shape in slots]


class _Total:
    """The merge of a tracer's finished steps, kept as the statistics buffer's raw rows (a step merges in a few
    numpy operations over all rows; folding them into statistics and one object per tensor waits until a summary
    is asked for). It equals ``TraceSummary.merge`` over the step summaries."""

    def __init__(self, n_rows: int) -> None:
        self.raw = reduce.empty_rows(n_rows)
        self.counts = np.zeros(n_rows, dtype=np.int64)
        self.partial = np.zeros(n_rows, dtype=bool)
        self.dtypes = np.zeros(n_rows, dtype=np.int64)  # masks of dtype bits
        self.steps: list[int] = []
        self.loss_scales: list[float | None] = []
        self.layers: dict[str, None] = {}
        self.first_forward: NonfiniteSite | None = None
        self.first_backward: NonfiniteSite | None = None
        self._summary: TraceSummary | None = TraceSummary()

    def add(self, host: np.ndarray, counts: list[int], partial: list[bool], dtypes: list[int], step: int,
            loss_scale: float | None, layers: list[str], first_forward: NonfiniteSite | None,
            first_backward: NonfiniteSite | None) -> None:
        """Merge a finished step: its raw rows (as :meth:`StatsRows.collect` returns them) and its metadata."""
        reduce.merge_rows(self.raw, host)
        self.counts += np.asarray(counts, dtype=np.int64)
        self.partial |= np.asarray(partial, dtype=bool)
        np.bitwise_or(self.dtypes, dtypes, out=self.dtypes)
        self.steps.append(step)
        self.loss_scales.append(loss_scale)
        self.layers.update(dict.fromkeys(layers))
        self.first_forward = _earlier(self.first_forward, first_forward)
        self.first_backward = _earlier(self.first_backward, first_backward)
        self._summary = None

    def summary(self, keys: list[tuple[str, str]]) -> TraceSummary:
        """The merged summary (``keys``: each row's (layer, role)), built on demand and kept until the next step."""
        if self._summary is None:
            rows = [int(r) for r in np.flatnonzero(self.counts)]
            folded = fold(self.raw, self.counts.tolist(), self.partial.tolist())
            records = folded.records(rows, [dtype_names(int(self.dtypes[r])) for r in rows])
            self._summary = TraceSummary(
                stats=dict(zip([keys[r] for r in rows], records, strict=True)),
                steps=tuple(self.steps),
                loss_scales=tuple(self.loss_scales),
                layers=tuple(self.layers),
                first_nonfinite_forward=self.first_forward,
                first_nonfinite_backward=self.first_backward,
            )
        return self._summary


def _earlier(a: NonfiniteSite | None, b: NonfiniteSite | None) -> NonfiniteSite | None:
    """The site at the earlier step (``a`` on a tie), as ``TraceSummary.merge`` picks it."""
    if a is None or b is None:
        return b if a is None else a
    return b if b.step < a.step else a


class Tracer:
    """Per-layer numerics of one model during training. Use as ``with tracer:`` around the training loop.

    Per traced step: ``start_step`` → forward/backward → ``after_backward`` → optimizer step →
    ``after_optimizer_step`` (optional, for update statistics) → ``finish_step``. Every method is a no-op
    on an untraced step, so the loop may call them unconditionally.

    In a distributed job (``parallel``), ``finish_step`` merges the ranks' statistics (see
    :meth:`~mpaudit.trace.reduce.StatsRows.collect`). Activations and output gradients are each rank's own
    batch shard, so they add up; parameter gradients and updates add up when each rank holds a shard of them
    (FSDP) and count once, rank 0's, when every rank holds the same full copy (DDP).
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
        self._layer_names = tuple(layer_name(p) for p in self.paths)
        self._params = self._owned_params()
        rows: list[tuple[str, str]] = []
        for path in self.paths:
            rows += [(layer_name(path), ACTIVATION), (layer_name(path), GRAD_OUTPUT)]
        rows += [(layer, GRAD_PREFIX + rel) for layer, rel, _ in self._params]
        if updates:
            rows += [(layer, UPDATE_PREFIX + rel) for layer, rel, _ in self._params]
        self._rows = rows
        self._row_of = {key: i for i, key in enumerate(rows)}
        self._grad_rows = [self._row_of[(layer, GRAD_PREFIX + rel)] for layer, rel, _ in self._params]
        self._param_rows = [i for i, (_, role) in enumerate(rows) if role.startswith((GRAD_PREFIX, UPDATE_PREFIX))]
        self._stats = StatsRows(len(rows))
        self._hooked: dict[int, tuple[str, int, Callable[[torch.Tensor], None]]] = {}
        self._attached = False
        self._handle: RemovableHandle | None = None
        self._active = False
        self._step = 0
        self._loss_scale: float | None = None
        self._total = _Total(len(rows))
        self._update_blocks: list[_UpdateBlock] | None = None
        self._sample_idx: dict[int, torch.Tensor] = {}
        self._snapshot_taken = False
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
        return list(self._layer_names)

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> Tracer:
        """Get ready to trace. Nothing is registered on the model yet: ``start_step`` adds one global forward
        hook and ``finish_step`` removes it (adding and removing a hook per module would cost ~8 µs each)."""
        if self._attached:
            return self
        reduce.native_kernel()  # built (once per machine) or loaded now, not inside the first traced step
        modules = dict(self.model.named_modules())
        for path in self.paths:
            layer = layer_name(path)
            grad_hook = self._make_grad_hook(layer, self._row_of[(layer, GRAD_OUTPUT)])
            self._hooked[id(modules[path])] = (layer, self._row_of[(layer, ACTIVATION)], grad_hook)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove the hook and free the device buffers; the model is left exactly as it was."""
        self._remove_hook()
        self._hooked.clear()
        self._attached = False
        self._active = False
        self._stats.release()
        self._update_blocks = None

    def __enter__(self) -> Tracer:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ the step protocol

    def start_step(self, step: int, loss_scale: float | None = None) -> None:
        """Trace the next forward/backward as step ``step``; ``loss_scale`` is the GradScaler scale in force."""
        if not self._attached:
            raise RuntimeError("Tracer.start_step() needs an attached tracer: call it inside `with tracer:`.")
        self._stats.start(self._device())
        self._reset_host()
        self._step, self._loss_scale = step, loss_scale
        self._snapshot_taken = False
        if self._handle is None:
            self._handle = nn.modules.module.register_module_forward_hook(self._forward_hook)
        self._active = True

    def after_backward(self) -> None:
        """Record parameter gradients (fp16 arm: still multiplied by the loss scale) and, when update
        statistics are on, keep a copy of the (sampled) weights to diff after the optimizer step."""
        if not self._active:
            return
        with torch.no_grad(), self._stats.threads():
            rows: list[int] = []
            grads: list[torch.Tensor] = []
            for row, (_, _, param) in zip(self._grad_rows, self._params, strict=True):
                grad = param.grad
                if grad is None or grad.is_sparse:
                    continue
                rows.append(row)
                grads.append(local_shard(grad))
            self._stats.add_all(rows, grads)
            if self.updates:
                self._gather_samples(after=False)
                self._snapshot_taken = True

    def after_optimizer_step(self) -> None:
        """Record each parameter's update relative to its weight's binade (see ``mpaudit.numerics.layerstats``):
        r = (w_after - w_before) / 2^floor(log2|w_before|) over the sampled elements, built from the fp32 bit
        pattern (no division, so the binade of r is exactly that of Δw minus that of w; see
        :meth:`~mpaudit.trace.reduce.StatsRows.add_updates`)."""
        if not (self._active and self._snapshot_taken):
            return
        self._snapshot_taken = False
        with torch.no_grad(), self._stats.threads():
            blocks = self._gather_samples(after=True)
        with torch.no_grad():
            for block in blocks:
                self._stats.add_updates(block.before, block.after, block.layout, block.rows, block.sizes)

    def finish_step(self, summary: bool = True) -> TraceSummary | None:
        """End the traced step: its statistics on the host (one device-to-host copy), merged into the running
        summary. Returns this step's own summary (None if untraced, or when ``summary`` is False: the training
        loop does not read it, and building one record per tensor is a good part of a small model's traced step)."""
        if not self._active:
            return None
        self._active = False
        self._remove_hook()
        replicated = self._param_rows if self._parallel.params_replicated else []
        host, counts = self._stats.collect(self._parallel, replicated)
        rows = [row for row, count in enumerate(counts) if count]
        bad = dict.fromkeys(self._rows[row] for row in np.flatnonzero(reduce.nonfinite_counts(host)).tolist())
        forward = list(self._forward_order)
        recorded = {self._rows[row][0] for row in rows}
        # forward order, then layers seen only through their parameters, in module order (root last)
        layers = list(dict.fromkeys([*forward, *(lay for lay in self._layer_names if lay in recorded),
                                     *sorted(recorded)]))
        first_forward = self._first_nonfinite_forward(bad, forward)
        first_backward = self._first_nonfinite_backward(bad, layers)
        partial = list(self._stats.partial)
        if summary:
            folded = fold(host, counts, partial)
            dtypes = [dtype_names(self._stats.dtypes[row]) for row in rows]
            step_summary = TraceSummary(
                stats=dict(zip([self._rows[row] for row in rows], folded.records(rows, dtypes), strict=True)),
                steps=(self._step,),
                loss_scales=(self._loss_scale,),
                layers=tuple(layers),
                first_nonfinite_forward=first_forward,
                first_nonfinite_backward=first_backward,
            )
        self._total.add(host, counts, partial, self._stats.dtypes, self._step, self._loss_scale, layers,
                        first_forward, first_backward)
        return step_summary if summary else None

    def summary(self) -> TraceSummary:
        """The merge of every finished step (kept merged as arrays as steps finish, so memory does not grow)."""
        return self._total.summary(self._rows)

    # ------------------------------------------------------------------ hooks

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """The global forward hook of a traced step: records the outputs of the traced modules (and only theirs)."""
        entry = self._hooked.get(id(module))
        if entry is None or not self._active:
            return
        layer, row, grad_hook = entry
        if layer not in self._forward_seen:
            self._forward_seen.add(layer)
            self._forward_order.append(layer)
        if type(output) is torch.Tensor:  # most modules: no generator to walk
            tensors = [output] if output.is_floating_point() and not output.is_sparse else []
        else:
            tensors = list(_floating_tensors(output))
        for t in tensors:
            self._stats.add(row, t)  # read now: later in-place ops do not matter
        # A tensor hook, not a module backward hook: full backward hooks wrap the output in a custom
        # autograd function, which breaks in-place ops (ReLU(inplace=True)) applied to it downstream.
        # (Leaf outputs, e.g. a parameter returned as is, are skipped: a hook on them would outlive
        # the step, and their gradient is recorded as ``grad:<param>`` anyway.)
        for t in tensors:
            if t.requires_grad and not t.is_leaf:
                t.register_hook(grad_hook)

    def _make_grad_hook(self, layer: str, row: int) -> Callable[[torch.Tensor], None]:
        def grad_hook(grad: torch.Tensor) -> None:
            if not self._active:
                return
            if layer not in self._backward_seen:
                self._backward_seen.add(layer)
                self._backward_order.append(layer)
            self._stats.add(row, grad)  # read now, before autograd passes it on

        return grad_hook

    # ------------------------------------------------------------------ update samples

    def _device(self) -> torch.device:
        for _, _, param in self._params:
            return param.device
        for buffer in self.model.buffers():
            return buffer.device
        return torch.device("cpu")

    def _sample_index(self, param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The fixed element sample of a parameter larger than ``UPDATE_SAMPLE`` (indices into ``flat``)."""
        idx = self._sample_idx.get(id(param))
        if idx is None or idx.device != flat.device:
            g = torch.Generator().manual_seed(UPDATE_SAMPLE_SEED)
            # drawn with replacement: O(sample) however large the parameter (no permutation of all of it)
            idx = torch.randint(flat.numel(), (UPDATE_SAMPLE,), generator=g).sort().values.to(flat.device)
            self._sample_idx[id(param)] = idx
        return idx

    def _blocks(self) -> list[_UpdateBlock]:
        """The update samples' layout: blocks of parameters, in order, of at most ``reduce.STAGE_LIMIT`` elements
        (or one parameter's sample)."""
        device = self._device()
        if self._update_blocks is not None and all(b.before.device == device for b in self._update_blocks):
            return self._update_blocks
        blocks: list[_UpdateBlock] = []
        part: list[tuple[nn.Parameter, int, torch.Size]] = []
        used = 0
        for layer, rel, param in self._params:
            shape = local_shard(param.detach()).shape
            if not shape.numel():
                continue
            rows = rows_for(min(shape.numel(), UPDATE_SAMPLE))
            if part and used + rows > reduce.STAGE_LIMIT // reduce.ROW:  # cache-sized blocks
                blocks.append(_UpdateBlock(part, self._stats, device))
                part, used = [], 0
            part.append((param, self._row_of[(layer, UPDATE_PREFIX + rel)], shape))
            used += rows
        if part:
            blocks.append(_UpdateBlock(part, self._stats, device))
        self._update_blocks = blocks
        return blocks

    def _gather_samples(self, after: bool) -> list[_UpdateBlock]:
        """Copy every parameter's (sampled) weights into the blocks' ``before`` or ``after`` rows: one
        ``_foreach_copy_`` for the unsampled parameters, one ``index_select`` per sampled one (under no_grad)."""
        blocks = self._blocks()
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for block in blocks:
            slots = block.after_slots if after else block.before_slots
            for param, slot, sampled in zip(block.params, slots, block.sampled, strict=True):
                if sampled:
                    flat = local_shard(param).reshape(-1)
                    torch.index_select(flat, 0, self._sample_index(param, flat), out=slot)
                else:
                    dsts.append(slot)
                    srcs.append(local_shard(param))
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        return blocks

    # ------------------------------------------------------------------ host side

    def _reset_host(self) -> None:
        self._forward_order: list[str] = []
        self._forward_seen: set[str] = set()
        self._backward_order: list[str] = []
        self._backward_seen: set[str] = set()

    def _first_nonfinite_forward(self, bad: dict[tuple[str, str], None], forward: list[str]) -> NonfiniteSite | None:
        """The first layer in forward order whose output held a NaN/Inf (``bad``: the step's (layer, role)
        rows that did, in row order)."""
        for layer in forward:
            if (layer, ACTIVATION) in bad:
                return NonfiniteSite(layer, ACTIVATION, self._step)
        return None

    def _first_nonfinite_backward(self, bad: dict[tuple[str, str], None], layers: list[str]) -> NonfiniteSite | None:
        """First in the order output-gradient hooks fired; failing that, parameter gradients in reverse
        forward order (the order backward reaches them)."""
        for layer in self._backward_order:
            if (layer, GRAD_OUTPUT) in bad:
                return NonfiniteSite(layer, GRAD_OUTPUT, self._step)
        grads = {layer: role for layer, role in bad if role.startswith(GRAD_PREFIX)}
        for layer in reversed(layers):
            if layer in grads:
                return NonfiniteSite(layer, grads[layer], self._step)
        return None
