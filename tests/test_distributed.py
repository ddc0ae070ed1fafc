"""Distributed audits: two real CPU processes under torchrun (gloo), DDP and FSDP2, against one process.

Each torchrun launch costs a few seconds of process start-up, so the tests share as few launches as they can.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import OVERFLOW_TASK, TINY_TASK
from mpaudit import audit
from mpaudit.errors import UsageError
from mpaudit.numerics.layerstats import ACTIVATION, GRAD_OUTPUT, GRAD_PREFIX
from mpaudit.results.model import AuditResult
from mpaudit.run.distributed import EXIT_RANK_FAILED, Parallel, _EveryKth, _without_option, shard_fsdp
from mpaudit.run.fp8 import torchao_available

# The tiny task with DataLoaders and no shuffling: rank r of 2 gets samples r, r+2, ... of each 2*BATCH block,
# so the union of both ranks' batches at step s is exactly the single-process batch s of size 2*BATCH.
DIST_TASK = (
    TINY_TASK.replace("import torch\n", "import os\nimport torch\n"
                      "from torch.utils.data import DataLoader, TensorDataset\n"
                      "BATCH = int(os.environ.get('DIST_TEST_BATCH', '8'))\n", 1)
    .replace("return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]", "return TensorDataset(x, y)")
    .replace("return _data(1)", "return DataLoader(_data(1), batch_size=BATCH, shuffle=False)")
    .replace("return _data(2)", "return DataLoader(_data(2), batch_size=64)")
    # loss_fn reads an attribute of the model: under DDP it gets the wrapper, which must answer for it
    .replace("return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
             "model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))\n"
             "    model.label_smoothing = 0.0\n    return model")
    .replace("cross_entropy(model(x), y)", "cross_entropy(model(x), y, label_smoothing=model.label_smoothing)")
)

# Rank 1 raises on its third bf16 step: fp32 has finished by then, bf16 is mid-arm.
FAILING_TASK = DIST_TASK + '''
_bf16_steps = 0

def loss_fn(model, batch):
    global _bf16_steps
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        _bf16_steps += 1
        if os.environ.get("RANK") == "1" and _bf16_steps == 3:
            raise ValueError("rank one breaks on purpose")
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
'''

STEPS = 3
LAUNCH_TIMEOUT_S = 180


def _torchrun(tmp_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mpaudit", "run", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _load(path: Path) -> AuditResult:
    return AuditResult.from_json(path.read_text())


def _close_hist(a: np.ndarray, b: np.ndarray, count: int) -> bool:
    """Histograms equal but for values rounding across a binade edge (reduction order differs)."""
    return int(np.abs(a - b).sum()) <= max(4, count // 50)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "dist_task.py").write_text(DIST_TASK)
    proc = _torchrun(tmp, "dist_task.py", "--steps", str(STEPS), "--trace-every", "1", "--no-bench",
                     "--out", "out")
    return tmp, proc


def test_ddp_statistics_equal_one_process_on_the_concatenated_batches(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = _load(tmp / "out" / "report.json")
    (tmp_path / "dist_task.py").write_text(DIST_TASK)
    monkeypatch.setenv("DIST_TEST_BATCH", "16")  # one process, both ranks' batches at once
    single = audit(tmp_path / "dist_task.py", steps=STEPS, trace_every=1, bench=False)

    assert ddp.distributed is not None and single.distributed is None
    assert (ddp.distributed.world_size, ddp.distributed.backend, ddp.distributed.parallel) == (2, "gloo", "ddp")
    for name in ("fp32", "bf16", "fp16"):
        a, b = ddp.arms[name], single.arms[name]
        assert a.status == b.status == "ok"
        assert np.allclose(a.loss, b.loss, rtol=1e-3, atol=1e-5), (name, a.loss, b.loss)  # mean over ranks
        assert a.metrics == pytest.approx(b.metrics, abs=1 / 256)
        assert a.trace is not None and b.trace is not None
        assert set(a.trace.stats) == set(b.trace.stats)
        for key, s in b.trace.stats.items():
            d = a.trace.stats[key]
            assert (d.count, d.nan, d.posinf, d.neginf) == (s.count, s.nan, s.posinf, s.neginf), key
            assert abs(d.zeros - s.zeros) <= max(2, s.count // 100), key  # a sum may cancel to 0 in one order only
            role = key[1]
            if role == GRAD_OUTPUT:
                # each rank's gradient is of its own mean loss: world_size (2) times the global-batch one,
                # exactly one binade up; that is the tensor the rank really holds, so it is what is traced
                assert _close_hist(d.hist[1:], s.hist[:-1], s.count), key
                assert d.max_abs == pytest.approx(2 * s.max_abs, rel=1e-2), key
            elif role == ACTIVATION or role.startswith(GRAD_PREFIX):
                # activations add up over the ranks' shards; DDP's averaged gradients are counted once
                assert _close_hist(d.hist, s.hist, s.count), key
                assert d.max_abs == pytest.approx(s.max_abs, rel=1e-2), key
                assert d.sum_abs == pytest.approx(s.sum_abs, rel=1e-2), key


def test_ddp_only_rank_0_writes_and_other_ranks_stay_quiet(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    tmp, proc = ddp_run
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["layers.csv", "report.html", "report.json",
                                                                  "summary.md"]
    assert not (tmp / "reports").exists()
    assert proc.stdout.count("report: ") == 1  # one summary, from rank 0
    assert "rank 1" not in proc.stdout + proc.stderr


def test_fsdp_runs_every_arm_and_sums_gradient_shards(tmp_path: Path) -> None:
    (tmp_path / "dist_task.py").write_text(DIST_TASK)
    arms = "fp32,bf16,fp16" + (",fp8" if torchao_available() else "")
    proc = _torchrun(tmp_path, "dist_task.py", "--steps", "2", "--trace-every", "1", "--parallel", "fsdp",
                     "--arms", arms, "--bench-seconds", "0.2", "--out", "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _load(tmp_path / "out" / "report.json")
    assert result.distributed is not None and result.distributed.parallel == "fsdp"
    assert list(result.arms) == arms.split(",") and all(a.status == "ok" for a in result.arms.values())
    if torchao_available():  # float8 layers, trained sharded, are evaluated with their gathered fp32 weights
        assert result.arms["fp8"].fp8_layers == ["0", "2"] and "accuracy" in result.arms["fp8"].metrics
    stats = result.arms["fp32"].trace.stats  # type: ignore[union-attr]
    # each rank holds half of a weight's gradient: the shards add up to the whole parameter, once per step
    assert stats[("0", GRAD_PREFIX + "weight")].count == 2 * 32 * 8
    assert result.arms["fp32"].speed is not None and len(result.distributed.step_s_per_rank["fp32"]) == 2
    # memory per rank: parameters are the rank's dim-0 shards of Linear(8,32) and Linear(32,3); the report shows
    # the larger rank 0, which holds rows 0-15 of the first layer and rows 0-1 (of 3) of the second
    memory = result.arms["fp32"].memory
    assert memory is not None and memory.error is None
    assert memory.breakdown["parameters"] == 4 * (16 * 8 + 16 + 2 * 32 + 2)
    assert len(result.distributed.peak_bytes_per_rank["fp32"]) == 2
    assert any("FSDP" in n for n in result.perf_notes)  # what the breakdown means there


def test_a_rank_that_raises_stops_the_job_quickly_with_a_partial_report(tmp_path: Path) -> None:
    (tmp_path / "fail_task.py").write_text(FAILING_TASK)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mpaudit", "run", "fail_task.py", "--nproc", "2", "--steps", "6", "--no-bench",
         "--out", "out"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == EXIT_RANK_FAILED, proc.stderr[-3000:]
    assert elapsed < 90  # no hang: the failing rank's exit breaks rank 0's pending collective at once
    assert "rank 1 failed in bf16: ValueError: rank one breaks on purpose" in proc.stderr
    result = _load(tmp_path / "out" / "report.json")
    assert result.distributed is not None and result.distributed.failure is not None
    assert (result.distributed.failure.rank, result.distributed.failure.arm) == (1, "bf16")
    assert result.arms["fp32"].status == "ok" and result.arms["fp32"].steps == 6  # finished before: kept
    assert result.arms["bf16"].status == "failed" and "rank 1" in (result.arms["bf16"].error or "")
    assert result.arms["bf16"].steps == 2  # its steps before the failure are kept too
    assert "fp16" not in result.arms  # never started
    assert "Rank 1 failed in bf16" in (tmp_path / "out" / "summary.md").read_text()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Rank 1 failed</strong>" not in html and "Rank 1 failed in bf16:" in html


def test_nproc_keeps_the_single_process_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "overflow.py").write_text(OVERFLOW_TASK)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mpaudit", "run", "overflow.py", "--nproc", "2", *args],
                              cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=LAUNCH_TIMEOUT_S)

    gate = run("--steps", "30", "--no-bench", "--trace-every", "0", "--arms", "fp32,fp16",
               "--max-drop", "accuracy=0.05", "--out", "gated", "-q")
    assert gate.returncode == 1, gate.stderr[-2000:]  # fp16 overflows at layer amp: the gate fails, as in one process
    assert gate.stderr.count("GATE FAILED") == 1  # printed by rank 0 only
    usage = run("--steps", "0")
    assert usage.returncode == 2
    assert usage.stderr.count("--steps must be at least 1") == 1  # checked once, before any rank starts


def test_every_kth_gives_each_rank_whole_groups() -> None:
    batches = list(range(7))
    assert list(_EveryKth(batches, 2, 0)) == [0, 2, 4]
    assert list(_EveryKth(batches, 2, 1)) == [1, 3, 5]  # 6 has no partner: dropped on every rank
    assert len(_EveryKth(batches, 3, 2)) == 2


def test_single_process_defaults_and_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    job = Parallel.from_env("auto")
    assert (job.active, job.is_main, job.world_size) == (False, True, 1)
    loader = [1, 2, 3]
    assert job.shard(loader) is loader
    with pytest.raises(UsageError, match="torchrun"):
        Parallel.from_env("ddp")
    with pytest.raises(UsageError, match="--parallel"):
        Parallel.from_env("zero3")
    assert _without_option(["m.py", "--nproc", "2", "--steps=3", "--nproc=4"], "--nproc") == ["m.py", "--steps=3"]
    assert math.isfinite(job.timeout_s)


def test_report_states_the_distributed_run(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp, _ = ddp_run
    html = (tmp / "out" / "report.html").read_text()
    assert "world size 2" in html and "gloo" in html and "DDP" in html
    data = json.loads((tmp / "out" / "report.json").read_text())
    assert data["distributed"]["world_size"] == 2
    assert "DDP × 2 ranks (gloo)" in (tmp / "out" / "summary.md").read_text()
    assert data["env"]["command"][:2] == ["torchrun", "--nproc-per-node=2"]  # how to reproduce this job


def test_fsdp_shards_each_block_of_a_layer_stack_as_its_own_group(tmp_path: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)])
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = shard_fsdp(Stack())
        grouped = {name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP")}
        assert grouped == {"", "blocks.0", "blocks.2"}  # the parameter-free ReLU gets no group of its own
        model(torch.randn(3, 4)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
