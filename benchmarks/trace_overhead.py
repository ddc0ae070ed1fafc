"""Cost of tracing: whole training runs untraced, traced on every step, and on the default schedule.

Builds an MLP 1024 -> 4096 -> 4096 -> 10 (batch 256, AdamW, fp32 on the CPU) and trains it for ``--steps``
steps with :func:`mpaudit.run.train.train_step` three ways: no tracer, a :class:`~mpaudit.trace.tracer.Tracer` on every
step (``every=1``, update statistics included), and the default :class:`~mpaudit.trace.tracer.TraceSchedule`.
Runs are interleaved (untraced, every=1, default, then every=1, default, untraced, ...: the order rotates)
so a busy neighbour on the CPU slows all three alike, and the medians of whole-run wall times are compared.
Prints the ratios ``every=1/untraced`` (goal: at most ``EVERY_STEP_GOAL``) and ``default/untraced`` (goal:
at most ``DEFAULT_GOAL``). Tracing reduces CPU tensors on one thread (see ``mpaudit.trace.tracer._cpu_threads``).
Run: ``python benchmarks/trace_overhead.py`` (3-8 minutes on 2 cores, depending on how busy they are).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from mpaudit.arms import ARMS
from mpaudit.run.step import train_step
from mpaudit.trace.tracer import DEFAULT_TRACE_EVERY, Tracer, TraceSchedule
from workload import BATCH, WIDTHS, mlp, mlp_task

STEPS = 30
"""Optimizer steps per run."""
REPEATS = 5
"""Interleaved repeats of each variant; the median run time of each is compared."""
WARMUP_STEPS = 2
"""Untimed steps before the first run (allocator and oneDNN warm-up)."""
EVERY_STEP_GOAL = 1.25
DEFAULT_GOAL = 1.05
SEED = 0


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    return [
        (torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g))
        for _ in range(steps)
    ]


def run(batches: list[tuple[torch.Tensor, torch.Tensor]], every: int | None) -> tuple[float, int]:
    """Train a fresh model on ``batches``; ``every=None`` runs without a tracer. Returns (seconds, traced steps)."""
    torch.manual_seed(SEED)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    arm, task = ARMS["fp32"], mlp_task("trace_overhead_bench")
    tracer = Tracer(model) if every is not None else None
    schedule = TraceSchedule(every if every is not None else 0)
    traced = 0
    with tracer if tracer is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        for step, batch in enumerate(batches):
            on = tracer is not None and schedule.wants(step)
            if on:
                assert tracer is not None
                tracer.start_step(step, None)
            loss = train_step(
                task, arm, model, optimizer, None, batch, "cpu", after_backward=tracer.after_backward if on else None
            )
            if on:
                assert tracer is not None
                tracer.after_optimizer_step()
                tracer.finish_step()
                traced += 1
            float(loss.item())  # the training loop's one host sync per step
        elapsed = time.perf_counter() - t0
    return elapsed, traced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()

    batches = _batches(args.steps)
    load_before = os.getloadavg()[0]
    run(batches[:WARMUP_STEPS], None)
    variants: dict[str, int | None] = {
        "untraced": None,
        "every=1": 1,
        f"default (every={DEFAULT_TRACE_EVERY})": DEFAULT_TRACE_EVERY,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    traced: dict[str, int] = {}
    names = list(variants)
    for r in range(args.repeats):
        # rotate the order each repeat, so a load that drifts during a repeat favours no variant
        for name in names[r % len(names) :] + names[: r % len(names)]:
            every = variants[name]
            seconds, traced[name] = run(batches, every)
            times[name].append(seconds)
            print(
                f"repeat {r + 1}/{args.repeats}  {name:<22} {seconds:7.2f} s  ({traced[name]} traced steps)", flush=True
            )
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["untraced"]
    print(
        f"\n{args.steps} steps, MLP {' -> '.join(map(str, WIDTHS))}, batch {BATCH}, AdamW, fp32 on CPU "
        f"({torch.get_num_threads()} threads), median of {args.repeats} interleaved runs; 1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs (above that, they were shared)"
    )
    for name in names:
        print(f"  {name:<22} {medians[name]:7.2f} s")
    every_ratio = medians[names[1]] / base
    default_ratio = medians[names[2]] / base
    print(f"every=1 / untraced: {every_ratio:.3f}x  (goal <= {EVERY_STEP_GOAL}x)")
    print(f"default / untraced: {default_ratio:.3f}x  (goal <= {DEFAULT_GOAL}x)")


if __name__ == "__main__":
    main()
