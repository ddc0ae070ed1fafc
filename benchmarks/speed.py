"""The speed phase on a CPU: bf16 speedup with its interval, agreement with torch.utils.benchmark, repeatability.

Builds an MLP 1024 -> 4096 -> 4096 -> 10 (batch 256, AdamW), which is matmul-bound, and runs
:func:`mpaudit.perf.speed.measure_speed` for the fp32 and bf16 arms ``REPEATS`` times. Just before and just after
each run it times the same fp32 step with ``torch.utils.benchmark.Timer(...).blocked_autorange()`` and prints
how far measure_speed's fp32 median is from the mean of the two (goal: within ``AGREEMENT_GOAL``; bracketing
the run cancels most of a shared machine's drift). At the end it prints the spread of the bf16 speedups (goal:
each within ``SPREAD_GOAL`` of their mean) and whether bf16 beat ``SPEEDUP_GOAL`` with an interval that
excludes 1. Run: ``python benchmarks/speed.py`` (about 3 minutes on 2 idle cores).
"""

from __future__ import annotations

import statistics

import torch
from torch.utils import benchmark

from mpaudit.arms import ARMS
from mpaudit.perf.speed import measure_speed
from mpaudit.results.perf import SpeedResult, Speedup
from mpaudit.run.prepare import RunContext
from mpaudit.run.step import train_step
from mpaudit.run.task import Task
from workload import BATCH, WIDTHS, mlp_task

SEED = 0
REPEATS = 3
"""Independent measure_speed runs whose speedups should agree."""
BUDGET_S = 20.0
"""Time budget of each measure_speed run."""
TIMER_MIN_RUN_S = 5.0
"""How long ``blocked_autorange`` times the fp32 step before and after each run."""
AGREEMENT_GOAL = 0.10
"""measure_speed's fp32 median should be within this fraction of torch.utils.benchmark's."""
SPREAD_GOAL = 0.05
"""Each run's bf16 speedup should be within this fraction of the runs' mean speedup."""
SPEEDUP_GOAL = 1.1
"""On an AVX512-BF16 CPU the bf16 arm should be at least this much faster, with an interval excluding 1."""


def _timer_median(task: Task) -> float:
    """Median fp32 step time from torch.utils.benchmark, on the same step function measure_speed runs."""
    torch.manual_seed(SEED)
    model = task.build_model()
    optimizer = task.build_optimizer(model)
    batch = next(iter(task.train_loader()))

    def step() -> None:
        train_step(task, ARMS["fp32"], model, optimizer, None, batch, "cpu")

    step()  # optimizer state, oneDNN primitives
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=TIMER_MIN_RUN_S).median)


def _line(r: SpeedResult) -> str:
    return (
        f"{r.arm:>5}: median {r.step_s_median * 1e3:7.1f} ms, IQR {r.relative_iqr:5.1%}, "
        f"{r.steps_timed} steps, {r.achieved_tflops or 0:.3f} TFLOP/s"
    )


def main() -> None:
    """Run the speed phase REPEATS times beside torch.utils.benchmark and print agreement and spread."""
    task = mlp_task("speed_bench")
    arms = [ARMS["fp32"], ARMS["bf16"]]
    print(f"MLP {'->'.join(map(str, WIDTHS))}, batch {BATCH}, AdamW, {torch.get_num_threads()} threads", flush=True)
    speedups: list[Speedup] = []
    agreements: list[float] = []
    for run in range(REPEATS):
        before = _timer_median(task)
        speed, sp = measure_speed(RunContext(task, torch.device("cpu")), arms, SEED, budget_s=BUDGET_S)
        after = _timer_median(task)
        bf16 = sp["bf16"]
        speedups.append(bf16)
        print(f"run {run + 1}/{REPEATS}")
        print("  " + _line(speed["fp32"]))
        print("  " + _line(speed["bf16"]))
        print(
            f"  bf16 speedup {bf16.ratio:.3f}x, {bf16.confidence:.0%} CI [{bf16.ci_low:.3f}, {bf16.ci_high:.3f}] "
            f"over {bf16.rounds} paired rounds: {bf16.verdict}" + (f" ({bf16.note})" if bf16.note else "")
        )
        reference = (before + after) / 2
        agreement = speed["fp32"].step_s_median / reference - 1.0
        agreements.append(agreement)
        verdict = "meets" if abs(agreement) <= AGREEMENT_GOAL else "misses"
        print(
            f"  torch.utils.benchmark fp32 median {before * 1e3:.1f} ms before, {after * 1e3:.1f} ms after; "
            f"measure_speed differs from their mean by "
            f"{agreement:+.1%} ({verdict} the goal of ±{AGREEMENT_GOAL:.0%})",
            flush=True,
        )

    ratios = [s.ratio for s in speedups]
    mean = statistics.mean(ratios)
    spread = max(abs(r / mean - 1.0) for r in ratios)
    print(
        f"bf16 speedups {', '.join(f'{r:.3f}' for r in ratios)}: mean {mean:.3f}, largest deviation {spread:.1%} "
        f"({'meets' if spread <= SPREAD_GOAL else 'misses'} the goal of ±{SPREAD_GOAL:.0%})"
    )
    fast = all(s.ratio > SPEEDUP_GOAL and s.ci_low > 1.0 for s in speedups)
    print(f"bf16 faster than {SPEEDUP_GOAL}x with a CI excluding 1 in every run: {'yes' if fast else 'no'}")


if __name__ == "__main__":
    main()
