"""The speed phase: interleaved rounds, the stopping rule, paired bootstrap speedups, FLOP counts."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mpaudit.arms import ARMS, Arm
from mpaudit.perf.speed import (
    CPU_VECTOR_RATIO,
    FLOOR_ROUNDS,
    WARMUP_ROUNDS,
    bootstrap_speedup,
    gpu_peak,
    measure_speed,
    theoretical_ratio,
)
from mpaudit.results.perf import STABLE_IQR_FRACTION, SpeedResult, Speedup
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import Task, load_task

CPU = torch.device("cpu")
BATCH, D_IN, D_HIDDEN, D_OUT = 8, 16, 32, 4

TASK = f"""
import torch
from torch import nn

class Clock:
    \"\"\"A scripted clock: time passes only when a step says so (no sleeping, no load sensitivity).\"\"\"
    now = 0.0

    def __call__(self):
        return self.now

CLOCK = Clock()
DELAY = {{}}  # scripted seconds per step, by precision (a number, or a function returning one)
LOG = []  # the precision of every step, in order
FAIL = set()  # precisions whose step raises

def build_model():
    return nn.Sequential(nn.Linear({D_IN}, {D_HIDDEN}), nn.ReLU(), nn.Linear({D_HIDDEN}, {D_OUT}))

def train_loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn({BATCH}, {D_IN}, generator=g), torch.randint(0, {D_OUT}, ({BATCH},), generator=g))]

def loss_fn(model, batch):
    name = "fp32"
    if torch.is_autocast_enabled("cpu"):
        name = {{torch.bfloat16: "bf16", torch.float16: "fp16"}}[torch.get_autocast_dtype("cpu")]
    LOG.append(name)
    if name in FAIL:
        raise RuntimeError(f"no {{name}} here")
    delay = DELAY.get(name, 0.001)
    CLOCK.now += delay() if callable(delay) else delay
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
"""


@pytest.fixture
def task(tmp_path: Path) -> Task:
    path = tmp_path / "model.py"
    path.write_text(TASK)
    return load_task(path)


def _arms(*names: str) -> list[Arm]:
    return [ARMS[n] for n in names]


def speed(task: Task, names: tuple[str, ...], **kwargs: Any) -> tuple[dict[str, SpeedResult], dict[str, Speedup]]:
    """``measure_speed`` on the CPU with the task's scripted clock."""
    return measure_speed(RunContext(task, CPU), _arms(*names), 0, timer=task.module.CLOCK, **kwargs)


def test_arms_take_turns_a_b_c_from_warm_up_to_the_last_round(task: Task) -> None:
    task.module.DELAY.update(fp32=0.01, bf16=0.01, fp16=0.01)
    results, _ = speed(task, ("fp32", "bf16", "fp16"), budget_s=0.3)
    log = task.module.LOG
    rounds = len(log) // 3
    assert log == ["fp32", "bf16", "fp16"] * rounds
    assert rounds == WARMUP_ROUNDS + results["fp32"].steps_timed
    assert {r.steps_timed for r in results.values()} == {rounds - WARMUP_ROUNDS}  # paired rounds


def test_an_exhausted_budget_still_times_the_floor_rounds(task: Task) -> None:
    task.module.DELAY.update(fp32=0.01, bf16=0.01)
    results, speedups = speed(task, ("fp32", "bf16"), budget_s=0.0)
    assert [r.steps_timed for r in results.values()] == [FLOOR_ROUNDS, FLOOR_ROUNDS]
    assert speedups["bf16"].rounds == FLOOR_ROUNDS


def test_stable_arms_stop_early(task: Task) -> None:
    task.module.DELAY.update(fp32=0.15, bf16=0.15)
    steady, _ = speed(task, ("fp32", "bf16"), budget_s=30.0, min_rounds=5)
    for r in steady.values():
        assert r.steps_timed == 5  # stable from the start: stops as soon as the rule may
        assert r.relative_iqr < STABLE_IQR_FRACTION
        assert r.stable and not r.notes


def _alternating(short: float, long: float) -> Callable[[], float]:
    """A step delay that alternates between two values: a step time that never settles."""
    calls = itertools.count()
    return lambda: short if next(calls) % 2 else long


def test_noisy_arms_run_until_the_budget_and_say_so(task: Task) -> None:
    task.module.DELAY.update(fp32=_alternating(0.001, 0.01), bf16=_alternating(0.001, 0.01))
    restless, _ = speed(task, ("fp32", "bf16"), budget_s=0.6, min_rounds=5)
    for r in restless.values():
        # a round costs 0.001 + 0.01 s (the two arms alternate out of step): the 0.6 s budget lasts 56 rounds
        assert r.steps_timed == 56
        assert not r.stable
        assert any("did not settle" in n for n in r.notes)


def test_bootstrap_interval_contains_the_ratio_and_narrows_with_more_rounds() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for rounds in (10, 40, 400):
        base = 0.010 * (1 + 0.1 * rng.standard_normal(rounds))
        arm = 0.005 * (1 + 0.1 * rng.standard_normal(rounds))
        ratio, low, high = bootstrap_speedup(base, arm)
        assert low <= ratio <= high
        assert ratio == pytest.approx(np.median(base) / np.median(arm))
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_pairs_rounds_so_shared_drift_cancels() -> None:
    drift = np.linspace(1.0, 3.0, 50)  # the machine slows down threefold during the run, for both arms alike
    ratio, low, high = bootstrap_speedup(0.010 * drift, 0.005 * drift)
    assert ratio == pytest.approx(2.0)
    assert (low, high) == (pytest.approx(2.0), pytest.approx(2.0))


def test_bootstrap_rejects_unpaired_series() -> None:
    with pytest.raises(ValueError):
        bootstrap_speedup([1.0, 2.0], [1.0])


def test_a_faster_arm_is_called_faster_and_a_slower_one_slower_with_a_cause(task: Task) -> None:
    task.module.DELAY.update(fp32=0.006, bf16=0.003, fp16=0.012)
    _, speedups = speed(task, ("fp32", "bf16", "fp16"), budget_s=1.0, min_rounds=8)
    assert speedups["bf16"].ratio == pytest.approx(2.0) and speedups["bf16"].verdict == "faster"
    assert speedups["bf16"].note is None  # about 2x: within what the hardware allows
    assert speedups["fp16"].ratio == pytest.approx(0.5) and speedups["fp16"].verdict == "slower"
    assert speedups["fp16"].note is not None and "Likely cause" in speedups["fp16"].note


def test_a_speedup_beyond_the_hardware_gets_a_note(task: Task) -> None:
    task.module.DELAY.update(fp32=0.03, bf16=0.001)
    _, speedups = speed(task, ("fp32", "bf16"), budget_s=1.0, min_rounds=5)
    sp = speedups["bf16"]
    limit = theoretical_ratio(CPU, ARMS["bf16"])
    assert limit is not None and sp.ci_low > limit
    assert sp.note is not None and "above" in sp.note


def test_flops_of_a_step_are_forward_2_and_backward_4_per_multiply_add(task: Task) -> None:
    task.module.DELAY.update(fp32=0.01, bf16=0.01)
    results, _ = speed(task, ("fp32", "bf16"), budget_s=0.0)
    # The first layer's input needs no gradient, so its backward computes only the weight gradient (2, not 4).
    expected = 4 * BATCH * D_IN * D_HIDDEN + 6 * BATCH * D_HIDDEN * D_OUT
    for r in results.values():
        assert r.flops_per_step == expected
        assert r.achieved_tflops == pytest.approx(expected / r.step_s_median / 1e12)
        assert r.samples_per_s == pytest.approx(BATCH / r.step_s_median)
        assert r.peak_fraction is None  # CPU: no peak table


def test_compiled_arms_are_timed_beside_eager_ones(task: Task) -> None:
    results, speedups = speed(task, ("fp32", "bf16"), budget_s=0.0, compile=True, compile_backend="eager")
    assert set(results) == {"fp32", "bf16", "fp32+compile", "bf16+compile"}
    assert results["bf16+compile"].compiled and results["bf16+compile"].error is None
    assert results["bf16+compile"].flops_per_step == results["bf16"].flops_per_step
    assert speedups["fp32+compile"].baseline == "fp32"
    assert speedups["bf16+compile"].baseline == "fp32+compile"


def test_a_failing_compile_is_recorded_not_raised(task: Task) -> None:
    results, speedups = speed(task, ("fp32", "bf16"), budget_s=0.0, compile=True,
                              compile_backend="no-such-backend")
    for key in ("fp32+compile", "bf16+compile"):
        assert (results[key].error or "").startswith("torch.compile failed")
        assert results[key].steps_timed == 0
        assert key not in speedups
    assert results["bf16"].error is None and "bf16" in speedups


def test_an_arm_that_raises_is_recorded_and_the_others_still_run(task: Task) -> None:
    task.module.FAIL.add("fp16")
    results, speedups = speed(task, ("fp32", "bf16", "fp16"), budget_s=0.0)
    assert results["fp16"].error == "RuntimeError: no fp16 here"
    assert "fp16" not in speedups
    assert results["bf16"].steps_timed == FLOOR_ROUNDS


def test_peak_table_matches_cuda_device_names() -> None:
    sxm, pcie, a100 = gpu_peak("NVIDIA H100 80GB HBM3"), gpu_peak("NVIDIA H100 PCIe"), gpu_peak("NVIDIA A100-SXM4-80GB")
    assert sxm is not None and sxm[0] == "H100 SXM" and sxm[1]["bf16"] == pytest.approx(989.5)
    assert pcie is not None and pcie[0] == "H100 PCIe"
    assert a100 is not None and a100[1]["fp32"] == pytest.approx(19.5)
    assert gpu_peak("NVIDIA H200")[0] == "H200 SXM"  # type: ignore[index]
    assert gpu_peak("Tesla T4") is None


def test_cpu_without_amx_can_at_most_double_its_speed() -> None:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("amx_bf16"):
        pytest.skip("this CPU has AMX tiles")
    assert theoretical_ratio(CPU, ARMS["bf16"]) == CPU_VECTOR_RATIO
    assert theoretical_ratio(CPU, ARMS["fp32"]) is None
