"""Batched reductions: small tensors staged and reduced together give exactly the statistics of reducing each
tensor on its own, whatever the staging bound, in-place changes after a hook, or the number of layers.

These are the torch reductions' (GPUs, and CPUs without a C compiler); the CPU's one-pass kernel is checked against
them in ``test_native.py``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from test_trace import _assert_stats_equal, _awkward_tensor, _OpLog, _reference
from torch import nn

from conftest import Scale
from mpaudit.numerics.layerstats import ROOT_LAYER, NonfiniteSite, TensorStats, TraceSummary
from mpaudit.trace import reduce
from mpaudit.trace.tracer import Tracer

pytestmark = pytest.mark.usefixtures("torch_reductions")

class Emitters(nn.Module):
    """Child ``i`` returns fixed tensor ``i``: many awkward outputs in one step."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.emit = nn.ModuleList(_Emit(t) for t in tensors)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x) for m in self.emit]


class _Emit(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


def _awkward_set() -> list[torch.Tensor]:
    """Sizes from 0 to several staging rows (``reduce.ROW``), fp32/fp16/bf16, contiguous or not, specials
    everywhere."""
    out = []
    for i, n in enumerate([0, 1, 3, 10, 700, 1024, 1025, 3000, 5000, 2048, 64, 4097]):
        x = _awkward_tensor(i, max(n, 10))[:n]
        x = x.to([torch.float32, torch.float16, torch.bfloat16][i % 3])
        if n == 3000:
            x = x.reshape(60, 50).t()  # non-contiguous
        out.append(x)
    return out


def _trace(model: nn.Module, step: Callable[[], None], **kw: Any) -> TraceSummary:
    tracer = Tracer(model, **kw)
    with tracer:
        tracer.start_step(0)
        step()
        tracer.after_backward()
        summary = tracer.finish_step()
    assert summary is not None
    return summary


def _assert_summaries_equal(got: TraceSummary, want: TraceSummary) -> None:
    """Identical counts, histograms and extremes; sums within the reduction-order tolerance."""
    assert set(got.stats) == set(want.stats)
    for key, w in want.stats.items():
        g = got.stats[key]
        if math.isnan(w.max_abs):  # update rows: counts and histogram only
            assert math.isnan(g.max_abs) and math.isnan(g.min_nonzero_abs) and math.isnan(g.sum_abs)
            g = replace(g, max_abs=0.0, min_nonzero_abs=0.0, sum_abs=0.0)
            w = replace(w, max_abs=0.0, min_nonzero_abs=0.0, sum_abs=0.0)
        _assert_stats_equal(g, w)
    assert got.layers == want.layers
    assert got.first_nonfinite_forward == want.first_nonfinite_forward
    assert got.first_nonfinite_backward == want.first_nonfinite_backward


def test_many_small_awkward_outputs_equal_the_numpy_reference() -> None:
    tensors = _awkward_set()
    model = Emitters(tensors)
    summary = _trace(model, lambda: model(torch.zeros(1)))
    for i, t in enumerate(tensors):
        got = summary.get(f"emit.{i}", "activation")
        if t.numel() == 0:
            assert got is None  # nothing to record
        else:
            assert got is not None
            _assert_stats_equal(got, _reference(t))


def _train_step(model: nn.Module, x: torch.Tensor, **kw: Any) -> TraceSummary:
    """One traced training step (updates included) on ``model``, from a fixed state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model, **kw)
    with tracer:
        tracer.start_step(0)
        model(x).square().mean().backward()
        tracer.after_backward()
        opt.step()
        tracer.after_optimizer_step()
        summary = tracer.finish_step()
    assert summary is not None
    return summary


def _deep(depth: int, width: int = 8, blow_up_at: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU() if i % 2 else nn.Tanh()]
        if i == blow_up_at:
            layers += [Scale(1e30), Scale(1e30)]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def _same_step(monkeypatch: pytest.MonkeyPatch, make: Callable[[], nn.Module], x: torch.Tensor,
               **patch: int) -> tuple[TraceSummary, TraceSummary]:
    """The same training step traced with every tensor reduced on its own (the per-tensor path), then staged
    with ``patch`` applied to ``mpaudit.trace.reduce``."""
    with monkeypatch.context() as m:
        m.setattr(reduce, "SMALL_TENSOR", 1)
        alone = _train_step(make(), x)
    with monkeypatch.context() as m:
        for name, value in patch.items():
            m.setattr(reduce, name, value)
        staged = _train_step(make(), x)
    return staged, alone


def test_a_step_of_many_small_tensors_equals_the_per_tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 8)
    staged, alone = _same_step(monkeypatch, lambda: _deep(40), x)
    assert len(staged.stats) == 81 * 2 + 41 * 2 * 2  # outputs and their gradients, parameter gradients, updates
    _assert_summaries_equal(staged, alone)


@pytest.mark.parametrize(("limit", "width"), [(reduce.ROW, 8), (4 * reduce.ROW, 8), (3 * reduce.ROW, 64)])
def test_staging_is_reduced_when_it_passes_its_bound(monkeypatch: pytest.MonkeyPatch, limit: int, width: int) -> None:
    """With width 64 the weights' gradients take two staging rows each, and staging fills in the middle of
    the parameter gradients' one ``_foreach_copy_``."""
    x = torch.randn(4, width)
    flushes: list[int] = []
    staged: list[int] = []
    flush, slot = reduce.StatsRows.flush, reduce.StatsRows._slot

    def waiting(self: reduce.StatsRows) -> int:
        return max((len(s.rows) * reduce.ROW for s in self._staging.values()), default=0)

    def counting_flush(self: reduce.StatsRows) -> None:
        flushes.append(waiting(self))
        flush(self)

    def watched_slot(self: reduce.StatsRows, *args: Any) -> torch.Tensor:
        out = slot(self, *args)
        staged.append(waiting(self))
        return out

    monkeypatch.setattr(reduce.StatsRows, "flush", counting_flush)
    monkeypatch.setattr(reduce.StatsRows, "_slot", watched_slot)
    batched, alone = _same_step(monkeypatch, lambda: _deep(12, width, blow_up_at=4), x, STAGE_LIMIT=limit)
    _assert_summaries_equal(batched, alone)
    assert max(staged) <= limit  # never more waiting than the bound
    assert sum(1 for n in flushes if n) > 10  # reduced many times within the step
    assert batched.first_nonfinite_forward == NonfiniteSite("11", "activation", 0)  # the second Scale(1e30)


def test_first_nonfinite_sites_are_those_of_the_per_tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    staged, alone = _same_step(monkeypatch, lambda: _deep(30, blow_up_at=17), torch.randn(4, 8))
    _assert_summaries_equal(staged, alone)
    assert staged.first_nonfinite_forward == NonfiniteSite("37", "activation", 0)  # the second Scale(1e30)
    assert staged.first_nonfinite_backward is not None
    assert staged.first_nonfinite_backward == alone.first_nonfinite_backward


def test_large_and_small_tensors_of_one_row_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reduce, "SMALL_TENSOR", 2000)
    monkeypatch.setattr(reduce, "CHUNK", 1500)
    big, small = _awkward_tensor(7, 5000), _awkward_tensor(8, 300).half()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emit = Emit()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.emit(big), self.emit(small), self.emit(torch.empty(0, 3))

    model = Twice()
    summary = _trace(model, lambda: model(torch.zeros(1)))
    got = summary.get("emit", "activation")
    assert got is not None
    want = _reference(big).merge(_reference(small))
    _assert_stats_equal(got, want)


class Emit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_inplace_changes_after_the_forward_hook_are_not_recorded() -> None:
    class ZeroAfter(nn.Module):
        """A traced Linear, then its output changed in place by the parent and by an in-place ReLU."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h.mul_(-1.0)  # in place, in the parent's own code, after fc's hook
            return self.act(h)  # in place again

    torch.manual_seed(0)
    model = ZeroAfter()
    x = torch.randn(5, 6)
    want = model.fc(x).detach().clone()
    summary = _trace(model, lambda: model(x).sum().backward())
    _assert_stats_equal(summary.get("fc", "activation"), _reference(want))
    _assert_stats_equal(summary.get("act", "activation"), _reference(torch.relu(-want)))


class _DoubleInPlace(torch.autograd.Function):
    """Identity forward; backward doubles the incoming gradient in place (a custom Function may do that)."""

    seen: ClassVar[list[torch.Tensor]] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _DoubleInPlace.seen.append(grad)
        return grad.mul_(2.0)


def test_inplace_changes_to_a_gradient_after_its_hook_are_not_recorded() -> None:
    class Doubler(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _DoubleInPlace.apply(x)  # type: ignore[no-any-return]

    model = nn.Sequential(Doubler())
    x = torch.randn(40, 30, requires_grad=True)
    c = torch.randn(40, 30)
    _DoubleInPlace.seen.clear()
    summary = _trace(model, lambda: (model(x) * c).sum().backward())
    assert x.grad is not None and torch.equal(x.grad, 2 * c)
    assert _DoubleInPlace.seen and torch.equal(_DoubleInPlace.seen[0], 2 * c)  # changed after the hook saw it
    _assert_stats_equal(summary.get("0", "grad_output"), _reference(c))


def _tracer_ops(depth: int) -> Counter[str]:
    """The ops a traced training step of ``_deep(depth)`` dispatches beyond the same step untraced."""
    model = _deep(depth)
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(model)
    with tracer:
        for traced in (True, True, False):  # the second traced step runs with every buffer allocated
            if traced:
                tracer.start_step(0)
            with _OpLog() as log:
                model(x).square().mean().backward()
                tracer.after_backward()
                opt.step()
                tracer.after_optimizer_step()
                tracer.finish_step()
            opt.zero_grad()
            if traced:
                traced_ops = log.ops
    return traced_ops - log.ops


def test_reductions_per_traced_step_do_not_grow_with_the_number_of_layers() -> None:
    """Each output and output gradient costs one copy into staging (they arrive one at a time); parameter
    gradients and update samples are staged with one `_foreach_copy_` each; the reductions are a fixed set
    per step, the same for 4 layers as for 40."""
    shallow, deep = _tracer_ops(4), _tracer_ops(40)
    outputs, params = 2 * (2 * 40 + 1) - 2 * (2 * 4 + 1), 2 * (40 - 4)  # more in the deep model
    # every staged tensor gets a view of its staging row; outputs and their gradients each a copy_ into it
    assert deep - shallow == Counter({"copy_": outputs, "as_strided": outputs + params})
    assert shallow["bincount"] == 2 and shallow["_foreach_copy_"] == 3  # updates, the rest; gradients, weights x2


def test_the_hook_is_removed_when_the_step_fails() -> None:
    hooks_before = dict(nn.modules.module._global_forward_hooks)
    model = nn.Sequential(nn.Linear(3, 3), Scale(1.0))
    tracer = Tracer(model)
    with pytest.raises(RuntimeError, match="boom"), tracer:
        tracer.start_step(0)
        model(torch.randn(2, 3))
        raise RuntimeError("boom")
    assert dict(nn.modules.module._global_forward_hooks) == hooks_before
    # and a step after a step that never finished starts clean
    with tracer:
        tracer.start_step(0)
        model(torch.randn(2, 3))
        tracer.start_step(1)
        model(torch.ones(2, 3))
        summary = tracer.finish_step()
    assert summary is not None and summary.steps == (1,)
    assert summary.get("0", "activation").count == 6
    assert dict(nn.modules.module._global_forward_hooks) == hooks_before


def test_the_running_summary_equals_the_merge_of_the_step_summaries() -> None:
    torch.manual_seed(0)
    model = _deep(6, blow_up_at=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    tracer = Tracer(model)
    with tracer:
        for step in range(3):
            tracer.start_step(step, 2.0**step)
            model(torch.randn(4, 8) * (step + 1)).square().mean().backward()
            tracer.after_backward()
            opt.step()
            tracer.after_optimizer_step()
            opt.zero_grad()
            summary = tracer.finish_step()
            assert summary is not None
            steps.append(summary)
    merged = TraceSummary.merge_all(steps)
    assert tracer.summary() == merged
    assert tracer.summary().steps == (0, 1, 2) and tracer.summary().loss_scales == (1.0, 2.0, 4.0)
    assert any(math.isnan(s.max_abs) for s in merged.stats.values())  # update rows merged as not measured


def test_stats_of_extreme_values_in_one_staged_block() -> None:
    """Every fp32 binade's edges, both signs, zeros of both signs, subnormals down to the smallest, in one row."""
    edges = np.ldexp(1.0, np.arange(-149, 100)).astype(np.float32)  # (the fp32 sum of |x| must not overflow)
    values = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(0)), [0.0, -0.0, np.float32(3.4028235e38)]])
    x = torch.from_numpy(values.astype(np.float32))
    model = Emit()
    got = _trace(model, lambda: model(x)).get(ROOT_LAYER, "activation")
    assert got is not None
    want = TensorStats.from_array(values.astype(np.float32).astype(np.float64), "float32")
    _assert_stats_equal(got, want)
    assert got.min_nonzero_abs == 2.0**-149


def test_records_fill_tensorstats_fields_in_their_order() -> None:
    """``Folded.records`` builds TensorStats positionally: its fields must come in that order."""
    names = [f.name for f in fields(TensorStats)]
    assert names == [*reduce._SCALARS, "hist", "dtype"]


def test_block_reductions_give_the_same_bits_on_one_thread_or_two(monkeypatch: pytest.MonkeyPatch) -> None:
    # the thread count is chosen by measured speed, so it must not change a single statistic
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(64, 256) * torch.exp(3 * torch.randn(64, 256))
        results = []
        for threads in (1, 2):
            with monkeypatch.context() as m:
                m.setattr(reduce.BlockThreads, "pick", lambda self, n=threads: n)
                results.append(_train_step(_deep(12, width=256), x))
    finally:
        torch.set_num_threads(before)
    one, two = results
    assert one.stats.keys() == two.stats.keys() and len(one.stats) > 30
    for key, a in one.stats.items():
        b = two.stats[key]
        for f in fields(TensorStats):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if isinstance(va, np.ndarray):
                assert np.array_equal(va, vb), (key, f.name)
            else:
                assert va == vb or (va != va and vb != vb), (key, f.name, va, vb)  # NaN: not measured, both


def test_block_threads_use_the_cheaper_count_and_keep_trying_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    choice = reduce.BlockThreads()
    assert [choice.pick(), choice.pick()] == [1, 1]  # one thread until it has a cost
    choice.record(1, 2e-3, 1000)
    assert choice.pick() == 4  # then the other, once
    choice.record(4, 1e-3, 1000)
    picks = [choice.pick() for _ in range(2 * reduce.BLOCK_EXPLORE)]
    assert picks.count(1) == 2 and picks.count(4) == 2 * reduce.BLOCK_EXPLORE - 2  # cheaper: 4; 1 every 8th
    for _ in range(20):  # a busy machine: four threads become slow, one thread wins
        choice.record(4, 9e-3, 1000)
    picks = [choice.pick() for _ in range(reduce.BLOCK_EXPLORE)]
    assert picks.count(1) == reduce.BLOCK_EXPLORE - 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert {reduce.BlockThreads().pick() for _ in range(10)} == {1}
