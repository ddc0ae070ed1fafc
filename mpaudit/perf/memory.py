"""The memory phase: peak memory of one training step per arm, and what it was made of.

Every tensor storage the step touches is tracked once, from the op that created it to the moment it is
freed, by a ``TorchDispatchMode`` (the approach of ``torch.distributed._tools.mem_tracker.MemTracker``,
without its distributed machinery). Storages are sorted into categories after the step, once it is known
which were parameters, gradients (post-accumulate-grad hooks), optimizer state, autocast's cast weights
(``_to_copy`` of a parameter) or saved for backward (``saved_tensors_hooks``). On CPU, where PyTorch has
no peak-memory API, that ledger is the measurement; on CUDA the allocator's peak is the measurement and
the ledger its cross-check and breakdown.
"""

from __future__ import annotations

import functools
import gc
import math
import re
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from mpaudit.arms import Arm
from mpaudit.errors import UsageError, error_text
from mpaudit.results.perf import BREAKDOWN_KEYS, MemoryResult
from mpaudit.run.batches import batch_size, iter_leaves, move_to_device
from mpaudit.run.distributed import local_shard
from mpaudit.run.prepare import PreparedArm, RunContext, prepare_arm
from mpaudit.run.seeding import seed_everything
from mpaudit.run.task import first_batch

CUDA_BLOCK_BYTES = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of this (c10's kMinBlockSize)."""

WARMUP_STEPS_MAX = 10
"""Untimed steps before the measured one, until one really updates the weights: the first creates the
optimizer state, and an fp16 GradScaler may skip a few while it lowers its scale."""

CROSS_CHECK_TOLERANCE = 0.10
"""On CUDA, a tracked peak further than this fraction from the allocator's peak gets a note."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512MB"``, ``"1.5G"`` or ``"4096"`` as a number of bytes.

    SI units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB, and the bare K, M, G, T
    that ``nvidia-smi`` and PyTorch print) powers of 1024.
    """
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"Cannot read {text!r} as a memory size; write it like 16GiB, 512MB or 80G.")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"A memory size must be positive, but {text!r} is not.")
    return int(value)


def max_batch_for_budget(memory: MemoryResult, batch_size: int, budget_bytes: int) -> int:
    """Largest batch whose training step would fit in ``budget_bytes``, by linear extrapolation in batch size.

    At every moment of the measured step the batch-dependent bytes (activations; before the optimizer step
    also activation gradients and other temporaries) are scaled in proportion to the batch and the rest
    kept; the batch fits when every moment fits. Weight-sized temporaries of the backward pass (a 16-bit
    weight gradient before its cast to fp32) count as batch-dependent, which errs on the safe side. Memory
    the tracker cannot see (CUDA workspaces) counts as fixed. Returns 0 when even a tiny batch would not fit.
    """
    if batch_size < 1:
        raise UsageError(f"The batch size must be at least 1, but it is {batch_size}.")
    if memory.error:
        raise UsageError(f"The {memory.arm} arm's memory was not measured ({memory.error}), so no batch limit follows.")
    room = budget_bytes - max(memory.peak_bytes - memory.tracked_peak_bytes, 0)
    best: int | None = None
    for fixed, scaling in memory.batch_scaling:
        if room < fixed:
            return 0
        if scaling > 0:
            fits = (room - fixed) * batch_size // scaling
            best = fits if best is None else min(best, fits)
    if best is None:
        raise UsageError("The measured step's memory does not grow with the batch, so no batch limit follows.")
    return best


@dataclass(frozen=True)
class _Replay:
    """The ledger's events replayed in order: what each moment of the step held."""

    high: dict[str, int]
    at_peak: dict[str, int]
    batch_scaling: tuple[tuple[int, int], ...]


def _frontier(points: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The ``(fixed, scaling)`` points no other point beats in both: the only ones that can set a peak."""
    out: list[tuple[int, int]] = []
    for fixed, scaling in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not out or scaling > out[-1][1]:
            out.append((fixed, scaling))
    return tuple(out)


class _StorageLedger(TorchDispatchMode):
    """Sees every op's tensors, and logs each storage's allocation and its release, counting it once."""

    def __init__(self, device: torch.device, block: int) -> None:
        super().__init__()
        self._device_type = device.type
        self._block = block
        self._ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._size: dict[int, int] = {}
        self.events: list[tuple[int, int]] = []
        """``(storage id, +bytes)`` when a storage is first seen, ``(id, -bytes)`` when it is freed."""
        self.params: set[int] = set()
        self.inputs: set[int] = set()
        self.optimizer: set[int] = set()
        self.grads: set[int] = set()
        self.casts: set[int] = set()
        self.saved: set[int] = set()
        self.optimizer_from: int | None = None
        """Index of the first event of the optimizer step, once it started."""
        self.open = True

    def track(self, t: Any) -> int | None:
        """The ledger id of ``t``'s storage, registering it on first sight; None for non-tensors and
        tensors on another device."""
        if not isinstance(t, torch.Tensor) or t.device.type != self._device_type:
            return None  # a CPU scalar in a CUDA step (AdamW's ``step``) takes no device memory
        t = local_shard(t)  # an FSDP2 DTensor: this rank holds its local shard
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return None
        nbytes = self._rounded(st.nbytes())
        sid = self._ids.get(st)
        if sid is None:
            sid = len(self._size)
            self._ids[st] = sid
            self._refs[sid] = weakref.ref(st, functools.partial(self._freed, sid))
            self._size[sid] = nbytes
            self.events.append((sid, nbytes))
        elif nbytes != self._size[sid]:  # resized in place
            self.events.append((sid, nbytes - self._size[sid]))
            self._size[sid] = nbytes
        return sid

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self._block) * self._block

    def _freed(self, sid: int, _: object = None) -> None:
        if self.open:
            self.events.append((sid, -self._size[sid]))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs))[0]:
            self.track(t)
        out_ids = [self.track(t) for t in tree_flatten(out)[0]]
        if func is torch.ops.aten._to_copy.default and self.track(args[0]) in self.params:
            self.casts.update(sid for sid in out_ids if sid is not None)  # autocast's cached weight copy
        return out

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """``saved_tensors_hooks`` pack hook: note the storage as saved for backward, keep the tensor."""
        sid = self.track(t)
        if sid is not None:
            self.saved.add(sid)
        return t

    def category(self, sid: int) -> str:
        if sid in self.params:
            return "parameters"
        if sid in self.grads:
            return "gradients"
        if sid in self.optimizer:
            return "optimizer_state"
        if sid in self.casts:
            return "autocast_cache"
        if sid in self.inputs:
            return "other"
        if sid in self.saved:
            return "activations"
        return "other"

    def optimizer_started(self, *_: object) -> None:
        """``Optimizer.register_step_pre_hook`` hook: events from here on belong to the optimizer step."""
        if self.optimizer_from is None:
            self.optimizer_from = len(self.events)

    def replay(self) -> _Replay:
        """Per-category high-water marks, the composition at the peak, and the batch-scaling frontier."""
        live = dict.fromkeys(BREAKDOWN_KEYS, 0)
        high, at_peak = dict(live), dict(live)
        total = peak = 0
        points: list[tuple[int, int]] = []
        for i, (sid, delta) in enumerate(self.events):
            cat = self.category(sid)
            live[cat] += delta
            high[cat] = max(high[cat], live[cat])
            total += delta
            if total > peak:
                peak, at_peak = total, dict(live)
            # Before the optimizer step, "other" is mostly activation gradients; during it, optimizer scratch.
            optimizer = self.optimizer_from is not None and i >= self.optimizer_from
            scaling = live["activations"] + (0 if optimizer else live["other"])
            points.append((total - scaling, scaling))
        return _Replay(high, at_peak, _frontier(points))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    for _, leaf in iter_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@contextmanager
def _removing(handle: RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _grad_hooks(model: torch.nn.Module, ledger: _StorageLedger) -> Iterator[None]:
    """Mark each parameter's ``.grad`` storage as a gradient once autograd has accumulated it."""

    def hook(p: torch.Tensor) -> None:
        sid = ledger.track(p.grad)
        if sid is not None:
            ledger.grads.add(sid)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _step_skipped(prepared: PreparedArm, batch: object) -> bool:
    """Run one step; True when GradScaler skipped its optimizer update (the scale went down)."""
    scaler = prepared.scaler
    before = scaler.get_scale() if scaler is not None else None
    with prepared.context():
        prepared.step(batch)
    return scaler is not None and before is not None and scaler.get_scale() < before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_arm_memory(run: RunContext, arm: Arm, seed: int) -> MemoryResult:
    """Peak memory of one steady-state training step of ``arm``, set up as it trained
    (:func:`~mpaudit.run.prepare.prepare_arm`): measured after a step that updated the weights, so the optimizer
    state exists, as in every step but the first. Under DDP the step is the wrapped model's (its gradient
    buckets count as ``other``) on this rank's first batch."""
    device = run.device
    cuda = device.type == "cuda"
    gc.collect()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    prepared = prepare_arm(run, arm, seed)
    model, optimizer, scaler = prepared.model, prepared.optimizer, prepared.scaler
    seed_everything(seed)
    batch = move_to_device(first_batch(run.task, "train_loader", run.parallel.shard(run.task.train_loader())), device)

    for _ in range(WARMUP_STEPS_MAX):
        if not _step_skipped(prepared, batch):
            break
    _sync(device)
    gc.collect()

    ledger = _StorageLedger(device, CUDA_BLOCK_BYTES if cuda else 1)
    ledger.params.update(sid for t in [*model.parameters(), *model.buffers()] if (sid := ledger.track(t)) is not None)
    ledger.optimizer.update(sid for t in _optimizer_tensors(optimizer) if (sid := ledger.track(t)) is not None)
    ledger.inputs.update(sid for t in _tensors(batch) if (sid := ledger.track(t)) is not None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    scale = scaler.get_scale() if scaler is not None else None
    with (
        prepared.context(),
        _grad_hooks(model, ledger),
        _removing(optimizer.register_step_pre_hook(ledger.optimizer_started)),
        torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t),
        ledger,
    ):
        prepared.step(batch)
        _sync(device)
    ledger.optimizer.update(sid for t in _optimizer_tensors(optimizer) if (sid := ledger.track(t)) is not None)
    ledger.open = False
    replay = ledger.replay()
    tracked = sum(replay.at_peak.values())

    notes: list[str] = []
    if scaler is not None and scale is not None and scaler.get_scale() < scale:
        notes.append(
            "GradScaler skipped the measured step (gradient overflow), so no optimizer update ran: "
            "the peak may miss the optimizer's scratch memory."
        )
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
        reserved: int | None = torch.cuda.max_memory_reserved(device)
        if peak > 0 and abs(peak - tracked) > CROSS_CHECK_TOLERANCE * peak:
            notes.append(
                f"The allocator's peak ({peak / 2**20:.1f} MiB) and the tracked tensors' peak "
                f"({tracked / 2**20:.1f} MiB) differ by more than {CROSS_CHECK_TOLERANCE:.0%}: the difference "
                "is memory no tensor owns (cuBLAS/cuDNN workspaces, allocations made outside PyTorch ops)."
            )
        method = "cuda_allocator"
    else:
        peak, reserved, method = tracked, None, "storage_tracker"
    return MemoryResult(
        arm=arm.name,
        peak_bytes=int(peak),
        breakdown=replay.high,
        at_peak=replay.at_peak,
        method=method,
        batch_size=batch_size(batch),
        batch_scaling=replay.batch_scaling,
        reserved_bytes=reserved,
        notes=tuple(notes),
    )


def measure_memory(run: RunContext, arms: Sequence[Arm], seed: int) -> dict[str, MemoryResult]:
    """Peak memory and breakdown of one training step for each arm, one arm at a time.

    An arm whose step raises gets a result with ``error`` set (and zero bytes) instead of stopping the
    others; in a distributed job it raises instead (the ranks could no longer match their collectives).
    """
    out: dict[str, MemoryResult] = {}
    for arm in arms:
        try:
            out[arm.name] = measure_arm_memory(run, arm, seed)
        except Exception as exc:
            if run.parallel.active:
                raise
            out[arm.name] = MemoryResult(
                arm=arm.name,
                peak_bytes=0,
                breakdown=dict.fromkeys(BREAKDOWN_KEYS, 0),
                at_peak=dict.fromkeys(BREAKDOWN_KEYS, 0),
                method="failed",
                batch_size=None,
                error=error_text(exc),
            )
        if run.device.type == "cuda":  # hand the arm's blocks back before the next arm's peak is measured
            gc.collect()
            torch.cuda.empty_cache()
    return out
