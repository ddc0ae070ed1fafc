"""The host-side statistics model: merging, JSON round trips through the result writer, the per-layer frame."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mpaudit.numerics.formats import FORMATS, HIST_MIN_EXP, update_lost, what_if
from mpaudit.numerics.layerstats import NonfiniteSite, TensorStats, TraceSummary

RNG = np.random.default_rng(0)


def _values(n: int, scale: float) -> np.ndarray:
    x = RNG.standard_normal(n) * scale
    x[::5] = 0.0
    return x


def test_from_array_counts_what_a_person_would_count() -> None:
    s = TensorStats.from_array([0.0, -0.0, 1.5, -3.0, np.nan, np.inf, -np.inf, -np.inf, 1e-3])
    assert (s.count, s.zeros, s.nan, s.posinf, s.neginf) == (9, 2, 1, 1, 2)
    assert s.nonfinite == 4 and s.finite_nonzero == 3
    assert (s.max_abs, s.min_nonzero_abs) == (3.0, 1e-3)
    assert s.sum_abs == pytest.approx(4.501)
    assert s.mean_abs == pytest.approx(4.501 / 5)
    assert s.zero_fraction == pytest.approx(2 / 9)
    assert s.hist[0 - HIST_MIN_EXP] == 1 and s.hist[1 - HIST_MIN_EXP] == 1


def test_empty_record_has_no_nonzero_value() -> None:
    s = TensorStats.from_array([0.0, np.nan])
    assert (s.max_abs, s.min_nonzero_abs, s.finite_nonzero) == (0.0, math.inf, 0)
    assert math.isnan(TensorStats().mean_abs)


def test_merge_equals_stats_of_the_concatenation() -> None:
    a, b = _values(500, 1e-3), _values(300, 50.0)
    b[7] = np.nan
    merged = TensorStats.from_array(a, "float32").merge(TensorStats.from_array(b, "float16"))
    whole = TensorStats.from_array(np.concatenate([a, b]))
    assert (merged.count, merged.zeros, merged.nan, merged.max_abs, merged.min_nonzero_abs) == (
        whole.count,
        whole.zeros,
        whole.nan,
        whole.max_abs,
        whole.min_nonzero_abs,
    )
    assert merged.sum_abs == pytest.approx(whole.sum_abs)
    assert np.array_equal(merged.hist, whole.hist)
    assert merged.dtype == "float16,float32"


def test_unmeasured_extremes_stay_unmeasured_whatever_the_merge_order() -> None:
    measured = TensorStats.from_array([1.0, 2.0])
    update = TensorStats(count=2, zeros=0, max_abs=math.nan, min_nonzero_abs=math.nan, sum_abs=math.nan)
    for m in (measured.merge(update), update.merge(measured)):
        assert math.isnan(m.max_abs) and math.isnan(m.min_nonzero_abs) and math.isnan(m.sum_abs)


def _summary() -> TraceSummary:
    step0 = TraceSummary(
        stats={
            ("fc1", "activation"): TensorStats.from_array(_values(64, 1.0), "float16"),
            ("fc1", "grad:weight"): TensorStats.from_array(_values(64, 1e-8), "float32"),
            ("fc1", "update:weight"): TensorStats.from_array(2.0 ** RNG.uniform(-14, -4, 64), "float32"),
            ("act", "activation"): TensorStats.from_array(np.array([np.inf, 1.0]), "float16"),
        },
        steps=(0,),
        loss_scales=(65536.0,),
        layers=("fc1", "act"),
        first_nonfinite_forward=NonfiniteSite("act", "activation", 0),
    )
    step5 = TraceSummary(
        stats={("fc1", "activation"): TensorStats.from_array(_values(64, 2.0), "float16")},
        steps=(5,),
        loss_scales=(32768.0,),
        layers=("fc1", "head"),
        first_nonfinite_backward=NonfiniteSite("head", "grad_output", 5),
    )
    return step0.merge(step5)


def test_summary_merge_keeps_steps_order_and_first_sites() -> None:
    s = _summary()
    assert s.steps == (0, 5) and s.loss_scales == (65536.0, 32768.0)
    assert s.layers == ("fc1", "act", "head")
    assert s.get("fc1", "activation").count == 128
    assert s.first_nonfinite_forward == NonfiniteSite("act", "activation", 0)
    assert s.first_nonfinite_backward == NonfiniteSite("head", "grad_output", 5)
    later = TraceSummary(steps=(9,), first_nonfinite_forward=NonfiniteSite("fc1", "activation", 9))
    assert s.merge(later).first_nonfinite_forward.step == 0  # the earliest step wins
    assert s.roles("fc1") == ["activation", "grad:weight", "update:weight"]
    assert s.scale_log2 == 15  # floor(log2(median(65536, 32768)))
    assert TraceSummary.merge_all([]) == TraceSummary()


def test_json_round_trip_through_the_result_writer() -> None:
    s = _summary()
    text = json.dumps(s.to_dict(), allow_nan=False)
    back = TraceSummary.from_dict(json.loads(text))
    assert back == s
    # histograms are stored trimmed to their nonzero span
    assert all(len(r["hist"]) < 40 for r in json.loads(text)["stats"])


def test_frame_has_a_row_per_layer_and_role_with_what_ifs_for_every_format() -> None:
    s = _summary()
    df = s.to_frame()
    assert list(zip(df.layer, df.role, strict=True)) == [
        ("fc1", "activation"),
        ("fc1", "grad:weight"),
        ("fc1", "update:weight"),
        ("act", "activation"),
    ]
    for name in FORMATS:
        for kind in ("flush", "subnormal", "overflow", "update_lost"):
            assert f"{name}_{kind}" in df.columns
    grad = df.set_index(["layer", "role"]).loc[("fc1", "grad:weight")]
    expected = what_if(s.get("fc1", "grad:weight").hist, FORMATS["fp16"])
    assert grad["fp16_flush"] == expected.flush and grad["fp16_subnormal"] == expected.subnormal
    assert grad["fp16_flush"] > 0.1  # gradients of ~1e-8 flush without a loss scale
    upd = df.set_index(["layer", "role"]).loc[("fc1", "update:weight")]
    assert math.isnan(upd["fp16_flush"])
    assert upd["bf16_update_lost"] == update_lost(s.get("fc1", "update:weight").hist, FORMATS["bf16"])
    assert df.set_index(["layer", "role"]).loc[("act", "activation")]["posinf"] == 1


def test_frame_can_ask_about_gradients_at_another_scale() -> None:
    s = _summary()
    unscaled = s.to_frame().set_index(["layer", "role"])
    scaled = s.to_frame(grad_scale_log2=16).set_index(["layer", "role"])
    assert scaled.loc[("fc1", "grad:weight")]["fp16_flush"] < unscaled.loc[("fc1", "grad:weight")]["fp16_flush"]
    assert scaled.loc[("fc1", "activation")]["fp16_flush"] == unscaled.loc[("fc1", "activation")]["fp16_flush"]
    expected = what_if(s.get("fc1", "grad:weight").hist, FORMATS["fp16"], 16)
    assert scaled.loc[("fc1", "grad:weight")]["fp16_flush"] == expected.flush
