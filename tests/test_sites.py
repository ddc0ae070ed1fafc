"""Where non-finite values start: the replayed op, its module (a container's own code included), the source line;
and the audit's root causes on models whose trouble starts inside a module's forward or in its first layer."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mpaudit
from mpaudit.arms import ARMS
from mpaudit.run.prepare import RunContext, prepare_arm
from mpaudit.run.task import load_task
from mpaudit.trace.sites import RngState, locate

SUITES = Path(__file__).resolve().parent.parent / "suites"

ATTENTION = textwrap.dedent('''
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            nn.init.normal_(self.q.weight, std=20.0)
            nn.init.normal_(self.k.weight, std=20.0)

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            scores = q @ k.transpose(-2, -1)
            return torch.softmax(scores, dim=-1) @ self.v(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.attn(x).mean(1))

    def build_model():
        return Model()

    def train_loader():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 6, 16, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]

    def loss_fn(model, batch):
        x, y = batch
        mask = torch.zeros(6, 6).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))  # by design
        _ = torch.softmax(mask + 1.0, dim=-1)
        return nn.functional.cross_entropy(model(x), y)
''')
SCORE_LINE = "scores = q @ k.transpose(-2, -1)"


@pytest.fixture
def attention_task(write_task: Callable[..., Path]) -> Path:
    return write_task(ATTENTION, name="attention.py")


def _replay(task_path: Path, arm: str) -> tuple[mpaudit.results.model.Site | None, ...]:
    run = RunContext(load_task(task_path), torch.device("cpu"))
    prepared = prepare_arm(run, ARMS[arm], 0)
    batch = next(iter(run.task.train_loader()))
    before = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    rng = RngState()
    after = torch.rand(1)
    rng.restore()
    sites = locate(prepared, batch, 0, 65536.0 if arm == "fp16" else None, rng)
    assert torch.rand(1) == after  # the random state is left where the step left it
    for name, value in prepared.model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in prepared.model.parameters())
    return sites


def test_an_overflow_in_a_containers_own_forward_is_found_at_its_op_and_line(attention_task: Path) -> None:
    forward, backward = _replay(attention_task, "fp16")
    assert forward is not None and backward is None  # the backward's NaN follow from the forward
    assert forward.module == "attn" and forward.module_class == "Attention"
    assert forward.op.startswith("aten.bmm") and forward.dtype == "float16"
    assert forward.source == f"{attention_task}:{ATTENTION.splitlines().index('        ' + SCORE_LINE) + 1}"
    assert forward.code == SCORE_LINE
    assert any("softmax" in op for op in forward.feeds)
    assert "inf in" in forward.detail


def test_a_mask_filled_with_inf_by_design_is_not_an_origin(attention_task: Path) -> None:
    forward, backward = _replay(attention_task, "bf16")  # bf16's range holds the scores: only the mask is inf
    assert forward is None and backward is None


def test_a_backward_origin_is_attributed_to_the_module_whose_forward_made_it(write_task: Callable[..., Path]) -> None:
    path = write_task('''
import torch
from torch import nn

class RootAct(nn.Module):
    def forward(self, x):
        return torch.sqrt(torch.relu(x))  # finite forward; the gradient of sqrt at 0 is infinite

def build_model():
    return nn.Sequential(nn.Linear(4, 8), RootAct(), nn.Linear(8, 1))

def train_loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 4, generator=g), torch.zeros(16, 1))]

def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
''', name="grad.py")
    forward, backward = _replay(path, "fp32")
    assert forward is None and backward is not None
    assert backward.phase == "backward" and backward.module == "1" and backward.module_class == "RootAct"
    assert "SqrtBackward0" in backward.op
    assert backward.source == f"{path}:7" and backward.code.startswith("return torch.sqrt(torch.relu(x))")


def test_the_audit_roots_an_attention_overflow_at_the_attention_module() -> None:
    result = mpaudit.audit(SUITES / "attention_overflow" / "model.py", arms=("fp32", "fp16"), steps=30, bench=False,
                           verify=True, verify_budget=2)
    roots = [f for f in result.flags if f.arm == "fp16" and f.severity == "error" and f.caused_by is None]
    assert len(roots) == 1
    (root,) = roots
    assert root.layer == "block.attn" and root.site is not None and root.site.module == "block.attn"
    assert "bmm" in root.site.op and root.site.code.startswith("scores = q @ k.transpose(-2, -1)")
    assert root.site.source.endswith("suites/attention_overflow/model.py:" + root.site.source.rsplit(":", 1)[1])
    assert "scaled_dot_product_attention" in root.recommendation  # the rescaling advice, marked unverified
    assert all(f.recommendation == "" for f in result.flags if f.caused_by is not None)
    (rec,) = result.recommendations
    assert rec.passed and "block.attn" in rec.keep_fp32 and "minimal" in rec.reason
    kept = result.verification[rec.verified_arm or ""]
    assert abs(kept.metrics["accuracy"] - result.arms["fp32"].metrics["accuracy"]) <= 0.03


def test_a_first_layer_overflow_is_the_only_root() -> None:
    result = mpaudit.audit(SUITES / "fp16_overflow" / "model.py", arms=("fp32", "fp16"), steps=30, bench=False)
    roots = [(f.kind, f.layer) for f in result.flags if f.severity == "error" and f.caused_by is None]
    assert roots == [("forward_overflow", "input_proj")]
    consequences = [f for f in result.flags if f.caused_by is not None]
    assert consequences and all(f.caused_by.layer == "input_proj" for f in consequences)  # type: ignore[union-attr]
    assert not [f for f in result.flags if f.kind == "loss_scale" and f.caused_by is None]
