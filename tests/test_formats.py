"""Format constants match torch, and histogram what-ifs match a direct computation and real casts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpaudit.numerics.formats import (
    BF16,
    E4M3,
    E5M2,
    FORMATS,
    FP16,
    HIST_BINS,
    HIST_MAX_EXP,
    HIST_MIN_EXP,
    Format,
    binade_percentile,
    hist_from_values,
    update_lost,
    what_if,
)

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("name", list(FORMATS))
def test_constants_match_torch(name: str) -> None:
    fmt, dtype = FORMATS[name], TORCH_DTYPES[name]
    info = torch.finfo(dtype)
    assert fmt.max == info.max
    assert fmt.min_normal == info.smallest_normal
    assert fmt.mantissa_bits == -math.log2(info.eps)
    # the min subnormal is representable, half of it (the tie) rounds to zero, a bit more rounds up to it
    sub = torch.tensor([fmt.min_subnormal, fmt.min_subnormal / 2, fmt.min_subnormal * 0.51], dtype=torch.float64)
    assert sub.to(dtype).to(torch.float64).tolist() == [fmt.min_subnormal, 0.0, fmt.min_subnormal]
    assert fmt.source


def test_documented_binades() -> None:
    assert (FP16.max_binade, FP16.min_subnormal_exp, FP16.min_normal_exp) == (15, -24, -14)
    assert (BF16.max_binade, BF16.min_subnormal_exp, BF16.min_normal_exp) == (127, -133, -126)
    assert (E4M3.max_binade, E5M2.max_binade) == (8, 15)
    assert HIST_BINS == HIST_MAX_EXP - HIST_MIN_EXP


def _direct(values: np.ndarray, fmt: Format, scale_log2: int) -> tuple[float, float, float]:
    """The documented convention computed value by value: y = |x| * 2^k."""
    y = np.abs(values) * 2.0**scale_log2
    n = len(y)
    flush = np.sum(y < fmt.min_subnormal / 2) / n
    subnormal = np.sum((y >= fmt.min_subnormal / 2) & (y < fmt.min_normal)) / n
    overflow = np.sum(y >= 2.0 ** (fmt.max_binade + 1)) / n
    return float(flush), float(subnormal), float(overflow)


# Magnitudes spread over the histogram's range: a random binade and a random mantissa in [1, 2).
magnitudes = st.lists(
    st.tuples(st.integers(HIST_MIN_EXP, HIST_MAX_EXP - 1), st.floats(1.0, 2.0, exclude_max=True)).map(
        lambda p: math.ldexp(p[1], p[0])
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(magnitudes, st.integers(-40, 40), st.sampled_from(list(FORMATS)), st.booleans())
def test_what_if_equals_direct_computation(values: list[float], k: int, name: str, negate: bool) -> None:
    x = np.array(values) * (-1 if negate else 1)
    got = what_if(hist_from_values(x), FORMATS[name], k)
    assert (got.flush, got.subnormal, got.overflow) == pytest.approx(_direct(x, FORMATS[name], k), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(magnitudes, st.integers(-30, 30), st.sampled_from(["fp16", "e4m3", "e5m2"]))
def test_what_if_agrees_with_a_real_cast(values: list[float], k: int, name: str) -> None:
    fmt = FORMATS[name]
    y = np.array(values) * 2.0**k
    # Leave out values where rounding (not the binade) decides: near half the min subnormal, within half a
    # subnormal step below min normal (those round up to it), and the documented blind spot between max
    # and the next power of two.
    away = np.abs(y / fmt.flush_below - 1) > 0.01
    away &= np.abs(y / fmt.min_normal - 1) > 2.0**-fmt.mantissa_bits
    away &= (y < fmt.max * 0.99) | (y >= 2.0 ** (fmt.max_binade + 1))
    y = y[away & (y < 1e30)]
    if y.size == 0:
        return
    cast = torch.tensor(y, dtype=torch.float64).to(TORCH_DTYPES[name]).to(torch.float64)
    got = what_if(hist_from_values(y), fmt)
    assert got.flush == pytest.approx((cast == 0).double().mean().item(), abs=1e-12)
    if name != "e4m3":  # torch saturates e4m3fn casts at 448 instead of producing NaN
        assert got.overflow == pytest.approx((~torch.isfinite(cast)).double().mean().item(), abs=1e-12)
    subnormal = (cast != 0) & (cast.abs() < fmt.min_normal)
    assert got.subnormal == pytest.approx(subnormal.double().mean().item(), abs=1e-12)


def test_fp16_max_binade_convention_and_exact_check() -> None:
    # 65504 < 65530 < 2^16: inside fp16's top binade, so the histogram does not call it overflow ...
    h = hist_from_values([65530.0])
    assert what_if(h, FP16).overflow == 0.0
    # ... but it does overflow, which only the exact max_abs check sees; 2^16 is past the binade edge.
    assert torch.tensor(65530.0).half().isinf()
    assert what_if(hist_from_values([65536.0]), FP16).overflow == 1.0


def test_power_of_two_scale_is_a_histogram_shift() -> None:
    x = np.array([1e-9, 3e-7, 2e-3, 5.0, 4e4])
    for k in (-8, 0, 10, 16):
        assert what_if(hist_from_values(x), FP16, k) == what_if(hist_from_values(x * 2.0**k), FP16)


def test_empty_histogram_is_all_zero_fractions() -> None:
    assert what_if(np.zeros(HIST_BINS, dtype=np.int64), FP16) == what_if(hist_from_values([0.0, np.nan]), BF16)
    assert what_if(np.zeros(HIST_BINS, dtype=np.int64), FP16).flush == 0.0
    with pytest.raises(ValueError):
        what_if(np.zeros(7), FP16)


def test_hist_clamps_the_edges_and_skips_zeros_and_nonfinite() -> None:
    h = hist_from_values([0.0, -0.0, np.inf, np.nan, 1e-15, 2.0**-70, 1.0, -1.5, 2.0**70])
    assert h.sum() == 5
    assert h[0] == 1  # 2^-70 clamps into the first bin
    assert h[-1] == 1  # 2^70 clamps into the last
    assert h[0 - HIST_MIN_EXP] == 2  # 1.0 and -1.5 share the binade [1, 2)
    assert h[math.floor(math.log2(1e-15)) - HIST_MIN_EXP] == 1


def test_binade_percentile() -> None:
    x = [2.0**-30] * 1 + [2.0**-10] * 98 + [2.0**5]
    assert binade_percentile(hist_from_values(x), 0.01) == -30
    assert binade_percentile(hist_from_values(x), 0.5) == -10
    assert binade_percentile(hist_from_values(x), 1.0) == 5
    assert binade_percentile(np.zeros(HIST_BINS, dtype=np.int64), 0.01) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-10, 10), st.integers(1, 127), st.floats(-60, -1)), min_size=1, max_size=50),
    st.sampled_from(["fp16", "bf16"]),
)
def test_update_lost_agrees_with_weights_stored_in_half(cases: list[tuple[int, int, float]], name: str) -> None:
    fmt, dtype = FORMATS[name], TORCH_DTYPES[name]
    # weights exactly representable in the format, not powers of two (where the ulp below is smaller)
    w = np.array([math.ldexp(1 + m / 128, e) for e, m, _ in cases])
    # updates 2^(e_w + d) for a real d, kept 2% away from the half-ulp edge 2^(e_w - m - 1)
    e_w = np.floor(np.log2(w))
    d = np.array([r for _, _, r in cases]) / 4
    d = np.where(np.abs(d + fmt.mantissa_bits + 1) < 0.03, d + 0.1, d)
    delta = -(2.0 ** (e_w + d))
    r = delta / 2.0**e_w
    stored = torch.tensor(w).to(dtype)
    lost = (stored.double() + torch.tensor(delta)).to(dtype) == stored
    assert update_lost(hist_from_values(r), fmt) == pytest.approx(lost.double().mean().item(), abs=1e-12)
