"""Step time of the fp16 arm on a CPU: native fp16 autocast vs emulated fp16 vs the fp32 arm.

Builds an MLP 1024 -> 4096 -> 4096 -> 10 (batch 256, AdamW) and times ``mpaudit.run.train.train_step`` for
the fp32 arm, the fp16 arm inside :func:`mpaudit.run.fp16_emulation.emulated_fp16`, and the fp16 arm run
natively (only a couple of steps: each takes tens of seconds). Steps are interleaved after warm-up and
medians are compared, so a busy neighbour on the CPU slows every arm alike. Prints the ratios
``emulated/fp32`` (goal: at most ``EMULATED_GOAL``) and ``native/fp32``. Run:
``python benchmarks/fp16_emulation.py`` (about 2 minutes on 2 idle cores; the native steps dominate).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections import Counter

import torch
from torch import nn

from mpaudit.arms import ARMS
from mpaudit.run.fp16_emulation import emulated_fp16
from mpaudit.run.precision import make_scaler
from mpaudit.run.step import train_step
from mpaudit.run.task import Task
from workload import BATCH, WIDTHS, mlp, mlp_task

WARMUP_STEPS = 2
"""Untimed steps per fast arm (allocator and oneDNN warm-up)."""
TIMED_ROUNDS = 7
"""Interleaved rounds of one fp32 and one emulated step each."""
NATIVE_ROUNDS = (1, 4)
"""Rounds after which one native fp16 step is timed (each is slow, so only a couple)."""
EMULATED_GOAL = 1.3
"""Emulated fp16 should cost at most this many fp32 steps."""
SEED = 0


class _Runner:
    """One arm's model, optimizer and scaler, and the context (emulation or none) around its step."""

    def __init__(self, arm_name: str, model: nn.Module, emulate: bool) -> None:
        self.arm = ARMS[arm_name]
        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scaler = make_scaler(self.arm, "cpu")
        self.emulate = emulate
        self.emulated_calls: Counter[str] = Counter()
        self.times: list[float] = []

    def step(self, task: Task, batch: tuple[torch.Tensor, torch.Tensor], timed: bool = True) -> None:
        t0 = time.perf_counter()
        # A fresh mode per step, as the training loop does; its fp32 buffers persist across steps.
        with emulated_fp16() if self.emulate else contextlib.nullcontext() as mode:
            loss = train_step(task, self.arm, self.model, self.optimizer, self.scaler, batch, "cpu")
        if mode is not None:
            self.emulated_calls = mode.calls
        loss.item()  # host sync, as the training loop does once per step
        if timed:
            self.times.append(time.perf_counter() - t0)


def _report(name: str, times: list[float], fp32: float) -> str:
    median = statistics.median(times)
    return f"{name:>9}: median {median * 1e3:8.1f} ms over {len(times)} steps, {name}/fp32 = {median / fp32:6.2f}"


def main() -> None:
    """Run the interleaved benchmark and print medians and ratios."""
    torch.manual_seed(SEED)
    model = mlp()
    batch = (torch.randn(BATCH, WIDTHS[0]), torch.randint(WIDTHS[-1], (BATCH,)))
    task = mlp_task("fp16_emulation_bench")
    fp32 = _Runner("fp32", model, emulate=False)
    emulated = _Runner("fp16", model, emulate=True)
    native = _Runner("fp16", model, emulate=False)

    for _ in range(WARMUP_STEPS):
        fp32.step(task, batch, timed=False)
        emulated.step(task, batch, timed=False)
    for round_ in range(TIMED_ROUNDS):
        fp32.step(task, batch)
        emulated.step(task, batch)
        if round_ in NATIVE_ROUNDS:
            native.step(task, batch)
        print(f"round {round_ + 1}/{TIMED_ROUNDS} done", flush=True)

    base = statistics.median(fp32.times)
    print(f"MLP {'->'.join(map(str, WIDTHS))}, batch {BATCH}, AdamW, {torch.get_num_threads()} threads")
    print(_report("fp32", fp32.times, base))
    print(_report("emulated", emulated.times, base))
    print(_report("native", native.times, base))
    ratio = statistics.median(emulated.times) / base
    verdict = "meets" if ratio <= EMULATED_GOAL else "misses"
    print(f"emulated/fp32 = {ratio:.2f} ({verdict} the goal of <= {EMULATED_GOAL})")
    print("emulated op calls in the last step:", dict(emulated.emulated_calls))


if __name__ == "__main__":
    main()
