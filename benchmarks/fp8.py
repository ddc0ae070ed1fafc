"""Step time of the float8 arms on a CPU against fp32: torchao's emulated float8 GEMMs on the benchmark MLP.

Times one optimizer step (forward, backward, AdamW) of the benchmark MLP 1024 -> 4096 -> 4096 -> 10 (batch 256) for
the fp32 arm and the ``fp8`` (tensorwise) and ``fp8-rowwise`` arms, each set up by
:func:`mpaudit.run.prepare.prepare_arm` exactly as the audit trains it (torchao's ``convert_to_float8_training``
with ``emulate=True`` on a CPU: the operands cast to float8 with the recipe's scales, then a high-precision matmul,
computed by :mod:`mpaudit.run.fp8_emulation` with torchao's bits; bf16 autocast elsewhere), and for reference a
plain loop over the same MLP converted by torchao directly (``emulate=True``, no autocast: torchao's own emulation,
no mpaudit in the step). Prints each ratio to fp32 (goal for ``fp8``: at most ``EMULATED_GOAL``). The numbers say
what an audit costs on a CPU, nothing about float8 speed on a GPU. The casts are memory-bound and the matmuls
compute-bound, so the ratio grows when other jobs share the memory bandwidth: compare runs at a similar load average.

Steps are interleaved after warm-up, and each ratio is the median over rounds of the arm's step time over fp32's in
the same round, so a busy neighbour slows every arm alike; the load average is printed. Needs torchao
(``pip install 'mpaudit[fp8]'``); without it the script says so and exits 0. Run: ``python benchmarks/fp8.py``
(about a minute on 2 idle cores).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from mpaudit.arms import ARMS
from mpaudit.run.fp8 import import_torchao, torchao_available
from mpaudit.run.prepare import PreparedArm, RunContext, prepare_arm
from workload import BATCH, SEED, WIDTHS, batch, load_average, mlp, mlp_task

ARMS_TIMED = ("fp32", "fp8", "fp8-rowwise")
DIRECT = "torchao direct"
"""The reference: the MLP converted by torchao itself (tensorwise, emulated) in a plain loop."""
WARMUP_STEPS = 2
"""Untimed steps per arm (allocator, oneDNN and torchao warm-up)."""
TIMED_ROUNDS = 9
"""Interleaved rounds of one step of every arm."""
EMULATED_GOAL = 2.5
"""An emulated tensorwise float8 step should cost at most this many fp32 steps on the MLP."""


Data = tuple[torch.Tensor, torch.Tensor]


def _arm_step(prepared: PreparedArm) -> Callable[[Data], torch.Tensor]:
    def step(data: Data) -> torch.Tensor:
        with prepared.context():
            return prepared.step(data)

    return step


def _direct_step(model: torch.nn.Module) -> Callable[[Data], torch.Tensor]:
    """torchao's tensorwise recipe, emulated, on a copy of ``model``: forward, backward, AdamW, nothing else."""
    fp8 = import_torchao()
    model = copy.deepcopy(model)
    config = dataclasses.replace(fp8.Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
    fp8.convert_to_float8_training(model, config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(data: Data) -> torch.Tensor:
        x, y = data
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _timed(step: Callable[[Data], torch.Tensor], data: Data) -> float:
    t0 = time.perf_counter()
    step(data).item()  # host sync, as the training loop does once per step
    return time.perf_counter() - t0


def main() -> None:
    """Time the arms side by side and print the ratios to fp32."""
    if not torchao_available():
        print("benchmarks/fp8.py: torchao is not installed (pip install 'mpaudit[fp8]'); nothing measured")
        return
    run = RunContext(task=mlp_task("fp8_bench"), device=torch.device("cpu"))
    steps = {name: _arm_step(prepare_arm(run, ARMS[name], SEED)) for name in ARMS_TIMED}
    torch.manual_seed(SEED)
    steps[DIRECT] = _direct_step(mlp())
    data = batch()
    print(f"MLP {'->'.join(map(str, WIDTHS))}, batch {BATCH}, AdamW, {torch.get_num_threads()} threads; "
          f"load average {load_average()}")
    for _ in range(WARMUP_STEPS):
        for step in steps.values():
            _timed(step, data)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(TIMED_ROUNDS):
        for name, step in steps.items():
            times[name].append(_timed(step, data))
    ratios = {name: statistics.median(t / f for t, f in zip(times[name], times["fp32"], strict=True))
              for name in steps}
    for name in steps:
        print(f"{name:>14}: median {statistics.median(times[name]) * 1e3:8.1f} ms over {TIMED_ROUNDS} steps, "
              f"/fp32 = {ratios[name]:5.2f}")
    verdict = "meets" if ratios["fp8"] <= EMULATED_GOAL else "misses"
    print(f"emulated fp8 (tensorwise)/fp32 = {ratios['fp8']:.2f} ({verdict} the goal of <= {EMULATED_GOAL}); "
          f"torchao's own emulation/fp32 = {ratios[DIRECT]:.2f}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
