"""Flags: the right layer, arm, kind and severity, with the numbers and a concrete recommendation."""

from __future__ import annotations

import json
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import Scale
from mpaudit.arms import ARMS
from mpaudit.errors import UsageError
from mpaudit.numerics.layerstats import TensorStats, TraceSummary
from mpaudit.numerics.rules import Thresholds, flag
from mpaudit.results.codec import dumps_plain, from_plain
from mpaudit.results.model import ArmResult, Flag, LossScale
from mpaudit.run.precision import make_scaler
from mpaudit.run.step import train_step
from mpaudit.run.task import Task
from mpaudit.trace.tracer import Tracer, TraceSchedule

ARM_NAMES = ("fp32", "bf16", "fp16")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _overflowing() -> nn.Module:
    """Fine in fp32 and bf16; ``blocks.1.amp`` pushes activations past fp16's max, ``down`` brings them back."""

    def block(factor: float) -> nn.Module:
        return nn.Sequential(OrderedDict(fc=nn.Linear(16, 16), amp=Scale(factor), act=nn.ReLU()))

    return nn.Sequential(
        OrderedDict(
            inp=nn.Linear(8, 16),
            blocks=nn.Sequential(block(1.0), block(1e6)),
            down=Scale(1e-6),
            head=nn.Linear(16, 3),
        )
    )


def _task(loss_factor: float) -> Task:
    module = types.ModuleType("rules_task")

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y) * loss_factor

    module.loss_fn = loss_fn  # type: ignore[attr-defined]
    return Task(path=Path("rules_task.py"), sha256="", module=module)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def _run_arm(
    name: str, build: Callable[[], nn.Module], loss_factor: float, steps: int
) -> tuple[ArmResult, TraceSummary]:
    """Train one arm with ``train_step`` under a tracer on every step, as the training loop does."""
    arm, task = ARMS[name], _task(loss_factor)
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = make_scaler(arm, "cpu")
    schedule, tracer = TraceSchedule(every=1), Tracer(model)
    losses: list[float] = []
    scales: list[float] = []
    skipped: list[int] = []
    batches = _batches()
    with tracer:
        for step in range(steps):
            scale = scaler.get_scale() if scaler is not None else None
            if schedule.wants(step):
                tracer.start_step(step, scale)
            loss = train_step(
                task,
                arm,
                model,
                optimizer,
                scaler,
                batches[step % len(batches)],
                "cpu",
                after_backward=tracer.after_backward,
                after_step=tracer.after_optimizer_step,
            )
            tracer.finish_step()
            losses.append(float(loss))
            if scaler is not None and scale is not None:
                scales.append(scale)
                if scaler.get_scale() < scale:
                    skipped.append(step)
    result = ArmResult(
        name=name,
        status="ok",
        loss=losses,
        metrics={},
        steps=steps,
        train_s=0.0,
        loss_scale=LossScale(history=scales, skipped_steps=skipped) if scaler is not None else None,
    )
    return result, tracer.summary()


def _audit(build: Callable[[], nn.Module], loss_factor: float = 1.0, steps: int = 4) -> tuple[list[Flag], dict]:
    runs = {name: _run_arm(name, build, loss_factor, steps) for name in ARM_NAMES}
    summaries = {name: s for name, (_, s) in runs.items()}
    flags = flag(summaries, {name: r for name, (r, _) in runs.items()}, Thresholds())
    return flags, summaries


def _errors(flags: list[Flag], arm: str | None = None) -> list[Flag]:
    return [f for f in flags if f.severity == "error" and (arm is None or f.arm == arm)]


def test_tiny_loss_underflows_gradients_in_fp16_and_the_flag_says_how_to_scale() -> None:
    flags, _ = _audit(_mlp, loss_factor=1e-12)
    underflow = [f for f in flags if f.arm == "fp16" and f.kind == "gradient_underflow" and f.severity == "error"]
    assert underflow, flags
    assert all(f.evidence["predicted_flush_fraction"] > 0.5 for f in underflow)
    assert all(f.evidence["observed_excess_zero_fraction"] > 0.5 for f in underflow)
    assert any("init_scale to 2^" in f.recommendation for f in underflow)

    scale = [f for f in flags if f.arm == "fp16" and f.kind == "loss_scale" and f.severity == "error"]
    assert len(scale) == 1
    k = scale[0].evidence["recommended_log2"]
    assert k > 16  # above GradScaler's default 2^16, which is what flushed
    assert f"init_scale to 2^{k}" in scale[0].recommendation
    # the recommended scale lifts the 1st-percentile gradient clear of 2^-24 and keeps the max below 65504
    assert scale[0].evidence["significant_binade"] + k >= -24
    assert scale[0].evidence["gradient_max_abs"] * 2.0**k < 65504

    assert not [f for f in flags if f.arm == "bf16" and f.kind.endswith("underflow") and "update" not in f.kind]
    assert not _errors(flags, "bf16") and not _errors(flags, "fp32")
    # flags go into report.json as they are
    back = from_plain(list[Flag], json.loads(dumps_plain(flags)))
    assert back == flags


def test_clean_model_raises_no_error_flag() -> None:
    flags, summaries = _audit(_mlp, loss_factor=1.0, steps=6)
    assert not _errors(flags), [(f.arm, f.layer, f.kind, f.rule, f.evidence) for f in _errors(flags)]
    assert all(s.steps == (0, 1, 2, 3, 4, 5) for s in summaries.values())


def test_activation_overflow_names_the_layer_by_module_path() -> None:
    flags, summaries = _audit(_overflowing, steps=3)
    overflow = [f for f in flags if f.kind == "forward_overflow" and f.severity == "error"]
    assert [f.arm for f in overflow] == ["fp16"] * len(overflow)
    amp = [f for f in overflow if f.layer == "blocks.1.amp"]
    assert len(amp) == 1
    assert "`blocks.1.amp`" in amp[0].recommendation and "fp32" in amp[0].recommendation
    assert amp[0].evidence["fp32_max_abs"] > 65504
    assert not [f for f in overflow if f.layer.startswith(("inp", "blocks.0", "down", "head"))]

    # the fp16 arm's first non-finite output is that layer; the earlier ones stayed finite
    site = summaries["fp16"].first_nonfinite_forward
    assert site is not None and site.layer == "blocks.1.amp" and site.step == 0
    assert summaries["fp32"].first_nonfinite_forward is None
    # every fp16 step was skipped: GradScaler cannot fix a forward overflow, and the flags say so
    assert any(f.kind == "loss_scale" and f.arm == "fp16" and f.severity == "error" for f in flags)
    assert not _errors(flags, "fp32") and not _errors(flags, "bf16")


# ----------------------------------------------------------------------------- synthetic traces


def _summary(stats: dict[tuple[str, str], np.ndarray], scale: float | None = None) -> TraceSummary:
    return TraceSummary(
        stats={key: TensorStats.from_array(v) for key, v in stats.items()},
        steps=(0,),
        loss_scales=(scale,),
        layers=tuple(dict.fromkeys(layer for layer, _ in stats)),
    )


def _arm(name: str, steps: int = 100, skipped: list[int] | None = None) -> ArmResult:
    scaler = name == "fp16"
    return ArmResult(
        name=name,
        status="ok",
        loss=[1.0] * steps,
        metrics={},
        steps=steps,
        train_s=1.0,
        loss_scale=LossScale([65536.0] * steps, skipped or []) if scaler else None,
    )


def _grads(scale: float, n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n) * scale


def test_a_prediction_without_observed_flushing_is_only_a_warning() -> None:
    tiny = _grads(1e-13)  # flushes at fp16's default scale 2^16 ...
    summaries = {
        "fp32": _summary({("fc", "grad:weight"): tiny}),
        # ... but the fp16 arm shows no excess zeros (say autocast kept this layer in fp32)
        "fp16": _summary({("fc", "grad:weight"): tiny * 65536}, scale=65536.0),
    }
    flags = flag(summaries, {"fp32": _arm("fp32"), "fp16": _arm("fp16")})
    under = [f for f in flags if f.kind == "gradient_underflow"]
    assert [(f.arm, f.layer, f.severity) for f in under] == [("fp16", "fc", "warning")]
    assert under[0].evidence["predicted_flush_fraction"] > 0.9


def test_flushing_rounding_noise_is_not_an_error() -> None:
    # a bias feeding a normalisation has zero gradient in exact arithmetic; fp32 computes noise of ~1e-14,
    # far below the model's 1st-percentile gradient, which flushes in fp16 without hurting anything
    summaries = {
        "fp32": _summary({("fc", "grad:weight"): _grads(1e-3), ("bias", "grad:bias"): _grads(1e-14, n=5)}),
        "fp16": _summary(
            {("fc", "grad:weight"): _grads(1e-3) * 65536, ("bias", "grad:bias"): np.zeros(5)}, scale=65536.0
        ),
    }
    flags = flag(summaries, {"fp32": _arm("fp32"), "fp16": _arm("fp16")})
    under = [f for f in flags if f.kind == "gradient_underflow"]
    assert [(f.layer, f.severity) for f in under] == [("bias", "warning")]
    assert under[0].evidence["predicted_flush_fraction"] == 1.0
    assert under[0].evidence["significant_flush_fraction"] == 0.0
    assert not [f for f in flags if f.kind == "loss_scale"]  # the scale in force is right for the model


def test_bf16_gets_no_underflow_flag_for_gradients_fp32_represents() -> None:
    tiny = _grads(1e-30)
    flushed = tiny.copy()
    flushed[::2] = 0.0  # even with zeros appearing in the bf16 arm
    summaries = {"fp32": _summary({("fc", "grad:weight"): tiny}), "bf16": _summary({("fc", "grad:weight"): flushed})}
    flags = flag(summaries, {"fp32": _arm("fp32"), "bf16": _arm("bf16")})
    assert not [f for f in flags if f.arm == "bf16" and "underflow" in f.kind]


def test_thresholds_override_by_name() -> None:
    tiny = _grads(1e-13)
    flushed = np.zeros_like(tiny)
    summaries = {
        "fp32": _summary({("fc", "grad:weight"): tiny}),
        "fp16": _summary({("fc", "grad:weight"): flushed}, scale=65536.0),
    }
    arms = {"fp32": _arm("fp32"), "fp16": _arm("fp16")}
    default = [f for f in flag(summaries, arms) if f.kind == "gradient_underflow"]
    assert default[0].severity == "error" and default[0].evidence["error_at"] == 0.01
    lenient = Thresholds.from_mapping({"gradient_underflow_error": "1.5", "gradient_underflow_warning": 1.2})
    assert lenient.gradient_underflow_error == 1.5
    assert not [f for f in flag(summaries, arms, lenient) if f.kind == "gradient_underflow"]

    with pytest.raises(UsageError, match="Unknown threshold 'gradient_underflow'"):
        Thresholds.from_mapping({"gradient_underflow": 0.1})
    with pytest.raises(UsageError, match="must be a number"):
        Thresholds.from_mapping({"skip_fraction_error": "lots"})


def test_loss_scale_skips_after_calibration() -> None:
    summaries: dict[str, TraceSummary] = {"fp16": _summary({("fc", "activation"): _grads(1.0)}, 65536.0)}
    calibration_only = flag(summaries, {"fp16": _arm("fp16", 100, skipped=[0, 1, 2, 3])})
    assert not [f for f in calibration_only if f.kind == "loss_scale"]
    some = flag(summaries, {"fp16": _arm("fp16", 100, skipped=[0, 1, *range(10, 100, 10)])})
    assert [(f.kind, f.severity, f.evidence["calibration_skips"]) for f in some if f.kind == "loss_scale"] == [
        ("loss_scale", "warning", 2)
    ]
    every = flag(summaries, {"fp16": _arm("fp16", 20, skipped=list(range(20)))})
    assert [f.severity for f in every if f.kind == "loss_scale"] == ["error"]


def _updates(lost: float, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Relative updates r (Δw in units of the weight's binade): a share ``lost`` of them about 2^-10, below bf16's
    half ulp (2^-8) but above fp16's (2^-11); the rest about 2^-4."""
    rng = np.random.default_rng(seed)
    small = rng.random(n) < lost
    return np.where(small, 2.0 ** rng.uniform(-10, -9.5, n), 2.0 ** rng.uniform(-4, -3, n))


def _measured(r: np.ndarray, fmt_half_ulp_exp: int = -8) -> np.ndarray:
    """What a half-weight arm records for those updates: the ones below half an ulp left the weight unchanged."""
    return np.where(r < 2.0**fmt_half_ulp_exp, 0.0, r)


def test_update_underflow_is_measured_in_half_weight_arms_only() -> None:
    r = _updates(0.8)
    summaries = {
        "fp32": _summary({("fc", "update:weight"): r, ("head", "update:weight"): _updates(0.05, seed=1)}),
        "bf16": _summary({("fc", "update:weight"): r}),  # fp32 master weights: the same updates land
        "bf16-pure": _summary({("fc", "update:weight"): _measured(r),
                               ("head", "update:weight"): _measured(_updates(0.05, seed=1))}),
    }
    arms = {name: _arm(name) for name in summaries}
    # without half-weight arms named, nobody loses updates: the numbers stay in the layers table, no flag
    assert not [f for f in flag(summaries, arms) if f.kind == "update_underflow"]
    flags = flag(summaries, arms, half_weights=frozenset({"bf16-pure"}))
    updates = [(f.arm, f.layer, f.severity) for f in flags if f.kind == "update_underflow"]
    assert updates == [("bf16-pure", "fc", "error"), ("bf16-pure", "head", "info")]
    fc = next(f for f in flags if f.kind == "update_underflow" and f.layer == "fc")
    ev = fc.evidence
    assert ev["measured_lost_fraction"] == pytest.approx(0.8, abs=0.03)
    assert ev["predicted_lost_fraction"] == pytest.approx(ev["measured_lost_fraction"], abs=1e-9)
    assert ev["unchanged_fraction"] == ev["measured_lost_fraction"]  # fp32's updates are never exactly zero here
    assert ev["format"] == "bf16" and ev["updates_sampled"] == 1000 and ev["error_at"] == Thresholds().update_lost_error
    assert "`fc`" in fc.recommendation and "stochastically" in fc.recommendation and "fp32 master" in fc.recommendation
    assert fc.caused_by is None


def test_update_underflow_counts_only_zeros_beyond_fp32s_and_follows_its_thresholds() -> None:
    r = _updates(0.3)
    r[:500] = 0.0  # half of the updates are exactly zero in fp32 too (no gradient, no decay): not lost
    summaries = {"fp32": _summary({("fc", "update:weight"): r}),
                 "bf16-pure": _summary({("fc", "update:weight"): _measured(r)})}
    arms = {name: _arm(name) for name in summaries}
    (f,) = [f for f in flag(summaries, arms, half_weights=frozenset({"bf16-pure"})) if f.kind == "update_underflow"]
    assert f.evidence["unchanged_fraction"] == pytest.approx(0.5 + 0.5 * 0.3, abs=0.04)
    assert f.evidence["measured_lost_fraction"] == pytest.approx(0.3, abs=0.04)
    assert f.severity == "warning"  # between update_lost_warning (0.1) and update_lost_error (0.5)
    strict = Thresholds.from_mapping({"update_lost_error": 0.2})
    (f,) = [f for f in flag(summaries, arms, strict, frozenset({"bf16-pure"})) if f.kind == "update_underflow"]
    assert f.severity == "error"
    # without an fp32 trace the raw share of unchanged weights is the measurement, and nothing is predicted
    alone = flag({"bf16-pure": summaries["bf16-pure"]}, arms, half_weights=frozenset({"bf16-pure"}))
    (f,) = [f for f in alone if f.kind == "update_underflow"]
    assert f.evidence["predicted_lost_fraction"] is None and f.evidence["measured_lost_fraction"] > 0.6


def test_gradients_beyond_fp16_range_before_scaling() -> None:
    summaries = {
        "fp32": _summary({("head", "grad:weight"): _grads(1e5)}),
        "fp16": _summary({("head", "grad:weight"): _grads(1e5)}, scale=1.0),
    }
    flags = flag(summaries, {"fp32": _arm("fp32"), "fp16": _arm("fp16")})
    over = [f for f in flags if f.kind == "gradient_overflow"]
    assert [(f.arm, f.layer) for f in over] == [("fp16", "head")]
    assert over[0].evidence["fp32_max_abs"] > 65504 and "`head`" in over[0].recommendation


def _noisy_attention() -> tuple[dict[str, TraceSummary], dict[str, ArmResult]]:
    """Gradients ~2^-16, plus rounding noise ~2^-30 below them that flushes in fp16 at 2^16: a key bias beside
    its layer's real gradients and the first query's slice of a fused qkv output gradient, both zero in exact
    arithmetic."""
    signal = _grads(2.0**-16)
    qkv_out = signal.copy()
    qkv_out[:20] = _grads(2.0**-46, n=20)
    fp32 = {
        ("attn.key", "grad_output"): signal,
        ("attn.key", "grad:weight"): _grads(2.0**-16, seed=1),
        ("attn.key", "grad:bias"): _grads(2.0**-46, n=64),
        ("attn.qkv", "grad_output"): qkv_out,
    }
    fp16 = {key: v * 65536 for key, v in fp32.items()}
    fp16[("attn.key", "grad:bias")] = np.zeros(64)
    fp16[("attn.qkv", "grad_output")][:20] = 0.0
    summaries = {"fp32": _summary(fp32), "fp16": _summary(fp16, scale=65536.0)}
    return summaries, {"fp32": _arm("fp32"), "fp16": _arm("fp16")}


def test_flushing_rounding_noise_below_its_layers_gradients_is_not_flagged() -> None:
    summaries, arms = _noisy_attention()
    flags = flag(summaries, arms)
    assert not [f for f in flags if f.kind in ("gradient_underflow", "precision_loss", "loss_scale")], flags

    # with the noise floor off, the same trace flags both layers (the noise is 2.7% of all gradient values,
    # so even the 1st-percentile "significant" cut keeps it, and the fp16 arm's zeros confirm it)
    off = Thresholds.from_mapping({"noise_grad_ratio": 0})
    assert off.noise_grad_ratio == 0.0 and Thresholds().noise_grad_ratio == 2.0**-20
    under = [f for f in flag(summaries, arms, off) if f.kind == "gradient_underflow"]
    assert {(f.layer, f.evidence["role"], f.severity) for f in under} == {
        ("attn.key", "grad:bias", "error"),
        ("attn.qkv", "grad_output", "error"),
    }


def test_a_layer_whose_gradients_are_all_small_is_still_flagged() -> None:
    # the noise floor is per layer: a layer 2^-30 below the rest of the model is not noise (Adam learns from it)
    summaries = {
        "fp32": _summary({("big", "grad:weight"): _grads(2.0**-16), ("small", "grad:weight"): _grads(2.0**-46)}),
        "fp16": _summary(
            {("big", "grad:weight"): _grads(2.0**-16) * 65536, ("small", "grad:weight"): np.zeros(1000)},
            scale=65536.0,
        ),
    }
    flags = flag(summaries, {"fp32": _arm("fp32"), "fp16": _arm("fp16")})
    under = [f for f in flags if f.kind == "gradient_underflow"]
    assert [(f.layer, f.severity) for f in under] == [("small", "error")]
    assert under[0].evidence["noise_binade"] < -46 - 2
