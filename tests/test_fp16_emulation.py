"""Emulated fp16 (fp16 in, fp32 accumulate, fp16 out) against native CPU fp16 autocast and exact references."""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpaudit.arms import ARMS
from mpaudit.run.fp16_emulation import INTERCEPTED_OPS, EmulatedFp16, emulated_fp16, release_buffers
from mpaudit.run.precision import make_scaler
from mpaudit.run.step import train_step
from mpaudit.run.task import Task

aten = torch.ops.aten

FP16_EPS = 2.0**-10
"""fp16 machine epsilon: one unit in the last place (ulp) relative to the value."""
OP_ULPS = 2
"""Emulated vs native, one op: native CPU fp16 kernels block the reduction and may round partial sums to
fp16 or add in another order, so they can differ from fp32-accumulate-then-round-once by a rounding or so
(measured here: at most 0.8 ulp of the result's largest element at these tiny shapes, ~3 at K=4096)."""
MODEL_ULPS = 4
"""Emulated vs native, a model's logits and gradients: a few chained ops (2-4 layers, forward and
backward) can add up per-op differences (measured here: at most ~0.9 ulp). Measured against the tensor's
largest element, since near-zero elements produced by cancellation have no meaningful relative error."""
UNDERFLOW_POINTS = 0.01
"""Fraction of exactly-zero gradient elements must agree with native within 1 percentage point."""


# ---------------------------------------------------------------------------------------------- helpers


def _native_then_emulated(fn: Callable[[], Any]) -> tuple[Any, Any, EmulatedFp16]:
    """Run ``fn`` natively and inside the mode; return both results and the mode."""
    native = fn()
    with emulated_fp16() as mode:
        emulated = fn()
    return native, emulated, mode


def _assert_fp16_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """Equal dtypes, and every element within ``ulps`` fp16 ulps of the expected tensor's largest magnitude."""
    assert actual.dtype == expected.dtype
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=ulps * FP16_EPS * scale)


def _fp32_then_round(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The tensor-core reference: fp16 inputs exactly upcast, fp32 compute, each fp16 result rounded once."""
    up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]
    out = func(*up, **{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    if isinstance(out, torch.Tensor):
        return out.half()
    names = [r.name for r in func._schema.returns]
    return tuple(o if n == "logsumexp" or o is None else o.half() for o, n in zip(out, names, strict=True))


def _h(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).half()


def _op_cases() -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """One call of every intercepted op with tiny fp16 inputs."""
    torch.manual_seed(0)
    a, b = _h(8, 48), _h(48, 6)
    yield aten.mm.default, (a, b), {}
    yield aten.addmm.default, (_h(6), a, b), {}
    yield aten._addmm_activation.default, (_h(6), a, b), {"use_gelu": True}
    yield aten.bmm.default, (_h(2, 8, 48), _h(2, 48, 6)), {}
    yield aten.baddbmm.default, (_h(2, 8, 6), _h(2, 8, 48), _h(2, 48, 6)), {"beta": 0.5}
    yield aten.addbmm.default, (_h(8, 6), _h(2, 8, 48), _h(2, 48, 6)), {}
    yield aten.mv.default, (a, _h(48)), {}
    yield aten.addmv.default, (_h(8), a, _h(48)), {"alpha": 0.5}
    yield aten.dot.default, (_h(48), _h(48)), {}
    x, w, bias = _h(2, 3, 8, 8), _h(4, 3, 3, 3), _h(4)
    conv = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    yield aten.convolution.default, (x, w, bias, *conv), {}
    yield aten.convolution_backward.default, (_h(2, 4, 8, 8), x, w, [4], *conv, [True, True, True]), {}
    yield aten._convolution.default, (x, w, bias, *conv, False, False, True, True), {}
    yield aten.conv_tbc.default, (_h(8, 2, 3), _h(3, 3, 4), _h(4), 1), {}
    q, k, v = _h(2, 2, 8, 16), _h(2, 2, 8, 16), _h(2, 2, 8, 16)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, is_causal=True)
    yield aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v), {"is_causal": True}
    yield (
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        (_h(*out.shape), q, k, v, out, lse, 0.0, True),
        {},
    )


OP_CASES = list(_op_cases())


# ---------------------------------------------------------------------------------------------- single ops


def test_every_intercepted_op_has_a_case() -> None:
    assert {case[0] for case in OP_CASES} == set(INTERCEPTED_OPS)


@pytest.mark.parametrize(("func", "args", "kwargs"), OP_CASES, ids=[c[0].name() for c in OP_CASES])
def test_op_is_exactly_fp32_accumulate_rounded_to_fp16(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    native, emulated, mode = _native_then_emulated(lambda: func(*args, **kwargs))
    reference = _fp32_then_round(func, args, kwargs)
    assert mode.calls == {func.name(): 1}
    natives = (native,) if isinstance(native, torch.Tensor) else native
    emulateds = (emulated,) if isinstance(emulated, torch.Tensor) else emulated
    references = (reference,) if isinstance(reference, torch.Tensor) else reference
    for n, e, r in zip(natives, emulateds, references, strict=True):
        assert e.dtype == n.dtype  # fp16 results stay fp16; the attention logsumexp stays fp32 as natively
        assert e.shape == n.shape
        assert torch.equal(e, r)  # bit-exact: this *is* the tensor-core recipe
        _assert_fp16_close(e, n, OP_ULPS)


def test_rounding_matches_fp16_range_overflow_and_underflow() -> None:
    """Results above fp16's max become inf and results below half the smallest subnormal become 0, as on a GPU."""
    a = torch.tensor([[256.0, 256.0], [2.0**-13, 0.0]]).half()
    b = torch.tensor([[256.0, 0.0], [256.0, 2.0**-13]]).half()
    with emulated_fp16():
        out = a @ b
    assert out[0, 0].item() == float("inf")  # 2 * 65536 > 65504
    assert out[1, 1].item() == 0.0  # 2^-26 < 2^-25
    assert out[0, 1].item() == 2.0**-5  # exact in fp16


def test_mixed_dtypes_are_not_emulated_and_fail_as_natively() -> None:
    a, b = _h(4, 4), torch.randn(4, 4)
    with emulated_fp16() as mode, pytest.raises(RuntimeError):
        torch.mm(a, b)
    assert not mode.calls


# ---------------------------------------------------------------------------------------------- models


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2d(x))  # (B, 8, 4, 4)
        h = F.relu(self.conv1d(h.flatten(2)))  # (B, 8, 16)
        return self.head(h.flatten(1))


class _AttentionNet(nn.Module):
    """nn.MultiheadAttention on its bmm path (weights returned), then F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.mha(h, h, h, need_weights=True)[0]
        q, k, v = self.qkv(h).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(h.mean(1))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), (16, 32)),
    "conv": (_ConvNet, (4, 3, 4, 4)),
    "attention": (_AttentionNet, (4, 6, 16)),
}


FORWARD_OPS = {
    "linear": {"aten::addmm"},
    "conv": {"aten::convolution", "aten::addmm"},
    "attention": {"aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"},
}
"""The heavy ops each model's forward dispatches under fp16 autocast."""


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits.detach(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_and_gradients_match_native_fp16(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model, x, y = build(), torch.randn(*shape), torch.randint(10, (shape[0],))
    (logits_n, grads_n), (logits_e, grads_e), mode = _native_then_emulated(lambda: _forward_backward(model, x, y))
    assert logits_e.dtype == logits_n.dtype == torch.float16
    _assert_fp16_close(logits_e, logits_n, MODEL_ULPS)
    assert len(grads_e) == len(grads_n) == len(list(model.parameters()))
    for g_e, g_n in zip(grads_e, grads_n, strict=True):
        _assert_fp16_close(g_e, g_n, MODEL_ULPS)
    backward_ops = {
        "linear": "aten::mm",
        "conv": "aten::convolution_backward",
        "attention": "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
    assert FORWARD_OPS[name] <= set(mode.calls) and mode.calls[backward_ops[name]] >= 1


def test_backward_is_emulated_when_backward_is_called_inside_the_block() -> None:
    """The autograd engine runs backward ops under the dispatch modes active at the ``backward()`` call."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 8, bias=False)
    x, upstream = torch.randn(16, 32), torch.randn(16, 8)

    with emulated_fp16() as mode:
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(x)
        (out.float() * upstream).sum().backward()
    assert mode.calls == {"aten::mm": 2}  # forward x @ W^T; backward grad_W (x needs no grad)
    # grad_W = round16(round16(upstream)^T @ round16(x)) computed with fp32 accumulation, then cast to fp32.
    expected = (upstream.half().float().t() @ x.half().float()).half().float()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, expected)

    layer.weight.grad = None
    with emulated_fp16() as mode, torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
    (out.float() * upstream).sum().backward()  # outside: native fp16 backward
    assert mode.calls == {"aten::mm": 1}


# ---------------------------------------------------------------------------------------------- underflow


def test_gradient_underflow_matches_native() -> None:
    """With a tiny loss and no loss scaling, fp16 gradients flush to zero; emulation flushes the same ones."""
    tiny_loss_factor = 1e-5  # pushes a sizeable fraction (not all) of the gradients below fp16's subnormals
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(16, 32), torch.randint(10, (16,))

    def zero_fraction(context: contextlib.AbstractContextManager[Any], dtype: torch.dtype) -> float:
        model.zero_grad(set_to_none=True)
        with context:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(model(x), y) * tiny_loss_factor
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return float((grads == 0).float().mean())

    native = zero_fraction(contextlib.nullcontext(), torch.float16)
    emulated = zero_fraction(emulated_fp16(), torch.float16)
    fp32 = zero_fraction(contextlib.nullcontext(), torch.float32)
    assert native > 0.1 and fp32 < 0.01  # the setting really underflows in fp16 only
    assert abs(emulated - native) <= UNDERFLOW_POINTS


def _separable_task() -> Task:
    """A tiny two-class task with a linear boundary; the loss is shrunk so fp16 gradients underflow."""
    module = ModuleType("tiny_underflow_task")

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y) * 1e-9  # grads ~1e-11: far below fp16's smallest subnormal

    module.loss_fn = loss_fn  # type: ignore[attr-defined]
    return Task(path=Path("tiny_underflow_task.py"), sha256="", module=module)


def _train_accuracy(arm_name: str, emulate: bool) -> float:
    """Train 30 real steps of ``arm_name`` (GradScaler pinned at scale 1 for fp16) and return train accuracy."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    # Adam is invariant to the loss scale, so fp32 learns from 1e-9-sized gradients; eps must sit below them.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, eps=1e-30)
    arm = ARMS[arm_name]
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0) if arm.grad_scaler else None
    task = _separable_task()
    for _ in range(30):
        with emulated_fp16() if emulate else contextlib.nullcontext():
            train_step(task, arm, model, optimizer, scaler, (x, y), "cpu")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_underflowing_fp16_fails_to_learn_like_native_while_fp32_learns() -> None:
    fp32 = _train_accuracy("fp32", emulate=False)
    native = _train_accuracy("fp16", emulate=False)
    emulated = _train_accuracy("fp16", emulate=True)
    assert fp32 >= 0.95
    assert emulated == native  # every gradient is zero in both: the weights never move
    assert emulated < fp32 - 0.2


# ---------------------------------------------------------------------------------------------- pass-through


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_fp16_training_step_is_bit_identical_inside_the_mode(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(16, 32), torch.randint(10, (16,))

    def step(m: nn.Module) -> torch.Tensor:
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    outside, inside = copy.deepcopy(model), copy.deepcopy(model)
    loss_outside = step(outside)
    with emulated_fp16() as mode:
        loss_inside = step(inside)
    assert not mode.calls
    assert torch.equal(loss_inside, loss_outside)
    for p_in, p_out in zip(inside.parameters(), outside.parameters(), strict=True):
        assert torch.equal(p_in, p_out)


def test_fp16_arm_step_with_grad_scaler_runs_inside_the_mode() -> None:
    """The whole fp16 step (autocast forward, scaled backward, unscale/inf check, AdamW) inside the mode
    tracks the native step within fp16 rounding and keeps the same loss scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(16, 32), torch.randint(10, (16,))
    module = ModuleType("tiny_task")
    module.loss_fn = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])  # type: ignore[attr-defined]
    task, arm = Task(path=Path("tiny_task.py"), sha256="", module=module), ARMS["fp16"]

    def run(emulate: bool) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model)
        optimizer, scaler = torch.optim.AdamW(m.parameters(), lr=1e-3), make_scaler(arm, "cpu")
        assert scaler is not None
        for _ in range(3):
            with emulated_fp16() if emulate else contextlib.nullcontext():
                train_step(task, arm, m, optimizer, scaler, (x, y), "cpu")
        return m, scaler.get_scale()

    (native, scale_n), (emulated, scale_e) = run(False), run(True)
    assert scale_e == scale_n
    for p_e, p_n in zip(emulated.parameters(), native.parameters(), strict=True):
        assert p_e.dtype == torch.float32
        _assert_fp16_close(p_e, p_n, MODEL_ULPS)


def test_no_grad_and_inference_mode() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    x = torch.randn(4, 32)
    expected = (x.half().float() @ layer.weight.half().float().t() + layer.bias.half().float()).half()
    release_buffers()  # the first buffers are allocated under inference_mode
    for context in (torch.inference_mode(), torch.no_grad(), torch.inference_mode()):
        with emulated_fp16() as mode, context, torch.autocast("cpu", dtype=torch.float16):
            out = layer(x)
        assert mode.calls == {"aten::addmm": 1}
        assert out.dtype == torch.float16 and torch.equal(out, expected)


@pytest.mark.parametrize("name", MODELS)
def test_inference_mode_is_emulated_too(name: str) -> None:
    """Under inference_mode composite ops (linear, conv2d, sdpa, ...) reach the mode whole; it decomposes
    them so their heavy parts are emulated, and the output matches native fp16 as in a no_grad forward."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
            return model(x)

    native, emulated, mode = _native_then_emulated(forward)
    assert set(mode.calls) == FORWARD_OPS[name]
    _assert_fp16_close(emulated, native, MODEL_ULPS)


def test_einsum_under_inference_mode() -> None:
    a, b = _h(2, 8, 32), _h(2, 32, 4)
    with emulated_fp16() as mode, torch.inference_mode():
        out = torch.einsum("bij,bjk->bik", a, b)
    assert mode.calls == {"aten::bmm": 1}
    assert torch.equal(out, (a.float() @ b.float()).half())


def test_nested_blocks() -> None:
    a, b = _h(8, 32), _h(32, 8)
    with emulated_fp16(), emulated_fp16() as inner:
        out = a @ b
    assert inner.calls == {"aten::mm": 1}
    assert torch.equal(out, (a.float() @ b.float()).half())


def test_mode_is_per_thread() -> None:
    """A block on one thread leaves other threads native; blocks on two threads at once both stay exact."""
    torch.manual_seed(0)
    pairs = [(_h(16, 24), _h(24, 8)), (_h(8, 40), _h(40, 16))]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def emulate_many(a: torch.Tensor, b: torch.Tensor) -> None:
        try:
            barrier.wait()
            with emulated_fp16() as mode:
                outs = [a @ b for _ in range(20)]
            assert mode.calls == {"aten::mm": 20}
            assert all(torch.equal(o, (a.float() @ b.float()).half()) for o in outs)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=emulate_many, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    with emulated_fp16() as mode:
        worker = threading.Thread(target=lambda: pairs[0][0] @ pairs[0][1])
        worker.start()
        worker.join()
    assert not mode.calls


def test_warns_when_fp32_matmuls_may_use_bf16() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with pytest.warns(UserWarning, match="highest"), emulated_fp16():
            pass
        torch.set_float32_matmul_precision("highest")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with emulated_fp16():
                pass
    finally:
        torch.set_float32_matmul_precision(before)
