"""Step time of the half-precision arms on a CPU against fp32: emulated fp16 (both op policies), native fp16, bf16.

Part 1, the benchmark MLP 1024 -> 4096 -> 4096 -> 10 (batch 256, AdamW): times ``mpaudit.run.step.train_step``
for the fp32 arm, the fp16 arm emulated (:func:`mpaudit.run.precision.step_context`: fp16 tensor-core numerics)
under CUDA's op policy (the default) and under CPU's (``--autocast-policy cpu``), and the fp16 arm run natively
(only a couple of steps: each takes tens of seconds). Prints the ratios ``emulated/fp32`` (goal: at most
``EMULATED_GOAL``) and ``native/fp32``.

Part 2, a pre-LayerNorm transformer block (``TRANSFORMER``: LayerNorm, softmax attention, GELU MLP), where the ops
CUDA autocast runs in fp32 matter: under CPU's op policy ``layer_norm``, ``softmax`` and the reductions hit CPU half
kernels; under CUDA's they run in fp32, as on a GPU. Prints the fp16/fp32 and bf16/fp32 step ratios under
``--autocast-policy cpu`` and ``cuda`` side by side.

Part 3, an LSTM classifier (``LSTM``: a 2-layer ``nn.LSTM`` over 28 steps of 28 features, hidden 128, batch 64, a
linear head on the last hidden state, AdamW): on a CPU its fp16 layers run through :mod:`mpaudit.run.fp16_rnn`, a
Python loop over time steps that rounds the hidden state to fp16 at every step, against oneDNN's fused fp32 LSTM.
Prints the emulated fp16 step over the fp32 step (the design keeps per-step rounding while this stays at most
``LSTM_GOAL``) twice: wall time with every thread, and this process's CPU time on one thread. On a shared machine the
second is the steadier: the emulation's many small multi-threaded ops each wait for every thread, which a busy
neighbour delays.

Steps are interleaved after warm-up and each ratio is the median over rounds of the arm's step time over fp32's
in the same round, so a busy neighbour on the CPU slows every arm alike; the load average is printed. Run:
``python benchmarks/fp16_emulation.py [mlp] [transformer] [lstm]`` (the parts named, all by default; about 5 minutes
on 2 idle cores, the native steps dominate).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from mpaudit.arms import ARMS
from mpaudit.run.precision import make_scaler, step_context
from mpaudit.run.step import train_step
from mpaudit.run.task import Task
from workload import BATCH, WIDTHS, load_average, mlp, mlp_task

WARMUP_STEPS = 2
"""Untimed steps per fast arm (allocator and oneDNN warm-up)."""
TIMED_ROUNDS = 9
"""Interleaved rounds of one step of every fast arm."""
NATIVE_ROUNDS = (1, 4)
"""Rounds after which one native fp16 step is timed (each is slow, so only a couple)."""
EMULATED_GOAL = 1.3
"""Emulated fp16 should cost at most this many fp32 steps on the MLP."""
SEED = 0

TRANSFORMER = {"batch": 32, "tokens": 128, "width": 256, "heads": 4, "classes": 10}
"""The transformer-block workload of part 2."""
LSTM = {"batch": 64, "steps": 28, "features": 28, "hidden": 128, "layers": 2, "classes": 10}
"""The LSTM workload of part 3 (the shape of a row-by-row image classifier)."""
LSTM_GOAL = 3.0
"""The emulated fp16 LSTM step should cost at most this many fp32 steps, or the emulation would round only what each
layer returns instead of the hidden state of every time step."""


class _Runner:
    """One arm's model, optimizer and scaler, and the step context it runs in (fp16 emulation, op policy)."""

    def __init__(self, label: str, arm_name: str, model: nn.Module, fp16_cpu: str = "emulate",
                 policy: str = "cuda", clock: Callable[[], float] = time.perf_counter) -> None:
        self.label = label
        self.arm = ARMS[arm_name]
        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scaler = make_scaler(self.arm, "cpu")
        self.fp16_cpu = fp16_cpu
        self.policy = policy
        self.emulated_calls: Counter[str] = Counter()
        self.times: list[float] = []
        self.clock = clock

    def step(self, task: Task, batch: tuple[torch.Tensor, torch.Tensor], timed: bool = True) -> None:
        t0 = self.clock()
        # A fresh context per step, as the training loop does; the emulation's fp32 buffers persist across steps.
        with step_context(self.arm, "cpu", self.fp16_cpu, self.policy) as mode:
            loss = train_step(task, self.arm, self.model, self.optimizer, self.scaler, batch, "cpu")
        if mode is not None:
            self.emulated_calls = mode.calls
        loss.item()  # host sync, as the training loop does once per step
        if timed:
            self.times.append(self.clock() - t0)

    def median(self) -> float:
        return statistics.median(self.times)


def _interleave(runners: Sequence[_Runner], task: Task, batch: tuple[torch.Tensor, torch.Tensor],
                slow: _Runner | None = None) -> None:
    """Warm up, then time ``TIMED_ROUNDS`` rounds of one step per runner (``slow`` only after ``NATIVE_ROUNDS``)."""
    for _ in range(WARMUP_STEPS):
        for r in runners:
            r.step(task, batch, timed=False)
    for round_ in range(TIMED_ROUNDS):
        for r in runners:
            r.step(task, batch)
        if slow is not None and round_ in NATIVE_ROUNDS:
            slow.step(task, batch)
        print(f"  round {round_ + 1}/{TIMED_ROUNDS} done", flush=True)


def _ratio(runner: _Runner, fp32: _Runner) -> float:
    """The median over rounds of this runner's step time over the fp32 step time of the same round (paired, so a
    load change on a shared machine between rounds cancels); the ratio of medians for a runner timed less often."""
    if len(runner.times) != len(fp32.times):
        return runner.median() / fp32.median()
    return statistics.median(t / f for t, f in zip(runner.times, fp32.times, strict=True))


def _report(runner: _Runner, fp32: _Runner) -> str:
    return (f"{runner.label:>22}: median {runner.median() * 1e3:8.1f} ms over {len(runner.times)} steps, "
            f"/fp32 = {_ratio(runner, fp32):6.2f}")


# ------------------------------------------------------------------------------------------------ part 1


def mlp_benchmark() -> None:
    """fp32 vs emulated fp16 (cuda and cpu op policies) vs native fp16 on the benchmark MLP."""
    torch.manual_seed(SEED)
    model = mlp()
    batch = (torch.randn(BATCH, WIDTHS[0]), torch.randint(WIDTHS[-1], (BATCH,)))
    task = mlp_task("fp16_emulation_bench")
    fp32 = _Runner("fp32", "fp32", model)
    emulated = _Runner("fp16 emulated, cuda ops", "fp16", model, policy="cuda")
    emulated_cpu = _Runner("fp16 emulated, cpu ops", "fp16", model, policy="cpu")
    native = _Runner("fp16 native, cpu ops", "fp16", model, fp16_cpu="native", policy="cpu")
    print(f"MLP {'->'.join(map(str, WIDTHS))}, batch {BATCH}, AdamW, {torch.get_num_threads()} threads; "
          f"load average {load_average()}")
    _interleave([fp32, emulated, emulated_cpu], task, batch, slow=native)
    for r in (fp32, emulated, emulated_cpu, native):
        print(_report(r, fp32))
    ratio = _ratio(emulated, fp32)
    verdict = "meets" if ratio <= EMULATED_GOAL else "misses"
    print(f"emulated/fp32 = {ratio:.2f} ({verdict} the goal of <= {EMULATED_GOAL})")
    print("emulated op calls in the last step:", dict(emulated.emulated_calls))


# ------------------------------------------------------------------------------------------------ part 2


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block (LayerNorm, multi-head attention with an explicit softmax, GELU MLP) and a linear head
    on the mean token: LayerNorm, softmax and the reductions are ops CUDA autocast runs in fp32."""

    def __init__(self, width: int, heads: int, classes: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(b, t, c))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def _classifier_task(name: str) -> Task:
    """An in-memory task whose loss is cross-entropy of the model's logits on the batch (x, y)."""
    module = ModuleType(name)

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    module.loss_fn = loss_fn  # type: ignore[attr-defined]
    return Task(path=Path(f"{name}.py"), sha256="", module=module)


def _transformer_task() -> tuple[nn.Module, Task, tuple[torch.Tensor, torch.Tensor]]:
    cfg = TRANSFORMER
    torch.manual_seed(SEED)
    model = TransformerBlock(cfg["width"], cfg["heads"], cfg["classes"])
    batch = (torch.randn(cfg["batch"], cfg["tokens"], cfg["width"]), torch.randint(cfg["classes"], (cfg["batch"],)))
    return model, _classifier_task("transformer_block_bench"), batch


def transformer_benchmark() -> None:
    """fp16 (emulated) and bf16 against fp32 on the transformer block, under each op policy."""
    model, task, batch = _transformer_task()
    fp32 = _Runner("fp32", "fp32", model)
    runners: dict[tuple[str, str], _Runner] = {
        (arm, policy): _Runner(f"{arm} {policy} ops", arm, model, policy=policy)
        for arm in ("fp16", "bf16") for policy in ("cpu", "cuda")
    }
    cfg = TRANSFORMER
    print(f"\nTransformer block: batch {cfg['batch']}, {cfg['tokens']} tokens, width {cfg['width']}, "
          f"{cfg['heads']} heads, AdamW, {torch.get_num_threads()} threads; load average {load_average()}")
    _interleave([fp32, *runners.values()], task, batch)
    for r in (fp32, *runners.values()):
        print(_report(r, fp32))
    print(f"{'arm':>6} | {'/fp32, --autocast-policy cpu':>28} | {'/fp32, --autocast-policy cuda':>29}")
    for arm in ("fp16", "bf16"):
        cpu, cuda = _ratio(runners[(arm, "cpu")], fp32), _ratio(runners[(arm, "cuda")], fp32)
        print(f"{arm:>6} | {cpu:28.2f} | {cuda:29.2f}")
    print(f"load average after: {load_average()}")


# ------------------------------------------------------------------------------------------------ part 3


class LSTMClassifier(nn.Module):
    """A stacked LSTM over the time steps of its input and a linear head on the top layer's last hidden state."""

    def __init__(self, features: int, hidden: int, layers: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[1][0][-1])


def lstm_benchmark() -> None:
    """Emulated fp16 (each time step's hidden state rounded to fp16) against fp32 on the LSTM classifier: wall time
    with every thread, then this process's CPU time on one thread."""
    cfg = LSTM
    torch.manual_seed(SEED)
    model = LSTMClassifier(cfg["features"], cfg["hidden"], cfg["layers"], cfg["classes"])
    batch = (torch.randn(cfg["batch"], cfg["steps"], cfg["features"]), torch.randint(cfg["classes"], (cfg["batch"],)))
    task = _classifier_task("lstm_bench")
    threads = torch.get_num_threads()
    print(f"\nLSTM classifier: batch {cfg['batch']}, {cfg['steps']} time steps of {cfg['features']} features, hidden "
          f"{cfg['hidden']}, {cfg['layers']} layers, AdamW; load average {load_average()}")
    ratios = {}
    for n_threads, clock, label in ((threads, time.perf_counter, f"wall time, {threads} threads"),
                                    (1, time.process_time, "CPU time, 1 thread")):
        torch.set_num_threads(n_threads)
        fp32 = _Runner("fp32", "fp32", model, clock=clock)
        emulated = _Runner("fp16 emulated", "fp16", model, clock=clock)
        print(f"{label}:")
        _interleave([fp32, emulated], task, batch)
        for r in (fp32, emulated):
            print(_report(r, fp32))
        ratios[label] = _ratio(emulated, fp32)
    torch.set_num_threads(threads)
    for label, ratio in ratios.items():
        verdict = "meets" if ratio <= LSTM_GOAL else "misses"
        print(f"emulated fp16 LSTM step/fp32 ({label}) = {ratio:.2f} ({verdict} the goal of <= {LSTM_GOAL})")
    print("emulated op calls in the last step:", dict(emulated.emulated_calls))
    print(f"load average after: {load_average()}")


PARTS = {"mlp": mlp_benchmark, "transformer": transformer_benchmark, "lstm": lstm_benchmark}


def main(parts: Sequence[str] = ()) -> None:
    """Run the parts named (all by default) and print medians and ratios."""
    for name in parts or PARTS:
        PARTS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
