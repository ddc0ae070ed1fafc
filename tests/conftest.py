"""Shared fixtures: tiny task files written to a temp folder, so every test runs in seconds on 2 cores."""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import mpaudit
from mpaudit.trace import native, reduce

_KERNEL_CACHE = tempfile.mkdtemp(prefix="mpaudit-test-kernels-")
os.environ["MPAUDIT_CACHE_DIR"] = _KERNEL_CACHE  # tests (and the runs they start) build the kernel here, once

# A tiny, learnable 3-class problem. Widths are small because native fp16 on a CPU is slow.
TINY_TASK = '''
import torch
from torch import nn

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]

def build_model():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

def build_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)

def train_loader():
    return _data(1)

def eval_loader():
    return _data(2)

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)

def evaluate(model, loader):
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return {"accuracy": correct / total}
'''

# Same problem, but a layer amplifies activations past fp16's max (65504) and the next scales them back:
# fine in fp32 and bf16, inf in fp16 at module path "amp".
OVERFLOW_TASK = TINY_TASK.replace(
    "def build_model():\n    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
    '''class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor
    def forward(self, x):
        return x * self.factor

def build_model():
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 32), amp=Scale(1e6), fc2=nn.Linear(32, 32), down=Scale(1e-6),
        act=nn.ReLU(), head=nn.Linear(32, 3),
    ))''',
).replace("import torch\n", "from collections import OrderedDict\nimport torch\n", 1)


class Scale(nn.Module):
    """Multiplies its input by a constant: lifts activations past fp16's max, or scales them back down."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.fixture
def write_task(tmp_path: Path) -> Callable[..., Path]:
    """Write a task file into the test's temp folder and return its path."""

    def write(source: str = TINY_TASK, name: str = "model.py", **replace: str) -> Path:
        text = textwrap.dedent(source)
        for old, new in replace.items():
            text = text.replace(old, new)
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def tiny_task(write_task: Callable[..., Path]) -> Path:
    return write_task(TINY_TASK)


@pytest.fixture
def overflow_task(write_task: Callable[..., Path]) -> Path:
    return write_task(OVERFLOW_TASK, name="overflow.py")


@pytest.fixture(scope="session")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> mpaudit.AuditResult:
    """One real audit of the tiny task (three arms, traced, speed and memory measured), shared by the tests that
    only read a result."""
    path = tmp_path_factory.mktemp("tiny") / "model.py"
    path.write_text(textwrap.dedent(TINY_TASK))
    return mpaudit.audit(path, steps=12, trace_every=5, bench_seconds=0.2)


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache() -> Iterator[None]:
    yield
    shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)


@pytest.fixture
def torch_reductions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trace with the torch reductions: the path of GPUs, and of CPUs without a C compiler."""
    monkeypatch.setattr(reduce, "native_kernel", lambda: native.Unavailable("the torch reductions, for a test"))


@pytest.fixture(params=["native", "torch"])
def reductions(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each of the two ways a CPU reduces traced tensors: the one-pass kernel and the torch reductions."""
    if request.param == "torch":
        monkeypatch.setattr(reduce, "native_kernel", lambda: native.Unavailable("the torch reductions, for a test"))
    else:
        if native._compiler() is None:
            pytest.skip("no C compiler here: the one-pass kernel cannot be built")
        kernel = reduce.native_kernel()
        assert isinstance(kernel, native.Kernel), kernel  # a compiler is there: the kernel must build and pass
    return str(request.param)
