"""``mpaudit.keep_fp32``: chosen modules run in fp32 inside autocast, and the change undoes itself."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import mpaudit
from conftest import Scale
from mpaudit.arms import ARMS
from mpaudit.run.precision import autocast, step_context
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import load_task
from mpaudit.run.train import TrainSpec, train_arm


def overflow_model() -> nn.Module:
    """The layout of conftest's OVERFLOW_TASK: ``amp`` lifts activations past fp16's max, ``down`` undoes it."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 32), amp=Scale(1e6), fc2=nn.Linear(32, 32), down=Scale(1e-6), act=nn.ReLU(),
        head=nn.Linear(32, 3),
    ))


def fp16_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    arm = ARMS["fp16"]
    with step_context(arm, "cpu", "emulate"), autocast(arm, "cpu"):
        return model(x)


def output_dtypes(model: nn.Module) -> tuple[dict[str, torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    seen: dict[str, torch.dtype] = {}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.dtype))
        for name, m in model.named_modules() if name
    ]
    return seen, handles


def test_keeping_the_overflowing_layers_makes_fp16_finite_and_undoes_itself_on_exit() -> None:
    model = overflow_model()
    x = torch.randn(16, 8)
    reference = model(x)
    assert not torch.isfinite(fp16_forward(model, x)).all()  # amp's 1e6-scale outputs are inf in fp16
    with mpaudit.keep_fp32(model, ["amp", "fc2"]):
        kept = fp16_forward(model, x)
    assert torch.isfinite(kept).all()
    torch.testing.assert_close(kept.float(), reference, atol=0.05, rtol=0.05)
    assert not torch.isfinite(fp16_forward(model, x)).all()  # the hooks are gone


def test_only_the_kept_modules_and_their_children_run_in_fp32() -> None:
    model = nn.Sequential(OrderedDict(
        block=nn.Sequential(OrderedDict(inner=nn.Linear(8, 8), act=nn.ReLU())), out=nn.Linear(8, 4),
    ))
    seen, handles = output_dtypes(model)
    handle = mpaudit.keep_fp32(model, ["block"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8))
        assert torch.is_autocast_enabled("cpu")  # restored after the kept module returned
    assert seen["block.inner"] == torch.float32
    assert seen["out"] == torch.bfloat16  # autocast casts the fp32 tensor at the next matmul, as usual
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8))
    assert seen["block.inner"] == torch.bfloat16
    for h in handles:
        h.remove()


def test_cast_back_returns_outputs_in_the_autocast_dtype() -> None:
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), tail=nn.Sequential(nn.ReLU())))
    inputs: list[torch.dtype] = []
    model.tail.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].dtype))
    with mpaudit.keep_fp32(model, ["a"], cast_back=True), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 4))
    assert inputs == [torch.bfloat16]  # cast back before anything downstream sees it
    assert out.dtype == torch.bfloat16
    with mpaudit.keep_fp32(model, ["a"]), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 4))
    assert out.dtype == torch.float32  # by default the fp32 output flows on (ReLU is not an autocast op)


def test_a_module_called_twice_and_nested_kept_modules_work() -> None:
    inner = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(self.inner(x))

    model = nn.Sequential(OrderedDict(twice=Twice(), out=nn.Linear(4, 2)))
    seen, _ = output_dtypes(model)
    with mpaudit.keep_fp32(model, ["twice", "twice.inner"]), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 4)).sum().backward()
        assert torch.is_autocast_enabled("cpu")
    assert seen["twice.inner"] == torch.float32
    assert seen["out"] == torch.bfloat16
    assert inner.weight.grad is not None and torch.isfinite(inner.weight.grad).all()


def test_autocast_is_restored_when_a_kept_module_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("boom")

    model = nn.Sequential(OrderedDict(boom=Boom()))
    with mpaudit.keep_fp32(model, ["boom"]), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="boom"):
            model(torch.randn(1, 2))
        assert torch.is_autocast_enabled("cpu")


def test_an_unknown_module_path_is_a_usage_error() -> None:
    with pytest.raises(mpaudit.UsageError, match="no module 'fc9'"):
        mpaudit.keep_fp32(overflow_model(), ["amp", "fc9"])


def test_fp16_arm_with_the_keep_list_trains_like_fp32(overflow_task: Path) -> None:
    task = load_task(overflow_task)
    run, spec = RunContext(task, torch.device("cpu")), TrainSpec(seed=0, steps=20, epochs=None, trace_every=0)
    fp32 = train_arm(run, ARMS["fp32"], spec).result
    plain = train_arm(run, ARMS["fp16"], spec).result
    kept = train_arm(run, ARMS["fp16"].with_changes(["amp", "fc2"]), spec).result
    assert plain.loss_scale is not None and plain.loss_scale.skipped == 20  # every step overflows
    assert plain.metrics["accuracy"] < fp32.metrics["accuracy"] - 0.2
    assert kept.name == "fp16+keep" and kept.status == "ok"
    assert kept.fingerprints == fp32.fingerprints  # same weights, same batches
    assert kept.metrics["accuracy"] == pytest.approx(fp32.metrics["accuracy"], abs=0.02)
    assert kept.loss_scale is not None and kept.loss_scale.skipped <= 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_keep_list_on_cuda() -> None:
    model = overflow_model().cuda()
    x = torch.randn(16, 8, device="cuda")
    reference = model(x)
    with torch.autocast("cuda", dtype=torch.float16):
        assert not torch.isfinite(model(x)).all()
        with mpaudit.keep_fp32(model, ["amp", "fc2"]):
            kept = model(x)
            kept.float().sum().backward()
    assert torch.isfinite(kept).all()
    torch.testing.assert_close(kept.float(), reference, atol=0.05, rtol=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
