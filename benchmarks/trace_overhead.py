"""Cost of tracing: whole training runs untraced, traced on every step, and on the default schedule.

Three models, each trained for its ``steps`` with :func:`mpaudit.run.train.train_step` (AdamW, fp32 on the CPU):

- ``mlp``: the benchmark MLP 1024 -> 4096 -> 4096 -> 10, batch 256 (5 large leaf modules);
- ``many``: 200 x (Linear 64 -> 64 + ReLU) and a head, batch 32 (401 small leaf modules);
- ``gpt2``: a GPT-2 from a ``transformers`` config, 2 blocks, 64 wide, 8 x 32 tokens; without ``transformers``
  (``nox -s bench`` installs only the dev extra) ``decoder``, a torch-only decoder of the same shape, runs instead.

Each is run three ways: no tracer, a :class:`~mpaudit.trace.tracer.Tracer` on every step (``every=1``, update
statistics included), and the default :class:`~mpaudit.trace.tracer.TraceSchedule`. Runs are interleaved
(untraced, every=1, default, then every=1, default, untraced, ...: the order rotates) so a busy neighbour on the
CPU slows all three alike. Two ratios to untraced are printed per variant: of the median step time (what
``mpaudit run`` reports as ``train_step_s``; on the default schedule that is an untraced step) and of the median
whole-run wall time (which includes the default schedule's traced steps). Goals: every=1 at most the model's
``every_goal``, default at most ``DEFAULT_GOAL``. Tracing reduces CPU tensors with the one-pass kernel when this
machine can build it (``mpaudit.trace.native``; the line printed first says which), else with the torch reductions;
``MPAUDIT_NATIVE_KERNEL=0`` measures the latter.
Run: ``python benchmarks/trace_overhead.py`` (5-10 minutes on 2 cores, depending on how busy they are);
``--models many,gpt2`` picks models.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpaudit.arms import ARMS
from mpaudit.run.step import train_step
from mpaudit.run.task import Task
from mpaudit.trace.reduce import kernel_description
from mpaudit.trace.tracer import DEFAULT_TRACE_EVERY, Tracer, TraceSchedule
from workload import (
    BATCH,
    GPT2_BATCH,
    GPT2_CONTEXT,
    MANY_BATCH,
    WIDTHS,
    TinyDecoder,
    gpt2_batch,
    gpt2_tiny,
    many_batch,
    many_layers,
    mlp,
)
from workload import batch as mlp_batch

REPEATS = 5
"""Interleaved repeats of each variant; the medians of each are compared."""
WARMUP_STEPS = 2
"""Untimed steps before a model's first run (allocator and oneDNN warm-up), and steps left out of each run's
median step time."""
DEFAULT_GOAL = 1.05
SEED = 0


@dataclass(frozen=True)
class Workload:
    """A model to train: how to build it, its batches and loss, how many steps a run takes, its goal."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    steps: int
    every_goal: float


def _xy_loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = b
    return nn.functional.cross_entropy(model(x), y)


def _hf_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**b).loss  # type: ignore[no-any-return]


def _decoder_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**b)  # type: ignore[no-any-return]


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


WORKLOADS = {
    "mlp": Workload(
        "mlp", f"MLP {' -> '.join(map(str, WIDTHS))}, batch {BATCH}", mlp, mlp_batch, _xy_loss, 30, 1.2
    ),
    "many": Workload(
        "many", f"200 x (Linear 64 -> 64 + ReLU) + head, batch {MANY_BATCH}", many_layers, many_batch, _xy_loss,
        200, 3.0,
    ),
    "gpt2": Workload(
        "gpt2", f"GPT-2 2 blocks x 64 wide, {GPT2_BATCH} x {GPT2_CONTEXT} tokens", gpt2_tiny, gpt2_batch, _hf_loss, 200,
        1.5,
    ),
    "decoder": Workload(
        "decoder", f"torch-only decoder 2 blocks x 64 wide, {GPT2_BATCH} x {GPT2_CONTEXT} tokens", TinyDecoder,
        gpt2_batch, _decoder_loss, 200, 1.5,
    ),
}
"""The models; by default ``mlp``, ``many`` and ``gpt2`` (``decoder`` when ``transformers`` is missing)."""


def _task(w: Workload) -> Task:
    module = types.ModuleType(f"trace_overhead_{w.name}")
    module.build_model = w.build  # type: ignore[attr-defined]
    module.loss_fn = w.loss  # type: ignore[attr-defined]
    return Task(path=Path(f"{module.__name__}.py"), sha256="", module=module)


def run(w: Workload, batches: list[Any], every: int | None) -> tuple[float, float, int]:
    """Train a fresh model on ``batches``; ``every=None`` runs without a tracer.
    Returns (whole-run seconds, median step seconds after warm-up, traced steps)."""
    torch.manual_seed(SEED)
    model = w.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    arm, task = ARMS["fp32"], _task(w)
    tracer = Tracer(model) if every is not None else None
    schedule = TraceSchedule(every if every is not None else 0)
    traced = 0
    step_times: list[float] = []
    with tracer if tracer is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        for step, batch in enumerate(batches):
            ts = time.perf_counter()
            on = tracer is not None and schedule.wants(step)
            if on:
                assert tracer is not None
                tracer.start_step(step, None)
            loss = train_step(
                task, arm, model, optimizer, None, batch, "cpu",
                after_backward=tracer.after_backward if on and tracer else None,
                after_step=tracer.after_optimizer_step if on and tracer else None,
            )
            if on:
                assert tracer is not None
                tracer.finish_step(summary=False)  # as the training loop calls it
                traced += 1
            float(loss.item())  # the training loop's one host sync per step
            step_times.append(time.perf_counter() - ts)
        elapsed = time.perf_counter() - t0
    return elapsed, statistics.median(step_times[WARMUP_STEPS:] or step_times), traced


def bench(w: Workload, steps: int, repeats: int) -> dict[str, float]:
    """Interleaved runs of the three variants; prints and returns the ratios to untraced."""
    batches = [w.batch(SEED + i) for i in range(steps)]
    load_before = os.getloadavg()[0]
    run(w, batches[:WARMUP_STEPS], None)
    variants: dict[str, int | None] = {
        "untraced": None,
        "every=1": 1,
        f"default (every={DEFAULT_TRACE_EVERY})": DEFAULT_TRACE_EVERY,
    }
    names = list(variants)
    totals: dict[str, list[float]] = {name: [] for name in names}
    medians: dict[str, list[float]] = {name: [] for name in names}
    traced: dict[str, int] = {}
    for r in range(repeats):
        # rotate the order each repeat, so a load that drifts during a repeat favours no variant
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, step_s, traced[name] = run(w, batches, variants[name])
            totals[name].append(seconds)
            medians[name].append(step_s)
            print(
                f"  [{w.name}] repeat {r + 1}/{repeats}  {name:<22} {seconds:7.2f} s  median step "
                f"{step_s * 1e3:7.2f} ms  ({traced[name]} traced steps)",
                flush=True,
            )
    load_after = os.getloadavg()[0]
    total = {name: statistics.median(ts) for name, ts in totals.items()}
    step = {name: statistics.median(ts) for name, ts in medians.items()}
    print(
        f"{w.name}: {w.description}, {steps} steps, AdamW, fp32 on CPU ({torch.get_num_threads()} threads), median "
        f"of {repeats} interleaved runs; 1-minute load average {load_before:.1f} before, {load_after:.1f} after, "
        f"on {os.cpu_count()} CPUs (above that, they were shared)"
    )
    for name in names:
        print(f"  {name:<22} run {total[name]:7.2f} s   median step {step[name] * 1e3:7.2f} ms")
    ratios = {
        "every_step": step[names[1]] / step["untraced"],
        "every_run": total[names[1]] / total["untraced"],
        "default_step": step[names[2]] / step["untraced"],
        "default_run": total[names[2]] / total["untraced"],
    }
    print(
        f"  every=1 / untraced: {ratios['every_step']:.3f}x median step, {ratios['every_run']:.3f}x run  "
        f"(goal <= {w.every_goal}x)"
    )
    print(
        f"  default / untraced: {ratios['default_step']:.3f}x median step, {ratios['default_run']:.3f}x run  "
        f"(goal <= {DEFAULT_GOAL}x)\n",
        flush=True,
    )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ["mlp", "many", "gpt2" if _has_transformers() else "decoder"]
    parser.add_argument("--models", default=",".join(default), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the model's own)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()

    print(f"tracing reduces CPU tensors with: {kernel_description('cpu')}\n")
    results: dict[str, dict[str, float]] = {}
    for name in args.models.split(","):
        w = WORKLOADS[name]
        if name == "gpt2" and not _has_transformers():
            print("gpt2: skipped (needs the optional `transformers` package; `decoder` is its torch-only stand-in)\n")
            continue
        results[name] = bench(w, args.steps or w.steps, args.repeats)
    print("summary (median step / whole run):")
    for name, r in results.items():
        print(
            f"  {name:<7} every=1 {r['every_step']:.2f}x / {r['every_run']:.2f}x "
            f"(goal <= {WORKLOADS[name].every_goal}x)"
            f"   default {r['default_step']:.2f}x / {r['default_run']:.2f}x (goal <= {DEFAULT_GOAL}x)"
        )


if __name__ == "__main__":
    main()
