"""The faster CPU emulation of torchao's float8 GEMMs gives torchao's own emulation bit for bit: every float8 byte,
both layouts, tensorwise and rowwise scales, NaN, a whole forward and backward of converted Linear layers, and the
amax; and it puts torchao back as it found it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from mpaudit.arms import ARMS
from mpaudit.run.fp8 import float8_config, import_torchao, torchao_available

pytestmark = pytest.mark.skipif(not torchao_available(),
                                reason="the float8 arms need torchao: pip install 'mpaudit[fp8]'")

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (payloads differ between conversions)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.stride() != b.stride():
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    width = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a[~nan].view(width), b[~nan].view(width))


@pytest.mark.parametrize("dtype", FP8)
def test_every_float8_byte_dequantises_to_the_bits_torch_gives(dtype: torch.dtype) -> None:
    from mpaudit.run.fp8_emulation import dequantize

    every = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    for data in (every, every.t()):  # row- and column-major
        for scale in (torch.tensor(1.0), torch.tensor(3.7), torch.tensor(2.0**-20)):
            assert same_bits(dequantize(data, scale, "a").clone(), data.float() / scale)
    rows, cols = torch.rand(16, 1) * 100 + 0.01, torch.rand(1, 16) * 100 + 0.01  # rowwise scales, both sides
    assert same_bits(dequantize(every, rows, "a").clone(), every.float() / rows)
    assert same_bits(dequantize(every.t(), cols, "b").clone(), every.t().float() / cols)


def test_a_nan_among_float8_bytes_stays_nan_and_nothing_else_does() -> None:
    from mpaudit.run.fp8_emulation import dequantize

    values = torch.tensor([[1.0, -2.0], [float("nan"), 448.0]]).to(torch.float8_e4m3fn)
    got = dequantize(values, torch.tensor(2.0), "a")
    assert torch.isnan(got).tolist() == [[False, False], [True, False]]
    assert got[0].tolist() == [0.5, -1.0] and got[1, 1].item() == 224.0


def _converted(recipe: str) -> nn.Module:
    fp8 = import_torchao()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 16))
    fp8.convert_to_float8_training(model, config=float8_config(recipe, emulate=True))
    return model


def _forward_backward(model: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    return [out.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize(("autocast", "batch"), [(False, (24,)), (True, (24,)), (True, (4, 6))])
def test_forward_and_backward_of_float8_linears_match_torchaos_emulation_bit_for_bit(
    recipe: str, autocast: bool, batch: tuple[int, ...]
) -> None:
    from mpaudit.run.fp8_emulation import fast_float8_emulation

    model = _converted(recipe)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 48, generator=g) * torch.exp(3 * torch.randn(24, 48, generator=g))  # a wide range
    x[5, 7] = 3e5  # an outlier that sets the tensorwise scale
    x = x.reshape(*batch, 48)  # 2-D, or a sequence model's (batch, tokens, features)
    reference = _forward_backward(model, x, autocast)
    with fast_float8_emulation() as counts:
        fast = _forward_backward(twin, x, autocast)
    assert (counts.fast, counts.torchao) == (9, 0)  # three GEMMs for each of the three layers, all here
    assert len(fast) == len(reference) == 6
    for got, want in zip(fast, reference, strict=True):
        assert same_bits(got, want)


def test_a_nan_input_reaches_the_output_as_in_torchaos_emulation() -> None:
    from mpaudit.run.fp8_emulation import fast_float8_emulation

    model = _converted("tensorwise")
    x = torch.randn(16, 48)
    x[3, 3] = float("nan")
    reference = model(x)
    with fast_float8_emulation():
        fast = model(x)
    assert torch.isnan(reference).any() and same_bits(fast.detach(), reference.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_amax_is_torchaos_for_every_layout_and_edge(dtype: torch.dtype) -> None:
    from torchao.float8 import float8_utils

    from mpaudit.run.fp8_emulation import fast_float8_emulation

    g = torch.Generator().manual_seed(2)
    cases = [torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g).t(), -torch.rand(8, 4, 3),
             torch.zeros(4, 4), -torch.zeros(4, 4), torch.tensor([[1.0, float("nan")], [-5.0, 2.0]]),
             torch.tensor([[float("-inf"), 1.0]]), torch.randn(10, 10, generator=g)[::2]]
    want = [float8_utils.tensor_to_amax(c.to(dtype)) for c in cases]
    with fast_float8_emulation():
        got = [float8_utils.tensor_to_amax(c.to(dtype)) for c in cases]
    for g_, w in zip(got, want, strict=True):
        assert g_.dtype == w.dtype and g_.shape == w.shape and same_bits(g_, w)


def test_torchao_is_put_back_as_it_was_even_after_an_error() -> None:
    from torchao.float8 import float8_utils
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE

    from mpaudit.run.fp8_emulation import fast_float8_emulation

    table, amax = dict(FLOAT8_OPS_TABLE), float8_utils.tensor_to_amax
    with pytest.raises(RuntimeError, match="inside"), fast_float8_emulation():
        with fast_float8_emulation():  # re-entrant: the inner exit leaves the outer one active
            pass
        assert FLOAT8_OPS_TABLE[torch.ops.aten.mm.default] is not table[torch.ops.aten.mm.default]
        raise RuntimeError("inside")
    assert table == FLOAT8_OPS_TABLE and float8_utils.tensor_to_amax is amax


def test_a_compiled_float8_arm_is_timed(tiny_task: Path) -> None:
    # dynamo traces with fake tensors, which the emulation leaves to torchao, so the compiled arm compiles
    from mpaudit.perf.speed import measure_speed
    from mpaudit.run.prepare import RunContext
    from mpaudit.run.task import load_task

    run = RunContext(load_task(tiny_task), torch.device("cpu"))
    results, _ = measure_speed(run, [ARMS["fp32"], ARMS["fp8"]], 0, budget_s=0.0, compile=True,
                               compile_backend="eager")
    assert results["fp8+compile"].error is None and results["fp8+compile"].steps_timed > 0
