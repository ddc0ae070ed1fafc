"""Statistics of many tensors reduced on the device in a few batched passes, into one int64 buffer.

Each traced tensor adds to a numbered row of the buffer: a histogram of its fp32 bit pattern's top bits (sign,
exponent, first mantissa bit), its finite nonzero count, and the finite sum / max / min-nonzero of |x|. Nothing
comes to the host until :meth:`StatsRows.collect`, which copies the buffer once (or merges it across ranks).
fp16 and bf16 tensors are widened to fp32 first, which is exact.

Reducing a tensor takes about ten passes, each one kernel launch (about 0.1 ms of fixed cost per tensor on a CPU)
whatever its size. So only large tensors are reduced as they arrive, chunk by chunk. A small one (most tensors of
most models) is copied into staging, a 2-D buffer of fixed-width rows in which each tensor starts a row, and the
staged rows are reduced together when staging fills up or the step's statistics are collected: the same ten
passes, over all staged rows at once, with one ``bincount`` binning every row.

On a CPU with a C compiler none of that runs: every tensor is reduced as it arrives, in one pass of a small
compiled kernel (:mod:`mpaudit.trace.native`), into the same buffer row with the same statistics. The torch
reductions stay for other devices and as the fallback.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpaudit.numerics.formats import HIST_BINS, HIST_MIN_EXP
from mpaudit.numerics.layerstats import TensorStats
from mpaudit.run.distributed import Parallel
from mpaudit.trace import native


class cpu_threads:
    """Limit torch's intra-op CPU threads to ``n`` inside the block, restoring the setting after it.

    The tracer's chunked reductions of large tensors and its update computations run on one thread: on a busy
    machine every parallel op waits for its slowest thread, up to a scheduler time slice per op (measured on a
    shared 2-core machine, MLP benchmark: a traced step cost 1.4-2.6x an untraced one with two threads, 1.1x with
    one), and a full reduction's order, hence its sum's last bits, depends on the thread count. Staged blocks choose
    between one thread and all by measured speed (:class:`BlockThreads`). A class, not a generator: it is cheap
    to enter.
    """

    __slots__ = ("_before", "_n")

    def __init__(self, n: int) -> None:
        self._n = n
        self._before = 0

    def __enter__(self) -> None:
        self._before = torch.get_num_threads()
        if self._before > self._n:
            torch.set_num_threads(self._n)

    def __exit__(self, *exc: object) -> None:
        if self._before > self._n:
            torch.set_num_threads(self._before)


BLOCK_EXPLORE = 8
"""Every this-many staged blocks, the block reductions try the thread count they are not using (see
:class:`BlockThreads`)."""
BLOCK_COST_WEIGHT = 0.25
"""Weight of the newest block in the running per-element cost of a thread count."""


class BlockThreads:
    """How many intra-op threads a CPU's staged-block reductions use: one, or all of torch's, whichever reduced an
    element faster lately.

    On a quiet machine both threads of a 2-core CPU halve the block's passes (the GPT-2 benchmark's traced step:
    +4.9 ms over untraced against +6.1 ms on one thread); on a busy one every parallel op waits for its slowest
    thread, and one thread is faster (see :class:`cpu_threads`). So the choice is measured: each count's cost per
    element is a running average of the blocks it reduced, the cheaper one is used and the other is tried every
    ``BLOCK_EXPLORE`` blocks. The blocks' results do not depend on the choice: every reduction of a block is along
    its rows (each row reduced whole by one thread, 2048 elements being below torch's parallel grain), and the
    merges into the buffer are exact or serial.
    """

    __slots__ = ("_blocks", "_cost")

    def __init__(self) -> None:
        self._cost: dict[int, float] = {}
        self._blocks = 0

    def pick(self) -> int:
        """The thread count for the next block."""
        most = torch.get_num_threads()
        options = (1, most) if most > 1 else (1,)
        self._blocks += 1
        untried = [n for n in options if n not in self._cost]
        if untried:
            return untried[0]
        best = min(options, key=self._cost.__getitem__)
        if len(options) > 1 and self._blocks % BLOCK_EXPLORE == 0:
            return options[0] if best != options[0] else options[1]
        return best

    def run(self, work: Callable[[int], None], elements: int) -> None:
        """``work(threads)`` on the thread count picked now (torch's intra-op threads limited to it), timed for
        the next pick."""
        threads = self.pick()
        t0 = time.perf_counter()
        with cpu_threads(threads):
            work(threads)
        self.record(threads, time.perf_counter() - t0, elements)

    def record(self, threads: int, seconds: float, elements: int) -> None:
        """A block of ``elements`` took ``seconds`` on ``threads`` threads."""
        cost = seconds / max(elements, 1)
        old = self._cost.get(threads)
        self._cost[threads] = cost if old is None else old + BLOCK_COST_WEIGHT * (cost - old)


CHUNK = 1 << 20
"""Large tensors are reduced in chunks of at most this many elements (all statistics merge), so the two work
buffers stay at 8 MiB however large a layer is, and a chunk's ten passes run out of the CPU's cache rather
than main memory (on the benchmark MLP's gradients: 31 ms a step at 2^20, 40 ms at 2^22). A chunk's
nonzero count is summed in fp32, exact below 2^24."""

SMALL_TENSOR = 1 << 17
"""Tensors with fewer elements than this are staged and reduced in batches; larger ones right away, where their
passes cost more than their launches (at 2^17 elements, ten passes take about as long as ten launches on a CPU)."""

ROW = 1 << 11
"""Staging row width. A staged tensor of n elements takes ceil(n / ROW) consecutive rows, the last one padded
with zeros; every row is binned and reduced on its own and the rows merge into the tensor's statistics row. Wider
rows mean fewer per-row histograms (1024 bins each) to merge, narrower ones less padding after small tensors."""

STAGE_LIMIT = 1 << 20
"""Staging holds at most this many elements (4 MiB of fp32 rows, padding included) before it is reduced: the
memory bound on what waits, small enough that the batched passes run out of the CPU's cache. The staging buffer
(one for full statistics, one for partial ones) is allocated at this size on first use and kept between steps."""

BINCOUNT_DEVICES = ("cpu",)
"""Devices whose histograms use ``bincount`` (~30% faster on a CPU than ``index_add_``); elsewhere ``index_add_``
into zeros, since CUDA's ``bincount`` reads the largest key back to size its output: a host sync."""

_LAYOUT_CACHE_SIZE = 256
"""Staging layouts kept on the device for reuse (see :meth:`StatsRows._cached_layout`)."""

# Layout of one row of the statistics buffer (int64; float columns hold float64 bit patterns).
_KEY_SHIFT = 22
"""fp32 bits >> 22 keeps sign (1 bit), exponent (8) and the top mantissa bit (1): that bit tells a (quiet)
NaN from an infinity in the all-ones exponent. A signalling NaN with that bit clear would count as ±Inf;
arithmetic never produces one."""
_KEY_BINS = 1 << 10
_SIGN_BIN = _KEY_BINS // 2
"""The bin of a value is its key (sign, exponent field, top mantissa bit) with the sign bit flipped: the int32
bits shifted arithmetically, plus 512 (one pass; a mask would take another). Negative values fill bins 0-511."""
_ZERO_BIN = _SIGN_BIN  # +0.0 (and staging padding)
_POSINF_BIN = 2 * 255 + _SIGN_BIN  # sign 0, exponent field 255, mantissa bit 0
_NEGINF_BIN = 2 * 255
_COL_NONZERO = _KEY_BINS  # float64: finite nonzero count (exact below 2^53)
_COL_SUM = _KEY_BINS + 1  # float64: sum of finite |x|
_COL_MAX = _KEY_BINS + 2  # float64: max of finite |x|
_COL_MIN = _KEY_BINS + 3  # int: min over 2*bits + _MIN_KEY_ZERO (int32 wrap) of finite values
ROW_WIDTH = _KEY_BINS + 4
_INT32_MAX = 0x7FFFFFFF
_MIN_KEY_ZERO = 2**31 - 2
"""g = 2*bits + this, in wrapping int32, is 2u - 2^31 - 2 for |x|'s pattern u >= 1 (monotone, from INT32_MIN
up to below this) and exactly this for +-0: the min of g over a tensor is its min nonzero |x|."""
_FP32_BIAS = 127
_FP32_EXP_MASK = 0x7F800000
_FP32_TWO_POW_MINUS_E = 0x7F000000
_FP32_EXP_ALL_ONES = 255
_FIRST_FIELD = _FP32_BIAS + HIST_MIN_EXP  # exponent field of the first histogram bin's binade
_LAST_FIELD = _FIRST_FIELD + HIST_BINS - 1  # ... and of the last bin's

_DTYPE_BITS: dict[torch.dtype, int] = {}
_DTYPE_NAMES: list[str] = []


def _dtype_bit(dtype: torch.dtype) -> int:
    """A dtype as one bit of an int: rows keep the dtypes they saw as a mask, not a set per row and step (sets
    living through a step are what makes Python's garbage collector walk every object)."""
    bit = _DTYPE_BITS.get(dtype)
    if bit is None:
        bit = _DTYPE_BITS[dtype] = 1 << len(_DTYPE_NAMES)
        _DTYPE_NAMES.append(str(dtype).removeprefix("torch."))
    return bit


def dtype_names(mask: int) -> str:
    """The dtypes of a mask of :func:`_dtype_bit` bits, sorted by name and comma-separated (remembered per mask:
    a bit never changes meaning, and every row of every traced step asks)."""
    names = _MASK_NAMES.get(mask)
    if names is None:
        names = _MASK_NAMES[mask] = ",".join(sorted(name for i, name in enumerate(_DTYPE_NAMES) if mask >> i & 1))
    return names


_MASK_NAMES: dict[int, str] = {}


def rows_for(n: int) -> int:
    """How many staging rows a tensor of ``n`` elements takes."""
    return -(-n // ROW)


def _capacity() -> int:
    """Rows of a staging buffer: ``STAGE_LIMIT`` elements (at least one row)."""
    return max(1, STAGE_LIMIT // ROW)


class _Staging:
    """Staged tensors, ``ROW`` elements a row: each tensor starts a row, its values in fp32, then zeros."""

    __slots__ = ("data", "rows")

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.data = torch.zeros((capacity, ROW), dtype=torch.float32, device=device)
        self.rows: list[int] = []  # the statistics row of each staging row

    def slot(self, row: int, shape: torch.Size, n: int) -> torch.Tensor:
        """Reserve rows for a tensor of ``shape`` (``n`` elements) of statistics row ``row``: the first ``n``
        elements of those rows, viewed as ``shape`` (the caller copies into it, maybe later: ``data`` is never
        reallocated)."""
        start = len(self.rows) * ROW
        self.rows += [row] * rows_for(n)
        strides = _STRIDES.get(shape)
        if strides is None:
            if len(_STRIDES) >= _STRIDES_CACHE_SIZE:
                _STRIDES.clear()
            strides = _STRIDES[shape] = _contiguous_strides(shape)
        return self.data.as_strided(shape, strides, start)  # one view op, where indexing takes three


_STRIDES: dict[torch.Size, tuple[int, ...]] = {}
_STRIDES_CACHE_SIZE = 4096


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Layout:
    """Where staged rows go, on the device: ``index`` is each row's statistics row; ``keys`` (int32, one per row)
    the first of its 1024 histogram bins in the flush's ``bincount``, shared by all rows of one statistics row
    (bin counts then scale with the rows traced, not the staged rows); ``hist_index`` the statistics row of each
    group of 1024 bins."""

    index: torch.Tensor
    keys: torch.Tensor
    hist_index: torch.Tensor


_CHECK_VALUES = (0.0, -0.0, 1.0, -1.5, 3.0e38, -3.0e38, 1.0e-40, -1.0e-45, 1.0e-3, 65504.0, 7.0, -2.0e-20)
NATIVE_THREADED_MIN = 1 << 15
"""Tensors from this many values may be reduced on several threads (the kernel's pieces are 2^14 values)."""


@functools.cache
def native_kernel() -> native.Kernel | native.Unavailable:
    """The one-pass CPU kernel (:func:`mpaudit.trace.native.load`), once it gave the torch reductions' statistics
    on test tensors: every special value (zeros of both signs, subnormals, extremes, NaN, infinities) at every
    position of a vector of lanes and a tail, full and partial rows, relative updates, on one thread and on two.
    Else why not."""
    kernel = native.load()
    if isinstance(kernel, native.Unavailable):
        return kernel
    if kernel.layout != (_KEY_BINS, _KEY_SHIFT, ROW_WIDTH, _MIN_KEY_ZERO):
        return native.Unavailable(f"{kernel.path.name} has another row layout {kernel.layout}")
    g = torch.Generator().manual_seed(0)
    n = 3 * NATIVE_THREADED_MIN + 77
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)
    values = torch.tensor([*_CHECK_VALUES, math.nan, math.inf, -math.inf])
    x[torch.randint(0, n, (400,), generator=g)] = values[torch.randint(0, len(values), (400,), generator=g)]
    tensors = [x, x[:5], x[:1000].neg(), torch.zeros(40), torch.full((33,), math.nan), x.half(), x[:999].bfloat16(),
               x.double()[::3]]
    after = x * (1 + torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, 0, (n,), generator=g).float())
    for threads in (1, 2):
        for full in (True, False):
            want = StatsRows(len(tensors) + 1, use_native=False)
            got = StatsRows(len(tensors) + 1, use_native=False)
            for rows in (want, got):
                rows.start(torch.device("cpu"))
            for i, t in enumerate(tensors):
                want.add(i, t, full)
                _native_add(kernel, got, i, t, full, threads)
            before_block, after_block = (torch.zeros(rows_for(n), ROW).view(-1) for _ in range(2))
            before_block[:n], after_block[:n] = x, after
            update_rows = [len(tensors)]
            layout = want.layout(update_rows * rows_for(n))
            _native_updates(kernel, got, before_block, after_block, update_rows, [n], threads)
            want.add_updates(before_block.view(-1, ROW), after_block.view(-1, ROW), layout, update_rows, [n])
            if not same_statistics(want.collect(Parallel())[0], got.collect(Parallel())[0]):
                return native.Unavailable(f"{kernel.path.name} disagreed with the torch reductions on a test tensor")
    return kernel


def same_statistics(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> bool:
    """Whether host rows ``a`` and ``b`` hold the same statistics: all but the sums exactly, the sums within
    ``rtol`` (their order of addition differs between reductions), and NaNs counted whatever their sign (which
    bit a NaN made by arithmetic carries is the CPU's and the compiler's choice, not the value's)."""
    a, b = a.copy(), b.copy()
    for rows in (a, b):
        rows[:, _POSINF_BIN + 1] += rows[:, _NEGINF_BIN + 1]
        rows[:, _NEGINF_BIN + 1] = 0
    exact = [c for c in range(ROW_WIDTH) if c != _COL_SUM]
    return bool(np.array_equal(a[:, exact], b[:, exact])
                and np.allclose(a.view(np.float64)[:, _COL_SUM], b.view(np.float64)[:, _COL_SUM], rtol=rtol))


def kernel_description(device_type: str = "cpu") -> str:
    """Which reduction tracing on ``device_type`` uses, for a result's environment: ``native (<library>, ...)`` or
    ``torch (<why>)``."""
    if device_type != "cpu":
        return f"torch (the kernel is the CPU's; on {device_type} torch's batched reductions run)"
    kernel = native_kernel()
    if isinstance(kernel, native.Unavailable):
        return f"torch ({kernel.reason})"
    return f"native ({kernel.path.name}, {'OpenMP' if kernel.threaded else 'one thread'})"


def _kernel_reads(t: torch.Tensor) -> bool:
    """Whether the kernel can read ``t``'s memory: a plain strided tensor in CPU memory (not a subclass such as
    a DTensor or a fake tensor, not on another device than the rows)."""
    return type(t) is torch.Tensor and t.is_cpu and t.layout == torch.strided


_ROW_BYTES = ROW_WIDTH * 8
_HALF = {torch.bfloat16: 0, torch.float16: 1}
"""16-bit dtypes the kernel reads itself, with its ``fp16`` flag."""


def _row_address(rows: StatsRows, row: int) -> int:
    assert rows.buf is not None
    return rows.buf.data_ptr() + row * _ROW_BYTES


def _native_add(kernel: native.Kernel, rows: StatsRows, row: int, t: torch.Tensor, full: bool,
                threads: int = 1) -> None:
    """Reduce the CPU tensor ``t`` into row ``row`` with ``kernel``: fp32, bf16 and fp16 read in place (the kernel
    widens 16-bit values itself, exactly), also when their values fill a block of memory in another order (a
    channels-last activation, a transposed weight's gradient: the statistics do not depend on the order), a tensor
    with gaps or repeats first copied whole, other dtypes converted to fp32 chunk by chunk in the scratch buffer."""
    address, flag = _row_address(rows, row), 1 if full else 0
    flat = t if t.is_contiguous() or _dense(t) else t.reshape(-1)
    if t.dtype == torch.float32:
        kernel.stats(flat.data_ptr(), t.numel(), address, flag, threads)
        return
    if t.dtype in _HALF:
        kernel.half(flat.data_ptr(), t.numel(), address, flag, threads, _HALF[t.dtype])
        return
    flat = flat.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        f = rows._scratch_f32(part.numel())
        f.copy_(part)
        kernel.stats(f.data_ptr(), f.numel(), address, flag, threads)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s values fill ``t.numel()`` consecutive elements of memory from ``t.data_ptr()`` on, in some
    order: no gaps, nothing seen twice (strides, sorted, are the running products of their sizes)."""
    expect = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _native_updates(kernel: native.Kernel, rows: StatsRows, before: torch.Tensor, after: torch.Tensor,
                    update_rows: Sequence[int], sizes: Sequence[int], threads: int = 1) -> None:
    """The relative updates of a block laid out as :meth:`StatsRows.add_updates` takes it, with ``kernel``."""
    b, a = before.data_ptr(), after.data_ptr()
    at = 0
    for row, n in zip(update_rows, sizes, strict=True):
        kernel.update(b + 4 * at, a + 4 * at, n, _row_address(rows, row), threads)
        at += rows_for(n) * ROW


class StatsRows:
    """The statistics of a step's tensors, one buffer row per traced (layer, role), on one device.

    ``start`` zeroes the buffer; ``add`` / ``add_all`` / ``add_block`` feed tensors (no host sync); ``collect``
    reduces what is still staged and brings the rows to the host. Host-side it keeps per row the element count,
    the dtypes seen, whether the row is partial (histogram and counts only) and the staging padding added to its
    zero bin (subtracted on the host).
    """

    def __init__(self, n_rows: int, use_native: bool = True) -> None:
        self.n_rows = n_rows
        self.device = torch.device("cpu")
        self.buf: torch.Tensor | None = None
        self.use_native = use_native
        self.kernel: native.Kernel | None = None  # the one-pass kernel, while the rows are on a CPU
        self._base = 0  # the buffer's address, for the kernel
        self._staging: dict[bool, _Staging] = {}  # by full (True) or partial statistics
        self._f32: torch.Tensor | None = None
        self._i32: torch.Tensor | None = None
        self._f64: torch.Tensor | None = None
        self._i64: torch.Tensor | None = None
        self._layouts: dict[tuple[int, ...], Layout] = {}
        self._consts: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.block_threads = {True: BlockThreads(), False: BlockThreads()}  # full and partial blocks apart
        self._reset_host()

    def _reset_host(self) -> None:
        self.counts = [0] * self.n_rows
        self.partial = [False] * self.n_rows
        self.dtypes = [0] * self.n_rows  # masks of dtype bits (see dtype_names)
        self._pads = [0] * self.n_rows

    def start(self, device: torch.device) -> None:
        """Begin a step's statistics on ``device``: a zeroed buffer, nothing staged."""
        if self.buf is None or self.buf.device != device:
            self.release()
            self.device = device
            self.buf = torch.empty((self.n_rows, ROW_WIDTH), dtype=torch.int64, device=device)
            kernel = native_kernel() if self.use_native and device.type == "cpu" else None
            self.kernel = kernel if isinstance(kernel, native.Kernel) else None
        with self.threads():
            self.buf.zero_()
            self.buf[:, _COL_MIN].fill_(_INT32_MAX)
            self._discard_staged()
        self._base = self.buf.data_ptr()
        self._reset_host()

    def release(self) -> None:
        """Free every device buffer (the next ``start`` allocates them again)."""
        self.buf = self._f32 = self._i32 = self._f64 = self._i64 = None
        self._staging.clear()
        self._layouts.clear()
        self._consts.clear()

    # ------------------------------------------------------------------ feeding tensors

    def _note(self, row: int, n: int, dtype: torch.dtype, full: bool, pad: int = 0) -> None:
        self.counts[row] += n
        self.dtypes[row] |= _DTYPE_BITS.get(dtype) or _dtype_bit(dtype)
        if not full:
            self.partial[row] = True
        self._pads[row] += pad

    def add(self, row: int, t: torch.Tensor, full: bool = True) -> None:
        """Add the floating tensor ``t`` to row ``row``; ``full=False`` leaves max / min / sum unmeasured. ``t``
        is read now (later in-place changes to it do not matter): by the kernel, or a small ``t`` copied into
        staging and reduced later, a large one reduced now.

        The hooks call this once per traced tensor, so its common case (:meth:`_read`) is a handful of attribute
        reads and one foreign call: on a model of 400 small layers, every microsecond here is a percent of a
        traced step."""
        n = t.numel()
        if n == 0 or self.buf is None or self._read(row, t, n, full):
            return
        kernel = self.kernel
        with torch.no_grad():
            if kernel is not None and _kernel_reads(t):
                self._note(row, n, t.dtype, full)
                self._native_add(row, t, full)
                return
            if n >= SMALL_TENSOR or rows_for(n) > _capacity():
                self._note(row, n, t.dtype, full)
                self._reduce_now(row, t, full)
                return
            self._note(row, n, t.dtype, full, -n % ROW)
            self._slot(row, t, n, full).copy_(t)

    def _read(self, row: int, t: torch.Tensor, n: int, full: bool) -> bool:
        """The common case of :meth:`add`, as short as it can be: a contiguous fp32 / bf16 / fp16 CPU tensor of
        fewer than ``NATIVE_THREADED_MIN`` values, read by the kernel in place on this thread. False when ``t`` is
        not such a tensor (or there is no kernel), having done nothing."""
        kernel = self.kernel
        if (kernel is None or n >= NATIVE_THREADED_MIN or type(t) is not torch.Tensor or not t.is_cpu
                or t.layout is not torch.strided or not t.is_contiguous()):
            return False
        dtype = t.dtype
        if dtype is torch.float32:
            kernel.stats(t.data_ptr(), n, self._base + row * _ROW_BYTES, full, 1)
        elif dtype in _HALF:
            kernel.half(t.data_ptr(), n, self._base + row * _ROW_BYTES, full, 1, _HALF[dtype])
        else:
            return False
        self.counts[row] += n
        self.dtypes[row] |= _DTYPE_BITS.get(dtype) or _dtype_bit(dtype)
        if not full:
            self.partial[row] = True
        return True

    def add_all(self, rows: Sequence[int], tensors: Sequence[torch.Tensor]) -> None:
        """``add`` for several tensors at once (full statistics): the small ones are staged with one
        ``_foreach_copy_`` (a single fused kernel on a GPU)."""
        if self.buf is None:
            return
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        large: list[tuple[int, torch.Tensor]] = []
        for row, t in zip(rows, tensors, strict=True):
            n = t.numel()
            if n == 0 or self._read(row, t, n, True):
                continue
            if self.kernel is not None and _kernel_reads(t):
                self._note(row, n, t.dtype, True)
                self._native_add(row, t, True)
                continue
            if n >= SMALL_TENSOR or rows_for(n) > _capacity():
                self._note(row, n, t.dtype, True)
                large.append((row, t))
                continue
            if self._room(True) < rows_for(n) and dsts:  # the flush below must see these copies done
                torch._foreach_copy_(dsts, srcs)
                dsts, srcs = [], []
            self._note(row, n, t.dtype, True, -n % ROW)
            dsts.append(self._slot(row, t, n, True))
            srcs.append(t)
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        for row, t in large:
            self._reduce_now(row, t, True)

    def add_block(self, x: torch.Tensor, layout: Layout, rows: Sequence[int], sizes: Sequence[int],
                  full: bool) -> None:
        """Add a caller-packed block of ``ROW``-wide fp32 rows ``x``, laid out as staging is: tensor i, of
        ``sizes[i]`` elements for statistics row ``rows[i]``, starts a row and fills ``rows_for(sizes[i])`` rows
        (zeros after it); ``layout`` is :meth:`layout` of the statistics row of every row of ``x``. ``x`` is
        overwritten."""
        if self.buf is None:
            return
        for row, n in zip(rows, sizes, strict=True):
            self._note(row, n, torch.float32, full, -n % ROW)
        self._reduce_block_timed(x, layout, full)

    def _native_add(self, row: int, t: torch.Tensor, full: bool) -> None:
        """The kernel's reading of any tensor it can read (see :func:`_native_add`): a large one on the thread
        count :class:`BlockThreads` picks, timed for the next pick."""
        assert self.kernel is not None
        n = t.numel()
        kernel = self.kernel
        if n < NATIVE_THREADED_MIN or not kernel.threaded:
            with cpu_threads(1):  # a copy or conversion first, on one thread as the torch path's
                _native_add(kernel, self, row, t, full)
            return
        self.block_threads[full].run(lambda threads: _native_add(kernel, self, row, t, full, threads), n)

    def add_updates(self, before: torch.Tensor, after: torch.Tensor, layout: Layout, rows: Sequence[int],
                    sizes: Sequence[int]) -> None:
        """Add the relative updates r = (after - before) / 2^floor(log2|before|) of sampled weights (histogram and
        nonzero count: partial rows). ``before`` and ``after`` are fp32 blocks of ``ROW``-wide rows laid out as for
        :meth:`add_block` (tensor i, ``sizes[i]`` values for statistics row ``rows[i]``, starts a row; ``layout`` is
        :meth:`layout` of their rows). r is built from before's fp32 bit pattern, with no division: 2^-e for
        before's exponent field E has the pattern (254 - E) << 23 = 0x7F000000 - (before & 0x7F800000), so r's
        binade is exactly Δw's minus w's (a zero or fp32-subnormal weight, padding included, gets the factor 2^127:
        its update lands far above any loss edge, and padding stays 0). The kernel computes r in its pass; the
        torch reductions compute it into ``after`` (overwritten)."""
        if self.buf is None:
            return
        if self.kernel is not None and _kernel_reads(before) and _kernel_reads(after):
            n = before.numel()
            for row, size in zip(rows, sizes, strict=True):
                self._note(row, size, torch.float32, False)
            kernel = self.kernel
            if n < NATIVE_THREADED_MIN or not kernel.threaded:
                _native_updates(kernel, self, before, after, rows, sizes)
            else:
                self.block_threads[False].run(
                    lambda threads: _native_updates(kernel, self, before, after, rows, sizes, threads), n)
            return
        with self.threads():
            k = self._scratch_i32(before.numel()).view(before.shape)
            torch.bitwise_and(before.view(torch.int32), _FP32_EXP_MASK, out=k)
            torch.sub(self._const(_FP32_TWO_POW_MINUS_E, torch.int32), k, out=k)
            after.sub_(before).mul_(k.view(torch.float32))
        self.add_block(after, layout, rows, sizes, full=False)

    def _room(self, full: bool) -> int:
        """Free staging rows for full (or partial) statistics."""
        staging = self._staging.get(full)
        return _capacity() - (len(staging.rows) if staging is not None else 0)

    def _slot(self, row: int, t: torch.Tensor, n: int, full: bool) -> torch.Tensor:
        """Reserve staging rows for ``t`` (reducing what is staged first if they would pass ``STAGE_LIMIT``)."""
        staging = self._staging.get(full)
        if staging is None:
            staging = self._staging[full] = _Staging(_capacity(), self.device)
        if len(staging.rows) + rows_for(n) > staging.data.shape[0]:
            self.flush()
        return staging.slot(row, t.shape, n)

    def flush(self) -> None:
        """Reduce everything staged into the buffer (a fixed number of passes for each of the two stagings)."""
        for full, staging in self._staging.items():
            if not staging.rows:
                continue
            x = staging.data[: len(staging.rows)]
            self._reduce_block_timed(x, self._cached_layout(staging.rows), full, zero=True)
            staging.rows.clear()

    def _reduce_block_timed(self, x: torch.Tensor, layout: Layout, full: bool, zero: bool = False) -> None:
        """:meth:`_reduce_block` (then zero ``x`` when asked), on a CPU on the thread count :class:`BlockThreads`
        picks, timing it for the next pick."""
        if self.device.type != "cpu":
            self._reduce_block(x, layout, full)
            if zero:
                x.zero_()
            return
        def work(threads: int) -> None:
            self._reduce_block(x, layout, full)
            if zero:
                x.zero_()

        self.block_threads[full].run(work, x.numel())

    def _discard_staged(self) -> None:
        for staging in self._staging.values():
            if staging.rows:
                staging.data[: len(staging.rows)].zero_()
                staging.rows.clear()

    def threads(self) -> contextlib.AbstractContextManager[None]:
        """Inside it, the device's work runs as the tracer's should: on one thread on a CPU (see
        :class:`cpu_threads`; staged blocks pick their own count, see :class:`BlockThreads`). The reductions enter
        it themselves; a hook's copy into staging does not (it is small, and switching the thread count around
        every hook would make the model's next parallel op wait for its second thread to wake up, on a busy
        machine)."""
        return cpu_threads(1) if self.device.type == "cpu" else contextlib.nullcontext()

    # ------------------------------------------------------------------ the reductions

    def _reduce_block(self, x: torch.Tensor, layout: Layout, full: bool) -> None:
        """Reduce the staged rows ``x`` (S, ROW), zero-padded, into the buffer rows of ``layout`` in one go.

        One ``bincount`` bins every row, each statistics row's rows into its own 1024 bins; the other statistics
        are per-row reductions of x, merged into the buffer with ``index_put_`` / ``scatter_reduce_`` (the rows
        of one tensor, or of several, share an index). Padding adds zeros to a row's zero bin only (corrected on
        the host).
        """
        assert self.buf is not None
        s, width = x.shape
        index = layout.index
        buf, f64 = self.buf, self.buf.view(torch.float64)
        k = self._scratch_i32(s * width).view(s, width)
        torch.bitwise_right_shift(x.view(torch.int32), _KEY_SHIFT, out=k)  # -512..511
        k.add_(layout.keys)  # each statistics row's first bin, + _SIGN_BIN
        groups = layout.hist_index.shape[0]
        hist = self._bincount(k.view(-1), groups * _KEY_BINS).view(groups, _KEY_BINS)
        buf[:, :_KEY_BINS].index_put_((layout.hist_index,), hist, accumulate=True)
        # |x| with non-finite values zeroed: counts and extremes over finite values only
        x.abs_()
        x.nan_to_num_(0.0, 0.0, 0.0)
        ones = k.view(torch.float32)
        torch.sign(x, out=ones)  # 1 or 0: its fp32 row sum is the exact nonzero count (ROW < 2^24)
        vals = self._scratch_f64(3 * s).view(s, 3)
        if not full:
            vals[:, 0].copy_(ones.sum(1))
            f64[:, _COL_NONZERO].index_put_((index,), vals[:, 0], accumulate=True)
            return
        torch.stack((ones.sum(1), x.sum(1), x.amax(1)), 1, out=vals)
        f64[:, _COL_NONZERO : _COL_SUM + 1].index_put_((index,), vals[:, :2], accumulate=True)
        f64[:, _COL_MAX].scatter_reduce_(0, index, vals[:, 2], "amax")
        # min nonzero |x| in one pass: g = 2*bits + C (int32, wrapping) is monotone in |x| for x != 0 and
        # sends 0 (zeros, padding and the zeroed non-finite values) to C, above every nonzero value.
        torch.add(self._const(_MIN_KEY_ZERO, torch.int32), x.view(torch.int32), alpha=2, out=k)
        mins = self._scratch_i64(s)
        mins.copy_(k.amin(1))
        buf[:, _COL_MIN].scatter_reduce_(0, index, mins, "amin")

    def _bincount(self, keys: torch.Tensor, bins: int) -> torch.Tensor:
        """Counts of ``keys`` (int32, all below ``bins``) in a fixed-size int64 tensor of ``bins``."""
        if keys.device.type in BINCOUNT_DEVICES:  # keys < bins, so its size is fixed
            return torch.bincount(keys, minlength=bins)
        hist = torch.zeros(bins, dtype=torch.int64, device=keys.device)
        return hist.index_add_(0, keys, self._const(1, torch.int64).expand(keys.numel()))

    def _reduce_now(self, row: int, t: torch.Tensor, full: bool) -> None:
        """Reduce a large tensor into row ``row`` right away, chunk by chunk (every statistic merges)."""
        flat = t.reshape(-1)
        with self.threads():
            for start in range(0, flat.numel(), CHUNK):
                self._reduce_chunk(row, flat[start : start + CHUNK], full)

    def _reduce_chunk(self, row: int, t: torch.Tensor, full: bool) -> None:
        """One chunk (a flat tensor) into row ``row``: about ten passes, no host sync."""
        assert self.buf is not None
        n = t.numel()
        f = self._scratch_f32(n)
        k = self._scratch_i32(n)
        if t.dtype == torch.float32 and t.is_contiguous():
            x = t
        else:
            f.copy_(t)  # widening fp16/bf16 to fp32 is exact
            x = f
        buf = self.buf
        torch.bitwise_right_shift(x.view(torch.int32), _KEY_SHIFT, out=k)
        k.add_(_SIGN_BIN)
        buf[row, :_KEY_BINS].add_(self._bincount(k, _KEY_BINS))
        # |x| with non-finite values zeroed: max / sum / min / nonzero count over finite values only
        if x is f:
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
        if not full:
            return
        col_max = floats[_COL_MAX : _COL_MAX + 1]
        torch.maximum(col_max, f.amax().view(1), out=col_max)
        floats[_COL_SUM].add_(f.sum())  # fp32 accumulation: fp64 is ~10x slower on CPU
        torch.add(self._const(_MIN_KEY_ZERO, torch.int32), f.view(torch.int32), alpha=2, out=k)
        col_min = buf[row, _COL_MIN : _COL_MIN + 1]
        torch.minimum(col_min, k.amin().view(1), out=col_min)

    # ------------------------------------------------------------------ work buffers

    def _scratch_f32(self, n: int) -> torch.Tensor:
        if self._f32 is None or self._f32.numel() < n:
            self._f32 = torch.empty(max(n, min(CHUNK, SMALL_TENSOR)), dtype=torch.float32, device=self.device)
        return self._f32[:n]

    def _scratch_i32(self, n: int) -> torch.Tensor:
        if self._i32 is None or self._i32.numel() < n:
            self._i32 = torch.empty(max(n, min(CHUNK, SMALL_TENSOR)), dtype=torch.int32, device=self.device)
        return self._i32[:n]

    def _scratch_f64(self, n: int) -> torch.Tensor:
        if self._f64 is None or self._f64.numel() < n:
            self._f64 = torch.empty(max(n, 3 * 1024), dtype=torch.float64, device=self.device)
        return self._f64[:n]

    def _scratch_i64(self, n: int) -> torch.Tensor:
        if self._i64 is None or self._i64.numel() < n:
            self._i64 = torch.empty(max(n, 1024), dtype=torch.int64, device=self.device)
        return self._i64[:n]

    def _cached_layout(self, rows: list[int]) -> Layout:
        """:meth:`layout` of ``rows``, cached: a model stages the same rows step after step, so a GPU gets them
        without a host-to-device copy per flush."""
        key = tuple(rows)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= _LAYOUT_CACHE_SIZE:
                self._layouts.clear()
            layout = self._layouts[key] = self.layout(key)
        return layout

    def layout(self, rows: Sequence[int]) -> Layout:
        """The device-side :class:`Layout` of staged rows whose statistics rows are ``rows``."""
        group: dict[int, int] = {}
        for row in rows:
            group.setdefault(row, len(group))
        return Layout(
            index=self._to_device(torch.tensor(rows, dtype=torch.int64)),
            keys=self._to_device(torch.tensor([group[row] * _KEY_BINS + _SIGN_BIN for row in rows],
                                              dtype=torch.int32)[:, None]),
            hist_index=self._to_device(torch.tensor(list(group), dtype=torch.int64)),
        )

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, copied without waiting for the device (from pinned memory on CUDA)."""
        if self.device.type == "cpu":
            return host
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _const(self, value: int, dtype: torch.dtype) -> torch.Tensor:
        """A cached 0-d device tensor (so no host-to-device copy per call)."""
        key = (value, dtype)
        c = self._consts.get(key)
        if c is None:
            c = self._consts[key] = torch.tensor(value, dtype=dtype, device=self.device)
        return c

    # ------------------------------------------------------------------ to the host

    def collect(self, parallel: Parallel, replicated_rows: Sequence[int] = ()) -> tuple[np.ndarray, list[int]]:
        """Reduce what is staged and return the rows and their element counts on the host (one device-to-host
        copy), merged across the ranks of ``parallel`` when it is active.

        In a distributed job the ranks' rows merge with two all-reduces of packed buffers whose size does not grow
        with the world: a sum of the counts, histograms and sums, and a max of the extremes (max |x| and, negated,
        the min-nonzero key). ``replicated_rows`` hold the same tensor on every rank (DDP's parameter gradients
        and updates) and count once, rank 0's.
        """
        self.flush()
        assert self.buf is not None
        if not parallel.active:
            # the one device-to-host copy of the step; on a CPU the buffer is read in place (``start`` zeroes it)
            host = self.buf.numpy() if self.buf.device.type == "cpu" else self.buf.to("cpu", copy=True).numpy()
            if any(self._pads):  # staging padding (the torch reductions'): zeros never there
                host[:, _ZERO_BIN] -= np.asarray(self._pads, dtype=np.int64)
            return host, list(self.counts)
        buf, f64 = self.buf, self.buf.view(torch.float64)
        # fp64 carries the counts exactly (below 2^53) and the int32-range min keys
        host_cols = torch.tensor([self.counts, self._pads], dtype=torch.float64).t().contiguous()
        cols = host_cols.to(buf.device)
        added = torch.cat([buf[:, :_KEY_BINS].to(torch.float64), f64[:, [_COL_NONZERO, _COL_SUM]], cols[:, :1]], 1)
        added[:, _ZERO_BIN] -= cols[:, 1]
        extremes = torch.stack([f64[:, _COL_MAX], -buf[:, _COL_MIN].to(torch.float64)], 1)
        if replicated_rows and not parallel.is_main:
            rows = list(replicated_rows)
            added[rows] = 0.0
            extremes[rows] = torch.tensor([0.0, -float(_INT32_MAX)], dtype=torch.float64, device=buf.device)
        parallel.all_reduce(added, "sum")
        parallel.all_reduce(extremes, "max")
        total, top = added.to("cpu").numpy(), extremes.to("cpu").numpy()
        merged = np.zeros((self.n_rows, ROW_WIDTH), dtype=np.int64)
        merged[:, :_KEY_BINS] = total[:, :_KEY_BINS].astype(np.int64)
        floats = merged.view(np.float64)
        floats[:, _COL_NONZERO], floats[:, _COL_SUM] = total[:, _KEY_BINS], total[:, _KEY_BINS + 1]
        floats[:, _COL_MAX] = top[:, 0]
        merged[:, _COL_MIN] = (-top[:, 1]).astype(np.int64)
        return merged, [int(c) for c in total[:, -1]]


@dataclass
class Folded:
    """The statistics of buffer rows on the host, as arrays with one entry per row: what :class:`TensorStats`
    holds, for many rows at once (so merging a step into a running total is a few numpy operations, not one
    object per tensor). ``max_abs`` / ``min_nonzero_abs`` / ``sum_abs`` are NaN for partial rows."""

    count: np.ndarray
    zeros: np.ndarray
    nan: np.ndarray
    posinf: np.ndarray
    neginf: np.ndarray
    max_abs: np.ndarray
    min_nonzero_abs: np.ndarray
    sum_abs: np.ndarray
    hist: np.ndarray

    def records(self, rows: Sequence[int], dtypes: Sequence[str]) -> list[TensorStats]:
        """Rows ``rows`` as :class:`TensorStats` with the given dtypes (their histograms are rows of one array)."""
        index = np.asarray(rows, dtype=np.int64)
        columns = [getattr(self, name)[index].tolist() for name in _SCALARS]  # Python ints and floats
        # positionally, in TensorStats' field order (keywords cost a third more, per row of every traced step)
        return list(map(TensorStats, *columns, list(self.hist[index]), dtypes))


_SCALARS = ("count", "zeros", "nan", "posinf", "neginf", "max_abs", "min_nonzero_abs", "sum_abs")
"""TensorStats' fields before ``hist`` and ``dtype``, in its order."""


def empty_rows(n_rows: int) -> np.ndarray:
    """Host rows of nothing, as a started buffer's: each merges with another row into that row."""
    rows = np.zeros((n_rows, ROW_WIDTH), dtype=np.int64)
    rows[:, _COL_MIN] = _INT32_MAX
    return rows


def merge_rows(into: np.ndarray, rows: np.ndarray) -> None:
    """Merge host rows (as :meth:`StatsRows.collect` returns them) into ``into``, in place: histograms, counts and
    sums add, max |x| and the min-nonzero key take the max and min. Folding the merge gives the merge of the
    folds (``TensorStats.merge``); a row a step did not see merges as nothing. One pass of the kernel when it is
    loaded (numpy takes four, a good part of a small model's traced step)."""
    kernel = native_kernel()
    if (isinstance(kernel, native.Kernel) and into.shape == rows.shape and into.dtype == rows.dtype == np.int64
            and into.flags.c_contiguous and rows.flags.c_contiguous and into.shape[1] == ROW_WIDTH):
        kernel.merge(into.ctypes.data, rows.ctypes.data, into.shape[0])
        return
    into[:, :_KEY_BINS] += rows[:, :_KEY_BINS]
    floats, other = into.view(np.float64), rows.view(np.float64)
    floats[:, _COL_NONZERO : _COL_SUM + 1] += other[:, _COL_NONZERO : _COL_SUM + 1]
    np.maximum(floats[:, _COL_MAX], other[:, _COL_MAX], out=floats[:, _COL_MAX])
    np.minimum(into[:, _COL_MIN], rows[:, _COL_MIN], out=into[:, _COL_MIN])


def nonfinite_counts(rows: np.ndarray) -> np.ndarray:
    """NaN and ±Inf values in each host row (without folding it)."""
    return (rows[:, _POSINF_BIN] + rows[:, _POSINF_BIN + 1] + rows[:, _NEGINF_BIN] + rows[:, _NEGINF_BIN + 1])


def fold(rows: np.ndarray, counts: Sequence[int], partial: Sequence[bool]) -> Folded:
    """Turn buffer rows (key histogram and reductions) into statistics, all rows at once (new arrays: ``rows``
    may be the device buffer itself, on a CPU)."""
    key = rows[:, :_KEY_BINS]
    by_sign = key[:, :_SIGN_BIN] + key[:, _SIGN_BIN:]  # bin: (flipped) sign, exponent field, top mantissa bit
    per_field = by_sign[:, 0::2] + by_sign[:, 1::2]
    # exponent field E holds binade E - 127: fields up to _FIRST_FIELD clamp into bin 0, fields from
    # _LAST_FIELD up (but not 255: inf/NaN) into the last bin; field 0 (zero/subnormal) is handled below
    hist = np.empty((len(counts), HIST_BINS), dtype=np.int64)
    hist[:, 0] = per_field[:, 1 : _FIRST_FIELD + 1].sum(axis=1)
    hist[:, 1:-1] = per_field[:, _FIRST_FIELD + 1 : _LAST_FIELD]
    hist[:, -1] = per_field[:, _LAST_FIELD:_FP32_EXP_ALL_ONES].sum(axis=1)
    nonfinite = per_field[:, _FP32_EXP_ALL_ONES]
    floats = rows.view(np.float64)
    nonzero = floats[:, _COL_NONZERO].astype(np.int64)  # finite nonzero values
    zeros = np.asarray(counts, dtype=np.int64) - nonzero - nonfinite
    hist[:, 0] += per_field[:, 0] - zeros  # fp32 subnormals: below 2^-126, so in the clamped first bin
    min_key = rows[:, _COL_MIN]
    measured = min_key < _MIN_KEY_ZERO
    bits = np.where(measured, (min_key + 2**31 + 2) // 2, 0).astype(np.int32)
    min_nonzero = np.where(measured, bits.view(np.float32).astype(np.float64), math.inf)
    unmeasured = np.asarray(partial, dtype=bool)
    return Folded(
        count=np.asarray(counts, dtype=np.int64),
        zeros=zeros,
        nan=key[:, _POSINF_BIN + 1] + key[:, _NEGINF_BIN + 1],  # mantissa bit 1: NaN of either sign
        posinf=key[:, _POSINF_BIN].copy(),
        neginf=key[:, _NEGINF_BIN].copy(),
        max_abs=np.where(unmeasured, math.nan, floats[:, _COL_MAX]),
        min_nonzero_abs=np.where(unmeasured, math.nan, min_nonzero),
        sum_abs=np.where(unmeasured, math.nan, floats[:, _COL_SUM]),
        hist=hist,
    )
