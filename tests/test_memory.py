"""The memory phase: a training step's peak and its breakdown against sizes worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpaudit.arms import ARMS
from mpaudit.errors import UsageError
from mpaudit.perf.memory import max_batch_for_budget, measure_memory, parse_bytes
from mpaudit.results.perf import BREAKDOWN_KEYS, MemoryResult, activation_savings
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import Task, load_task

CPU = torch.device("cpu")
BATCH, D_IN, D_HIDDEN, D_OUT = 64, 256, 512, 10
FP32, BF16 = 4, 2

TASK = f"""
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear({D_IN}, {D_HIDDEN}), nn.ReLU(), nn.Linear({D_HIDDEN}, {D_OUT}))

def train_loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn({BATCH}, {D_IN}, generator=g), torch.randint(0, {D_OUT}, ({BATCH},), generator=g))]

def loss_fn(model, batch):
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 and BROKEN_BF16:
        raise RuntimeError("bf16 unavailable")
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)

BROKEN_BF16 = False
"""

PARAMS = D_IN * D_HIDDEN + D_HIDDEN + D_HIDDEN * D_OUT + D_OUT
"""Elements in the two Linear layers' weights and biases."""

PARAM_TENSORS = 4
ACTIVATIONS_FP32 = (BATCH * D_HIDDEN + BATCH * D_OUT) * FP32
"""Saved for backward in fp32: the ReLU output (also the second Linear's input, one storage) and the
log-softmax output. The batch itself is an input, not an activation; the weights are parameters."""


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Task:
    path: Path = tmp_path_factory.mktemp("mlp") / "model.py"
    path.write_text(TASK)
    return load_task(path)


@pytest.fixture(scope="module")
def memory(task: Task) -> dict[str, MemoryResult]:
    return measure_memory(RunContext(task, CPU), [ARMS["fp32"], ARMS["bf16"]], 0)


def test_fixed_parts_match_the_analytic_sizes_exactly(memory: dict[str, MemoryResult]) -> None:
    for arm in ("fp32", "bf16"):
        b = memory[arm].breakdown
        assert b["parameters"] == PARAMS * FP32
        assert b["gradients"] == PARAMS * FP32  # fp32 master gradients in both arms
        # AdamW: exp_avg and exp_avg_sq per parameter, plus one fp32 scalar ``step`` tensor each.
        assert b["optimizer_state"] == 2 * PARAMS * FP32 + PARAM_TENSORS * FP32


def test_activations_match_the_saved_tensors_within_ten_percent(memory: dict[str, MemoryResult]) -> None:
    assert memory["fp32"].activation_bytes == pytest.approx(ACTIVATIONS_FP32, rel=0.10)


def test_bf16_saves_activation_memory_and_caches_bf16_weights(memory: dict[str, MemoryResult]) -> None:
    fp32, bf16 = memory["fp32"], memory["bf16"]
    assert bf16.activation_bytes < fp32.activation_bytes
    assert activation_savings(memory)["bf16"] > 0.2
    assert fp32.breakdown["autocast_cache"] == 0
    assert bf16.breakdown["autocast_cache"] == PARAMS * BF16  # one bf16 copy of every weight and bias


def test_the_peak_is_what_was_live_at_once(memory: dict[str, MemoryResult]) -> None:
    for result in memory.values():
        assert result.method == "storage_tracker"
        assert set(result.breakdown) == set(BREAKDOWN_KEYS)
        assert result.peak_bytes == sum(result.at_peak.values())
        assert result.peak_bytes <= sum(result.breakdown.values())
        # AdamW runs with every gradient live next to the weights and both moments.
        assert result.peak_bytes >= 4 * PARAMS * FP32
        assert result.batch_size == BATCH


def test_an_arm_that_raises_is_recorded(task: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task.module, "BROKEN_BF16", True)
    results = measure_memory(RunContext(task, CPU), [ARMS["fp32"], ARMS["bf16"]], 0)
    assert results["bf16"].error == "RuntimeError: bf16 unavailable"
    assert results["fp32"].error is None and results["fp32"].peak_bytes > 0


def test_a_keep_list_arm_is_measured_with_its_keep_list(task: Task, memory: dict[str, MemoryResult]) -> None:
    """Every Linear kept in fp32: no autocast copies of the weights, activations as large as fp32's."""
    kept = ARMS["bf16"].with_changes(["0", "2"])
    result = measure_memory(RunContext(task, CPU), [kept], 0)[kept.name]
    assert memory["bf16"].breakdown["autocast_cache"] > 0
    assert result.breakdown["autocast_cache"] == 0
    assert result.activation_bytes == memory["fp32"].activation_bytes


def _result(scaling: tuple[tuple[int, int], ...], untracked: int = 0) -> MemoryResult:
    """A step whose moments held the given (fixed, batch-dependent) bytes at batch 64."""
    tracked = max(f + v for f, v in scaling)
    at_peak = dict.fromkeys(BREAKDOWN_KEYS, 0)
    at_peak["other"] = tracked
    return MemoryResult(
        arm="fp32",
        peak_bytes=tracked + untracked,
        breakdown=dict(at_peak),
        at_peak=at_peak,
        method="cuda_allocator" if untracked else "storage_tracker",
        batch_size=64,
        batch_scaling=scaling,
    )


# Start of backward: weights, optimizer state and 64 samples of activations at 100 bytes each.
# Optimizer step: weights, gradients, state and scratch, nothing that grows with the batch.
STEP = ((4000, 6400), (5000, 0))


def test_max_batch_scales_each_moment_linearly_and_needs_all_to_fit() -> None:
    m = _result(STEP)
    assert max_batch_for_budget(m, 64, m.peak_bytes) == 64
    assert max_batch_for_budget(m, 64, 4000 + 128 * 100) == 128
    assert max_batch_for_budget(m, 64, 5000 + 50) == 10  # the start of backward: 4000 + 10 * 100 bytes
    assert max_batch_for_budget(m, 64, 4999) == 0  # the optimizer step alone does not fit
    with pytest.raises(UsageError):
        max_batch_for_budget(m, 0, 10**9)
    with pytest.raises(UsageError):
        max_batch_for_budget(_result(((5000, 0),)), 64, 10**9)


def test_max_batch_counts_untracked_memory_as_fixed() -> None:
    m = _result(STEP, untracked=1000)
    assert max_batch_for_budget(m, 64, m.peak_bytes) == 64
    assert max_batch_for_budget(m, 64, 1000 + 4000 + 128 * 100) == 128


def test_max_batch_for_a_measured_step(memory: dict[str, MemoryResult]) -> None:
    m = memory["fp32"]
    assert max_batch_for_budget(m, BATCH, m.peak_bytes) >= BATCH
    # The peak is AdamW's step (gradients, weights, both moments, scratch): one byte less fits no batch.
    assert max_batch_for_budget(m, BATCH, m.peak_bytes - 1) == 0
    # Each extra sample costs its activations and their gradients, a few KiB here: 1 MiB more fits many.
    assert max_batch_for_budget(m, BATCH, m.peak_bytes + 2**20) > 2 * BATCH
    # At the moment the most memory scaled with the batch, that included every saved activation.
    start_of_backward = max(v for _, v in m.batch_scaling)
    assert start_of_backward >= ACTIVATIONS_FP32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * 2**30),
        ("512MB", 512 * 10**6),
        ("80G", 80 * 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("4096", 4096),
        (" 2kib ", 2048),
    ],
)
def test_parse_bytes_reads_si_and_binary_units(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "16 GiBs", "5XB", "-5MB", "0GB", "GiB", "1e999GB"])
def test_parse_bytes_rejects_garbage_with_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_bytes(text)
