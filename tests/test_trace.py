"""The tracer: on-device statistics equal a numpy reference, hooks leave the model as it was, no host syncs."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import Scale
from mpaudit.errors import UsageError
from mpaudit.numerics.formats import hist_from_values
from mpaudit.numerics.layerstats import ROOT_LAYER, NonfiniteSite, TensorStats, TraceSummary
from mpaudit.trace import reduce
from mpaudit.trace.tracer import UPDATE_SAMPLE, Tracer, TraceSchedule, select_modules

pytestmark = pytest.mark.usefixtures("reductions")  # every test on the one-pass kernel and the torch reductions


class Emit(nn.Module):
    """Returns its input: a leaf module whose traced output is exactly the tensor fed to it."""

    def forward(self, x: Any) -> Any:
        return x


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def _awkward_tensor(seed: int, n: int = 3000) -> torch.Tensor:
    """Magnitudes over fp32's whole range, both signs, zeros of both signs, NaN, ±Inf, fp32 subnormals."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.randint(-140, 100, (n,), generator=g).double()
    x = (torch.rand(n, generator=g, dtype=torch.float64) + 1) * 2.0**exps
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x).float()
    special = torch.tensor([0.0, -0.0, 0.0, math.nan, math.inf, -math.inf, -math.inf, 1e-40, -3e-45, 3e38])
    x[torch.randperm(n, generator=g)[: len(special)]] = special
    return x


def _reference(t: torch.Tensor) -> TensorStats:
    return TensorStats.from_array(t.detach().float().double().numpy(), str(t.dtype).removeprefix("torch."))


def _assert_stats_equal(got: TensorStats, want: TensorStats) -> None:
    assert (got.count, got.zeros, got.nan, got.posinf, got.neginf, got.dtype) == (
        want.count,
        want.zeros,
        want.nan,
        want.posinf,
        want.neginf,
        want.dtype,
    )
    assert got.max_abs == want.max_abs
    assert got.min_nonzero_abs == want.min_nonzero_abs
    assert got.sum_abs == pytest.approx(want.sum_abs, rel=1e-5)
    assert np.array_equal(got.hist, want.hist)


def _trace_output(model: nn.Module, *inputs: Any, **kw: Any) -> TraceSummary:
    tracer = Tracer(model, **kw)
    with tracer:
        tracer.start_step(0)
        model(*inputs)
        summary = tracer.finish_step()
    assert summary is not None
    return summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("bincount", [True, False])
def test_device_stats_equal_numpy_reference(
    dtype: torch.dtype, contiguous: bool, seed: int, staged: bool, bincount: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not staged:  # every tensor takes the large tensors' path: reduced on its own, right away
        monkeypatch.setattr(reduce, "SMALL_TENSOR", 1)
    if not bincount:  # the histograms a GPU takes: index_add_ of ones
        monkeypatch.setattr(reduce, "BINCOUNT_DEVICES", ())
    x = _awkward_tensor(seed).to(dtype).reshape(60, 50)
    if not contiguous:
        x = x.t()
    got = _trace_output(Emit(), x).get(ROOT_LAYER, "activation")
    assert got is not None
    _assert_stats_equal(got, _reference(x))


def test_large_tensors_are_reduced_in_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reduce, "SMALL_TENSOR", 1)
    monkeypatch.setattr(reduce, "CHUNK", 700)
    x = _awkward_tensor(5).to(torch.float16).reshape(60, 50).t()
    got = _trace_output(Emit(), x).get(ROOT_LAYER, "activation")
    assert got is not None
    _assert_stats_equal(got, _reference(x))


def test_parameter_gradient_stats_equal_reference_and_calls_merge() -> None:
    model = nn.Linear(40, 30)
    grad = _awkward_tensor(3, 1200).reshape(30, 40)
    tracer = Tracer(model, updates=False)
    with tracer:
        tracer.start_step(0)
        model.weight.grad = grad.clone()
        model.bias.grad = torch.zeros(30)
        tracer.after_backward()
        tracer.after_backward()  # a second call on the same step merges, like a module called twice
        summary = tracer.finish_step()
    assert summary is not None
    want = _reference(grad)
    _assert_stats_equal(summary.get(ROOT_LAYER, "grad:weight"), want.merge(want))
    assert summary.get(ROOT_LAYER, "grad:bias").zeros == 60


def _hooks(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """Every module's own hooks, and the global module hooks."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    own = [(f"{path}.{n}", dict(getattr(m, n))) for path, m in model.named_modules() for n in names]
    return [*own, ("global", dict(nn.modules.module._global_forward_hooks))]


def test_hooks_are_removed_and_inplace_relu_after_traced_linear_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = torch.randn(5, 6)
    before = _hooks(model)

    # reference: the gradient w.r.t. the first Linear's output, without any tracer
    ref_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    ref_model.load_state_dict(model.state_dict())
    h = ref_model[0](x)
    h.retain_grad()
    ref_model[2](torch.relu(h)).square().sum().backward()
    assert h.grad is not None

    tracer = Tracer(model)
    with tracer:
        assert _hooks(model) == before  # untraced steps run without any hook
        tracer.start_step(0)
        assert _hooks(model) != before
        model(x).square().sum().backward()
        tracer.after_backward()
        summary = tracer.finish_step()
        assert _hooks(model) == before
    assert _hooks(model) == before
    assert summary is not None
    _assert_stats_equal(summary.get("0", "grad_output"), _reference(h.grad))
    assert torch.equal(model[0].weight.grad, ref_model[0].weight.grad)

    # after the block, a forward/backward is untouched by the tracer
    model.zero_grad()
    model(x).square().sum().backward()
    assert tracer.summary().steps == (0,)


def test_a_parameter_returned_as_output_gets_no_lasting_hook() -> None:
    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self) -> torch.Tensor:
            return self.weight

    model = Table()
    tracer = Tracer(model)
    with tracer:
        tracer.start_step(0)
        model().sum().backward()
        tracer.after_backward()
        summary = tracer.finish_step()
    assert not model.weight._backward_hooks
    assert summary is not None and summary.get(ROOT_LAYER, "grad:weight").count == 12


def test_hooks_are_inert_on_untraced_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)

    def ops_of_a_step() -> Counter[str]:
        model.zero_grad(set_to_none=True)
        with _OpLog() as log:
            model(x).sum().backward()
        return log.ops

    untraced = ops_of_a_step()
    tracer = Tracer(model)
    with tracer:
        assert ops_of_a_step() == untraced  # attached, but no start_step: not one extra op
        assert tracer.finish_step() is None
        tracer.after_backward()
    assert tracer.summary() == TraceSummary()


def test_shared_module_and_structured_outputs_merge_their_tensors() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    class Structured(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return x * 2, {"doubled": x * 4, "index": torch.arange(3)}

    model = Twice()
    x = torch.randn(3, 4, requires_grad=True)
    tracer = Tracer(model)
    with tracer:
        tracer.start_step(0)
        model(x).sum().backward()
        tracer.after_backward()
        summary = tracer.finish_step()
    assert summary is not None
    assert summary.get("fc", "activation").count == 24
    assert summary.get("fc", "grad_output").count == 24
    assert summary.get("fc", "grad:weight").count == 16

    out = _trace_output(Structured(), torch.randn(3, 4)).get(ROOT_LAYER, "activation")
    assert out is not None and out.count == 24  # the int tensor is not traced


def test_first_nonfinite_output_in_forward_order_is_the_overflowing_middle_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Scale(1e30), Scale(1e30), nn.Linear(8, 2))
    summary = _trace_output(model, torch.randn(3, 4))
    assert summary.first_nonfinite_forward == NonfiniteSite("2", "activation", 0)
    assert summary.get("1", "activation").nonfinite == 0
    assert summary.get("3", "activation").nonfinite > 0  # downstream layers inherit it


def test_first_nonfinite_gradient_in_backward_order() -> None:
    torch.manual_seed(0)
    # sqrt at relu's zeros has an infinite derivative: the gradient w.r.t. the ReLU's output turns inf/NaN
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Sqrt(), nn.Linear(8, 2))
    tracer = Tracer(model)
    with tracer:
        tracer.start_step(7)
        model(torch.randn(16, 4)).sum().backward()
        tracer.after_backward()
        summary = tracer.finish_step()
    assert summary is not None
    assert summary.first_nonfinite_forward is None
    assert summary.first_nonfinite_backward == NonfiniteSite("1", "grad_output", 7)
    assert summary.get("2", "grad_output").nonfinite == 0


def _train(seed: int, steps: int = 3, **tracer_kw: Any) -> TraceSummary:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    tracer = Tracer(model, **tracer_kw)
    with tracer:
        for step in range(steps):
            tracer.start_step(step, None)
            nn.functional.cross_entropy(model(x), y).backward()
            tracer.after_backward()
            opt.step()
            tracer.after_optimizer_step()
            opt.zero_grad()
            tracer.finish_step()
    return tracer.summary()


def test_same_seed_same_statistics() -> None:
    a, b = _train(0), _train(0)
    assert a == b
    assert json.dumps(a.to_dict(), allow_nan=False) == json.dumps(b.to_dict(), allow_nan=False)
    assert a != _train(1)


def test_update_statistics_are_the_step_relative_to_the_weights_binade() -> None:
    torch.manual_seed(0)
    big = nn.Linear(300, 300, bias=False)  # 90000 weights: sampled
    small = nn.Linear(300, 7)
    model = nn.Sequential(big, small)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    tracer = Tracer(model)
    with tracer:
        tracer.start_step(0)
        model(torch.randn(4, 300)).square().mean().backward()
        tracer.after_backward()
        opt.step()
        tracer.after_optimizer_step()
        summary = tracer.finish_step()
    assert summary is not None
    after = list(model.parameters())

    def relative(b: torch.Tensor, a: torch.Tensor) -> np.ndarray:
        b64, a64 = b.double().numpy().ravel(), a.detach().double().numpy().ravel()
        return (a64 - b64) / 2.0 ** np.floor(np.log2(np.abs(b64)))

    r_small = relative(before[1], after[1])
    got = summary.get("1", "update:weight")
    assert got.count == r_small.size and np.array_equal(got.hist, hist_from_values(r_small))
    assert math.isnan(got.max_abs)  # update records keep counts and the histogram only

    r_big = relative(before[0], after[0])
    got = summary.get("0", "update:weight")
    assert got.count == UPDATE_SAMPLE
    full = hist_from_values(r_big)
    # the sample's binade distribution matches the full one
    assert np.abs(got.hist / got.hist.sum() - full / full.sum()).max() < 0.02


def test_no_host_sync_while_tracing(reductions: str) -> None:
    """Every op the tracer dispatches during a step: none reads a device value back (item/.cpu) except
    the one copy in finish_step, and none has a data-dependent output size (CPU histograms use bincount
    with a fixed minlength over keys below it; CUDA ones index_add_). The one-pass kernel bins nothing through
    torch at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 8)
    tracer = Tracer(model)
    with tracer:
        for step in range(2):  # the second step runs with every buffer already allocated
            tracer.start_step(step)
            with _OpLog() as hot:
                model(x).square().mean().backward()
                tracer.after_backward()
            opt.step()  # (the optimizer's own syncs are not the tracer's)
            with _OpLog() as hot_update:
                tracer.after_optimizer_step()
            with _OpLog() as finish:
                tracer.finish_step()
            opt.zero_grad()
    syncing = {"_local_scalar_dense", "item", "nonzero", "unique", "masked_select", "_to_copy"}
    assert not syncing & set(hot.ops) and not syncing & set(hot_update.ops)
    assert finish.ops["_to_copy"] == 0  # on a CPU the buffer is read in place (a GPU copies it once)
    assert not {"_local_scalar_dense", "item"} & set(finish.ops)
    if reductions == "native":
        assert not hot.bincount_sizes and not hot_update.bincount_sizes and not finish.bincount_sizes
        return
    # fixed-size histograms, 1024 bins per tensor: 4 updates, then 3 outputs, 3 output gradients, 4 gradients
    # (small tensors: staged, and binned together when the step finishes)
    assert sum(hot_update.bincount_sizes) == 4 * 1024
    assert not hot.bincount_sizes and sum(finish.bincount_sizes) == 10 * 1024


def test_schedule() -> None:
    s = TraceSchedule(every=10, follow=2, max_anomaly_traces=3)
    assert [step for step in range(25) if s.wants(step)] == [0, 10, 20]
    s.notify_anomaly(4)  # traces 5 and 6
    s.notify_anomaly(11)  # traces 12; 13 would exceed the budget of 3 extra steps
    s.notify_anomaly(15)  # budget spent
    assert [step for step in range(25) if s.wants(step)] == [0, 5, 6, 10, 12, 20]
    off = TraceSchedule(every=0)
    off.notify_anomaly(3)
    assert not any(off.wants(step) for step in range(10))
    with pytest.raises(UsageError):
        TraceSchedule(every=-1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_module_selection() -> None:
    model = _Net()
    assert select_modules(model) == ["blocks.0.fc", "blocks.0.act", "blocks.1.fc", "blocks.1.act", "head"]
    assert select_modules(model, depth=2) == ["blocks.0", "blocks.1", "head"]
    assert select_modules(model, include=["blocks.1"]) == [
        "blocks.0.fc",
        "blocks.0.act",
        "blocks.1",
        "blocks.1.fc",
        "blocks.1.act",
        "head",
    ]
    with pytest.raises(UsageError, match=r"no module 'blocks\.7'"):
        select_modules(model, include=["blocks.7"])

    # a container's parameters belong to the deepest selected module holding them
    tracer = Tracer(model, depth=2)
    with tracer:
        tracer.start_step(0)
        model(torch.randn(3, 4)).sum().backward()
        tracer.after_backward()
        summary = tracer.finish_step()
    assert summary is not None
    assert summary.layers == ("blocks.0", "blocks.1", "head")
    assert summary.roles("blocks.0") == ["activation", "grad_output", "grad:fc.bias", "grad:fc.weight"]


def test_autocast_fp16_arm_records_dtypes_and_loss_scale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    tracer = Tracer(model)
    with tracer:
        tracer.start_step(0, scaler.get_scale())
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 4, (16,)))
        scaler.scale(loss).backward()
        tracer.after_backward()
        scaler.step(opt)
        scaler.update()
        tracer.after_optimizer_step()
        summary = tracer.finish_step()
    assert summary is not None
    assert summary.loss_scales == (65536.0,) and summary.scale_log2 == 16
    assert summary.get("0", "activation").dtype == "float16"
    assert summary.get("0", "grad_output").dtype == "float16"
    assert summary.get("0", "grad:weight").dtype == "float32"  # master weights stay fp32


class _OpLog(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (by their short name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.bincount_sizes: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        out = func(*args, **(kwargs or {}))
        if name == "bincount":
            self.bincount_sizes.append(out.numel())
        return out
