"""Numeric formats and the binade histogram every what-if is computed from (pure Python/numpy, no torch).

A traced tensor is summarised as a histogram of ``floor(log2|x|)``: one bin per binade. Because every
format's min normal and min subnormal are powers of two, "would this value flush / land subnormal in
format F after multiplying by 2^k" is answered *exactly* by the binade a value sits in. Only the overflow
edge is not a power of two (fp16's max 65504 lies inside the binade [2^15, 2^16)), so the histogram uses
a documented convention there and ``max_abs`` gives the exact check. See :func:`what_if`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

HIST_MIN_EXP = -64
"""Bin 0 counts |x| in [2^-64, 2^-63) and, clamped, every smaller nonzero |x|."""
HIST_MAX_EXP = 64
"""The last bin counts |x| in [2^63, 2^64) and, clamped, every larger finite |x|."""
HIST_BINS = HIST_MAX_EXP - HIST_MIN_EXP
"""Bin ``i`` counts nonzero finite |x| in [2^(HIST_MIN_EXP+i), 2^(HIST_MIN_EXP+i+1)); zeros and
non-finite values are counted outside the histogram."""


@dataclass(frozen=True)
class Format:
    """A floating-point storage format: its range edges and mantissa width (explicit bits, no hidden bit)."""

    name: str
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int
    source: str

    @property
    def flush_below(self) -> float:
        """Magnitudes below this (half the min subnormal) round to zero."""
        return self.min_subnormal / 2

    @property
    def max_binade(self) -> int:
        """``floor(log2(max))``: the binade holding the largest finite value (15 for fp16's 65504)."""
        return math.frexp(self.max)[1] - 1

    @property
    def min_subnormal_exp(self) -> int:
        """``log2(min_subnormal)`` (-24 for fp16)."""
        return _exact_log2(self.min_subnormal)

    @property
    def min_normal_exp(self) -> int:
        """``log2(min_normal)`` (-14 for fp16)."""
        return _exact_log2(self.min_normal)


def _exact_log2(x: float) -> int:
    mantissa, exp = math.frexp(x)
    if mantissa != 0.5:
        raise ValueError(f"{x} is not a power of two")
    return exp - 1


FP16 = Format(
    name="fp16",
    max=65504.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-24,
    mantissa_bits=10,
    source="IEEE 754-2008 binary16",
)
BF16 = Format(
    name="bf16",
    max=float(np.float64((2 - 2.0**-7) * 2.0**127)),  # ≈ 3.39e38, torch.finfo(torch.bfloat16).max
    min_normal=2.0**-126,
    min_subnormal=2.0**-133,
    mantissa_bits=7,
    source="bfloat16 as in Google's Cloud TPU documentation and PyTorch torch.finfo(torch.bfloat16)",
)
E4M3 = Format(
    name="e4m3",
    max=448.0,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    mantissa_bits=3,
    source="OCP 8-bit Floating Point Specification (OFP8) v1.0, E4M3 (no infinities)",
)
E5M2 = Format(
    name="e5m2",
    max=57344.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    mantissa_bits=2,
    source="OCP 8-bit Floating Point Specification (OFP8) v1.0, E5M2",
)

FORMATS: dict[str, Format] = {f.name: f for f in (FP16, BF16, E4M3, E5M2)}
"""Every format a what-if is computed for, keyed by the name used in column names (``fp16_flush``)."""


@dataclass(frozen=True)
class WhatIf:
    """Fractions of a tensor's nonzero finite values that would flush to zero, land subnormal, or overflow."""

    flush: float
    subnormal: float
    overflow: float


def bin_exponents(scale_log2: int = 0) -> npt.NDArray[np.int64]:
    """``floor(log2|x|)`` of each histogram bin's lower edge, after multiplying by ``2**scale_log2``."""
    return np.arange(HIST_MIN_EXP, HIST_MAX_EXP, dtype=np.int64) + int(scale_log2)


def what_if(hist: npt.ArrayLike, fmt: Format, scale_log2: int = 0) -> WhatIf:
    """What happens to the values of ``hist`` cast to ``fmt`` after multiplying them by ``2**scale_log2``.

    Conventions, exact at binade resolution (y = |x| * 2**scale_log2):
    flush: y < min_subnormal/2 (the exact tie y = min_subnormal/2, which rounds to zero, counts as kept);
    subnormal: min_subnormal/2 <= y < min_normal (values a half-ulp below min_normal that round up to it
    are counted subnormal); overflow: y >= 2**(max_binade + 1), e.g. y >= 2**16 for fp16. Values between
    ``fmt.max`` and that power of two (65504 < y < 65536 for fp16) are *not* counted: compare ``max_abs``
    with ``fmt.max`` for the exact check. The clamped edge bins are taken to lie in their nominal binade.
    Fractions are of the nonzero finite values in ``hist`` (0.0 when there are none).
    """
    counts = np.asarray(hist, dtype=np.int64)
    if counts.shape != (HIST_BINS,):
        raise ValueError(f"a histogram has {HIST_BINS} bins, got shape {counts.shape}")
    total = int(counts.sum())
    if total == 0:
        return WhatIf(0.0, 0.0, 0.0)
    e = bin_exponents(scale_log2)
    # A binade [2^e, 2^(e+1)) flushes entirely when its upper edge is <= min_subnormal/2.
    flush = e <= fmt.min_subnormal_exp - 2
    subnormal = (e >= fmt.min_subnormal_exp - 1) & (e <= fmt.min_normal_exp - 1)
    overflow = e >= fmt.max_binade + 1
    return WhatIf(
        flush=int(counts[flush].sum()) / total,
        subnormal=int(counts[subnormal].sum()) / total,
        overflow=int(counts[overflow].sum()) / total,
    )


def update_lost(hist: npt.ArrayLike, fmt: Format) -> float:
    """Fraction of nonzero relative updates that weights stored in ``fmt`` would not register.

    ``hist`` is the histogram of r = Δw / 2^floor(log2|w|) (the update in units of the weight's binade);
    half an ulp of w is 2^-(mantissa_bits+1) in those units, so an update is lost when |r| < 2^-(m+1)
    (ties, which round to even, count as kept). 0.0 when there are no nonzero updates.
    """
    counts = np.asarray(hist, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return 0.0
    lost = bin_exponents() <= -(fmt.mantissa_bits + 1) - 1
    return int(counts[lost].sum()) / total


def binade_percentile(hist: npt.ArrayLike, q: float) -> int | None:
    """``floor(log2|x|)`` of the ``q``-quantile (0..1) of the nonzero finite values in ``hist``; None if empty."""
    counts = np.asarray(hist, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return None
    cum = np.cumsum(counts)
    index = int(np.searchsorted(cum, max(1, math.ceil(q * total))))
    return HIST_MIN_EXP + index


def hist_from_values(values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The binade histogram of an array's nonzero finite values, computed on the host (reference/renderers)."""
    x = np.abs(np.asarray(values, dtype=np.float64).ravel())
    x = x[np.isfinite(x) & (x != 0)]
    exps = np.frexp(x)[1].astype(np.int64) - 1  # frexp: x = m * 2**e with m in [0.5, 1)
    index = np.clip(exps - HIST_MIN_EXP, 0, HIST_BINS - 1)
    return np.bincount(index, minlength=HIST_BINS).astype(np.int64)
