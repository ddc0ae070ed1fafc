"""Cost of a watched step: ``mpaudit.watch`` around a plain loop against a traced step of ``mpaudit run``.

Builds the benchmark MLP (``workload.py``: 1024 -> 4096 -> 4096 -> 10, batch 256, AdamW, fp32 on the CPU) four
times from the same seed and steps each in turn, one step each per round (the order rotating every round), so a busy
neighbour on the CPU slows all four alike:

* ``plain``: the user's loop alone (forward, backward, ``optimizer.step()``, ``zero_grad``, ``loss.item()``);
* ``watched``: the same loop inside ``mpaudit.watch(..., trace_every=1)``, ``w.log(loss)`` each step, so every step
  is traced;
* ``run traced``: ``mpaudit run``'s own step, as its training loop takes it on a traced step
  (:func:`~mpaudit.run.prepare.prepare_arm`, ``Tracer.start_step``, ``PreparedArm.step`` with the tracer's hooks,
  ``finish_step``, the loss read back);
* ``watched (default schedule)``: the watched loop at the default ``trace_every`` (50).

Prints each variant's median step time and the median over rounds of the paired ratio ``watched / run traced``
(goal: at most ``GOAL``, a watched step costing no more than a traced step of ``mpaudit run``), plus what the watch
costs a plain loop on its default schedule. Run: ``python benchmarks/watch_overhead.py`` (2-4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import mpaudit
from mpaudit.arms import ARMS
from mpaudit.defaults import DEFAULT_TRACE_EVERY
from mpaudit.run.prepare import RunContext, prepare_arm
from mpaudit.trace.tracer import Tracer
from workload import SEED, batch, mlp, mlp_task

ROUNDS = 40
"""Interleaved rounds of one step per variant; per-round ratios are paired, their median is reported."""
GOAL = 1.0
"""A watched step should cost no more than a traced step of mpaudit run (ratio <= 1, within noise)."""


class Plain:
    """The user's loop, optionally inside ``mpaudit.watch``."""

    def __init__(self, every: int | None) -> None:
        torch.manual_seed(SEED)
        self.model = mlp()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.watch = mpaudit.watch(self.model, self.optimizer, out=None, trace_every=every) if every else None
        if self.watch is not None:
            self.watch.__enter__()

    def step(self, b: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = b
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.watch is not None:
            self.watch.log(loss)
        float(loss.item())  # a loop that prints or logs its loss reads it back


class RunTraced:
    """``mpaudit run``'s traced step: its prepared arm, its tracer, its hooks, the loss read back."""

    def __init__(self) -> None:
        run = RunContext(task=mlp_task("watch_overhead_bench"), device=torch.device("cpu"))
        self.prepared = prepare_arm(run, ARMS["fp32"], SEED)
        self.tracer = Tracer(self.prepared.model).attach()
        self.step_index = 0

    def step(self, b: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.tracer.start_step(self.step_index, None)
        with self.prepared.context():
            loss = self.prepared.step(b, after_backward=self.tracer.after_backward,
                                      after_step=self.tracer.after_optimizer_step, hold_nonfinite=True)
        self.tracer.finish_step(summary=False)  # as the training loop calls it
        float(loss.float().item())
        self.step_index += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()

    b = batch()
    variants: dict[str, Callable[[tuple[torch.Tensor, torch.Tensor]], None]] = {
        "plain": Plain(None).step,
        "watched": Plain(1).step,
        "run traced": RunTraced().step,
        f"watched (default, every {DEFAULT_TRACE_EVERY})": Plain(DEFAULT_TRACE_EVERY).step,
    }
    for step in variants.values():  # warm-up: allocator, oneDNN, optimizer state, tracer buffers
        step(b)
        step(b)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            variants[name](b)
            times[name].append(time.perf_counter() - t0)
        if (r + 1) % 10 == 0:
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms"
                                                            for n, t in times.items()), flush=True)
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(ts) for name, ts in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"\nMLP 1024 -> 4096 -> 4096 -> 10, batch 256, AdamW, fp32 on CPU ({torch.get_num_threads()} threads), "
          f"{args.rounds} interleaved rounds of one step each; 1-minute load average {load_before:.1f} before, "
          f"{load_after:.1f} after, on {os.cpu_count()} CPUs")
    for name in names:
        print(f"  {name:<30} {medians[name] * 1e3:8.1f} ms a step (median)")
    print(f"watched / run traced: {paired('watched', 'run traced'):.3f}x  (median of paired rounds; goal <= {GOAL}x)")
    default = names[3]
    print(f"{default} / plain: {paired(default, 'plain'):.3f}x")


if __name__ == "__main__":
    main()
