"""fp16 emulation of recurrent layers, and of every op an fp16 arm sends to fp16, on a CPU.

oneDNN has no fp16 LSTM on this CPU, so an fp16 arm with ``nn.LSTM`` failed; the emulation computes its layers step by
step as a GPU does (fp16 matmuls, fp32 gate arithmetic, fp16 states). Checked: each op of the fp16 list runs emulated
(or on a CPU fp16 kernel that computes what a GPU does) or fails with one sentence; the emulated LSTM layer matches
PyTorch's own CPU fp16 LSTM (its non-oneDNN path) and the tensor-core recipe; the recurrent modules and their options
run forward and backward close to fp32; an LSTM task audits with its fp16 arm ``ok`` and ``emulated``.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from op_cases import CASES, Make, floats
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mpaudit
from conftest import TINY_TASK
from mpaudit.arms import ARMS
from mpaudit.numerics.op_policy import (
    CPU_KERNELS_KEPT,
    CPU_LOWER_PRECISION_FP,
    CUDA_LOWER_PRECISION_FP,
    CUDA_ONLY_OPS,
)
from mpaudit.run.fp16_emulation import EMULATED_OPS, NATIVE_FP16_OPS, EmulatedFp16, emulated_fp16
from mpaudit.run.precision import autocast, step_context

A = torch.ops.aten
FP16 = ARMS["fp16"]
FP16_EPS = 2.0**-10
SUITE_LSTM = Path(__file__).resolve().parent.parent / "suites" / "lstm_classifier" / "model.py"
T, B, IN, H = 6, 3, 5, 8
"""Time steps, batch, input features and hidden size of the tiny recurrent layers."""


@contextlib.contextmanager
def fp16_arm() -> Iterator[EmulatedFp16]:
    """What an fp16 arm's step runs in on a CPU by default: CUDA's op policy, fp16 emulation, fp16 autocast for the
    forward (backward is called inside the block too)."""
    with step_context(FP16, "cpu", "emulate", "cuda") as mode:
        yield mode


def _lstm_layer_args(m: Make, mode: int = 2) -> tuple[Any, ...]:
    """``mkldnn_rnn_layer``'s arguments for one LSTM layer, as ``nn.LSTM`` calls it (``mode`` 2: LSTM)."""
    weights = (m.x(4 * H, IN), m.x(4 * H, H), m.x(4 * H), m.x(4 * H))
    return (m.x(T, B, IN), *weights, m.x(B, H), m.x(B, H), False, [], mode, H, 1, True, False, False, True)


FP16_CASES: dict[str, Callable[[Make], Any]] = {
    **CASES,
    "mkldnn_rnn_layer": lambda m: A.mkldnn_rnn_layer(*_lstm_layer_args(m)),
    "conv1d.padding": lambda m: A.conv1d.padding(m.x(2, 3, 8), m.x(4, 3, 3), None, [1], "same"),
    "conv3d.padding": lambda m: A.conv3d.padding(m.x(1, 2, 4, 4, 4), m.x(3, 2, 3, 3, 3), None, [1, 1, 1], "same"),
    "_native_multi_head_attention": lambda m: A._native_multi_head_attention(
        m.x(2, 4, 8), m.x(2, 4, 8), m.x(2, 4, 8), 8, 2, m.x(24, 8), m.x(24), m.x(8, 8), m.x(8)
    ),
}
"""One call of every op an fp16 arm sends to fp16 on a CPU, under either op policy."""

SENT_TO_FP16 = {
    "cuda": sorted({op for op in CUDA_LOWER_PRECISION_FP if op not in CUDA_ONLY_OPS} | set(CPU_KERNELS_KEPT)),
    "cpu": sorted(CPU_LOWER_PRECISION_FP),
}
"""The ops each op policy sends to fp16 that a CPU has: CUDA autocast's lower-precision list with the CPU recurrent
layer op CPU autocast sends there (``nn.LSTM``'s, the CPU's counterpart of cuDNN's RNN), and CPU autocast's list."""


def _assert_one_sentence_naming(message: str, op: str) -> None:
    assert op.split(".")[0] in message and "--fp16-cpu native" in message
    assert message.endswith(".") and not re.search(r"[.!?]\s", message[:-1]), message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- the op list


def test_every_op_sent_to_fp16_has_a_case() -> None:
    assert "mkldnn_rnn_layer" in SENT_TO_FP16["cuda"]
    assert {op for ops in SENT_TO_FP16.values() for op in ops} <= set(FP16_CASES)
    assert set(NATIVE_FP16_OPS) <= set(SENT_TO_FP16["cuda"]) | set(SENT_TO_FP16["cpu"])


@pytest.mark.parametrize(
    ("policy", "op"), [(policy, op) for policy, ops in SENT_TO_FP16.items() for op in ops], ids=lambda v: str(v)
)
def test_every_op_an_fp16_arm_sends_to_fp16_runs_emulated_or_fails_in_one_sentence(policy: str, op: str) -> None:
    emulated = {func.name() for func in EMULATED_OPS}
    for source in (torch.float16, torch.float32):  # fp16 inputs, and fp32 inputs autocast casts to fp16
        try:
            with step_context(FP16, "cpu", "emulate", policy) as mode, autocast(FP16, "cpu"):
                out = FP16_CASES[op](Make(source))
        except (RuntimeError, NotImplementedError) as exc:
            _assert_one_sentence_naming(str(exc), op)
            continue
        assert floats(out) and {t.dtype for t in floats(out)} == {torch.float16}
        if op in NATIVE_FP16_OPS:
            assert not mode.calls  # the CPU's own fp16 kernel, which computes what a GPU computes
        else:
            assert mode.calls and set(mode.calls) <= emulated


def test_a_recurrent_call_the_emulation_does_not_compute_fails_in_one_sentence() -> None:
    args = _lstm_layer_args(Make(torch.float16), mode=1)  # a GRU layer: PyTorch never sends one here
    with emulated_fp16(), pytest.raises(NotImplementedError) as info:
        A.mkldnn_rnn_layer(*args)
    _assert_one_sentence_naming(str(info.value), "mkldnn_rnn_layer")
    assert "mode 1" in str(info.value)


def test_an_lstm_backward_without_the_emulations_forward_fails_in_one_sentence() -> None:
    m = Make(torch.float16)
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = _lstm_layer_args(m)[:7]
    out, hy, cy = m.x(T, B, H), m.x(B, H), m.x(B, H)
    foreign = torch.zeros(16, dtype=torch.uint8)  # not the workspace the emulated forward writes
    with emulated_fp16(), pytest.raises(NotImplementedError) as info:
        A.mkldnn_rnn_layer_backward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, hy, cy, out, None, None,
                                    False, 2, H, 1, True, True, False, [], False, foreign)
    _assert_one_sentence_naming(str(info.value), "mkldnn_rnn_layer_backward")


def test_an_op_without_a_cpu_fp16_kernel_fails_in_one_sentence() -> None:
    with emulated_fp16(), pytest.raises(NotImplementedError) as info:
        A.cholesky(torch.eye(3).half())
    _assert_one_sentence_naming(str(info.value), "cholesky")


# ---------------------------------------------------------------------------------------------- the LSTM layer

RNN_ULPS = 4
"""Emulated vs PyTorch's own CPU fp16 LSTM: the native path rounds every gate op to fp16 where the emulation (like
cuDNN) keeps the gate arithmetic in fp32, so they differ by a rounding or two per step, carried through the
recurrence; measured against the tensor's largest element."""


def _lstm_pair() -> tuple[nn.LSTM, nn.LSTM, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The same 2-layer bidirectional LSTM in fp32 (weights fp16 values) and in fp16, an input and initial states
    with fp16 values."""
    torch.manual_seed(0)
    lstm16 = nn.LSTM(IN, H, num_layers=2, bidirectional=True).half()
    lstm32 = copy.deepcopy(lstm16).float()
    state = (torch.randn(4, B, H).half().float(), torch.randn(4, B, H).half().float())
    return lstm32, lstm16, torch.randn(T, B, IN).half().float(), state


def _run(
    lstm: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], fp16_forward: bool = False
) -> list[torch.Tensor]:
    """Output, final states and every gradient of a fixed weighted sum of the output, as fp16; the forward under the
    fp16 arm's autocast when asked."""
    x = x.detach().requires_grad_()
    with autocast(FP16, "cpu") if fp16_forward else contextlib.nullcontext():
        out, (h, c) = lstm(x, state)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (out.float() * weights).sum().backward()
    grads = [x.grad, *(p.grad for p in lstm.parameters())]
    assert all(g is not None for g in grads)
    return [t.detach().half() for t in (out, h, c, *grads) if t is not None]


def test_emulated_lstm_matches_pytorchs_own_cpu_fp16_lstm_forward_and_backward() -> None:
    lstm32, lstm16, x, state = _lstm_pair()
    # PyTorch's own CPU fp16 LSTM: a model in fp16 takes the non-oneDNN path, whose CPU kernels have fp16.
    native = _run(lstm16, x.half(), (state[0].half(), state[1].half()))
    with fp16_arm() as mode:  # autocast sends the layers to oneDNN's op in fp16, which the emulation computes
        emulated = _run(lstm32, x, state, fp16_forward=True)
    assert mode.calls["aten::mkldnn_rnn_layer"] == 4 and mode.calls["aten::mkldnn_rnn_layer_backward"] == 4
    for e, n in zip(emulated, native, strict=True):
        scale = float(n.abs().max())
        torch.testing.assert_close(e, n, rtol=0.0, atol=RNN_ULPS * FP16_EPS * scale)


def test_emulated_lstm_layer_is_the_tensor_core_recipe_with_fp16_states() -> None:
    """Per step: the fp16 input and recurrent matmuls (fp32 accumulation, fp16 results), the gate arithmetic in fp32,
    h_t and c_t stored in fp16, so the next step's matmul reads the rounded hidden state. Written out here as plainly
    as possible, one layer."""
    m = Make(torch.float16)
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, *_ = args = _lstm_layer_args(m)
    with emulated_fp16():
        out, hy, cy, _ = A.mkldnn_rnn_layer(*args)
    up = [t.float() for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0)]
    x32, w_ih32, w_hh32, b_ih32, b_hh32, h, c = up
    x_proj = (x32 @ w_ih32.t()).half().float() + b_ih32 + b_hh32
    expected = []
    for t in range(T):
        pre = x_proj[t] + (h @ w_hh32.t()).half().float()
        i, f, g, o = pre.chunk(4, dim=1)
        c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = (torch.sigmoid(o) * torch.tanh(c_t)).half().float()  # from c_t in fp32, as within a GPU's step
        c = c_t.half().float()
        expected.append(h)
    reference = torch.stack(expected).half()
    assert out.dtype == torch.float16
    # fp32 additions in another order may flip a rounding: at most one fp16 ulp of the element
    torch.testing.assert_close(out, reference, rtol=FP16_EPS, atol=0.0)
    torch.testing.assert_close(hy, reference[-1], rtol=FP16_EPS, atol=0.0)
    torch.testing.assert_close(cy, c.half(), rtol=FP16_EPS, atol=0.0)


# ---------------------------------------------------------------------------------------------- the module class


class _Recurrent(nn.Module):
    """A recurrent module run over a (T, B, IN) input the way a model would, returning one tensor."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lengths = torch.tensor([T, T - 2, 2])
        if kind == "lstm":  # stacked, dropout between layers, bidirectional, batch-first
            self.rnn: nn.Module = nn.LSTM(IN, H, num_layers=2, dropout=0.25, bidirectional=True, batch_first=True)
        elif kind in ("lstm initial states", "lstm packed"):
            self.rnn = nn.LSTM(IN, H, num_layers=2)
        elif kind == "lstm proj_size":
            self.rnn = nn.LSTM(IN, H, proj_size=4)
        elif kind in ("gru", "gru packed"):
            self.rnn = nn.GRU(IN, H, num_layers=2, bidirectional=True)
        elif kind == "rnn":
            self.rnn = nn.RNN(IN, H, nonlinearity="relu")
        else:
            self.rnn = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}[kind](IN, H)
        self.h0 = nn.Parameter(torch.randn(2, B, H) * 0.5)
        self.c0 = nn.Parameter(torch.randn(2, B, H) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "lstm":
            return self.rnn(x.transpose(0, 1))[0]
        if self.kind == "lstm initial states":  # states the user passes (trainable here, so they get gradients)
            return self.rnn(x, (self.h0, self.c0))[0]
        if self.kind.endswith("packed"):
            return pad_packed_sequence(self.rnn(pack_padded_sequence(x, self.lengths))[0])[0]
        if self.kind.endswith("Cell"):
            state, outputs = None, []
            for step in x:
                state = self.rnn(step, state)
                outputs.append(state[0] if isinstance(state, tuple) else state)
            return torch.stack(outputs)
        return self.rnn(x)[0]


RECURRENT = ("lstm", "lstm initial states", "lstm packed", "lstm proj_size", "gru", "gru packed", "rnn",
             "LSTMCell", "GRUCell", "RNNCell")
LSTM_ON_ONEDNN = ("lstm", "lstm initial states")
"""The kinds whose layers reach oneDNN's LSTM op on a CPU; the others decompose into per-step matmuls."""
FP32_GAP = 0.02
"""Emulated fp16 against fp32 after a few fp16 roundings per step over six steps, relative to the tensor's largest
element (an fp16 rounding is 0.05%; a wrong gate, transposed weight or lost gradient is off by tens of percent)."""


def _forward_backward(model: nn.Module, x: torch.Tensor, arm: bool) -> tuple[list[torch.Tensor], set[str]]:
    """The output and every parameter's gradient (of a fixed weighted sum of the output), in fp32 or in the fp16
    arm's step; and the ops the emulation computed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout mask in both runs
    with fp16_arm() if arm else contextlib.nullcontext() as mode:
        with autocast(FP16, "cpu") if arm else contextlib.nullcontext():
            out = model(x)
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        (out.float() * weights).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [out.detach().float(), *grads], set(mode.calls) if mode is not None else set()


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kind", RECURRENT)
def test_recurrent_modules_run_forward_and_backward_in_the_fp16_arm_close_to_fp32(kind: str) -> None:
    torch.manual_seed(0)
    model = _Recurrent(kind).train()
    x = torch.randn(T, B, IN)
    reference, _ = _forward_backward(model, x, arm=False)
    emulated, calls = _forward_backward(model, x, arm=True)
    assert len(emulated) == len(reference) > 1  # every parameter that gets a gradient in fp32 gets one here
    for e, r in zip(emulated, reference, strict=True):
        assert e.shape == r.shape and bool(torch.isfinite(e).all())
        scale = float(r.abs().max())
        torch.testing.assert_close(e, r, rtol=0.0, atol=FP32_GAP * scale)
    if kind in LSTM_ON_ONEDNN:
        assert {"aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"} <= calls
    else:  # per-step matmuls, forward and backward
        assert {"aten::addmm", "aten::mm"} <= calls


@pytest.mark.parametrize("grad", [False, True])
def test_lstm_runs_emulated_without_gradients_and_in_eval_mode(grad: bool) -> None:
    torch.manual_seed(0)
    lstm, x = nn.LSTM(IN, H, num_layers=2, dropout=0.5).eval(), torch.randn(T, B, IN)
    with torch.no_grad():
        reference = lstm(x)[0]
    with fp16_arm() as mode, autocast(FP16, "cpu"), torch.set_grad_enabled(grad):
        out = lstm(x)[0]
    assert out.dtype == torch.float16 and mode.calls["aten::mkldnn_rnn_layer"] == 2
    torch.testing.assert_close(out.float(), reference, rtol=0.0, atol=FP32_GAP * float(reference.abs().max()))


# ---------------------------------------------------------------------------------------------- audits

LSTM_MODEL = {
    "def build_model():\n    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.lstm(x.view(-1, 2, 4))[1][0][-1])  # the 8 features as 2 time steps of 4

def build_model():
    return Model()""",
    "lr=1e-2": "lr=3e-2",
}
"""The tiny task's model replaced by a 2-layer LSTM with a linear head on its last hidden state."""


def test_an_lstm_tasks_fp16_arm_trains_emulated_on_a_cpu(write_task: Callable[..., Path]) -> None:
    result = mpaudit.audit(write_task(TINY_TASK, **LSTM_MODEL), steps=60, arms=("fp32", "fp16"), bench=False)
    fp32, fp16 = result.arms["fp32"], result.arms["fp16"]
    assert fp32.status == fp16.status == "ok"
    assert fp16.fp16_mode == "emulated"
    assert fp32.metrics["accuracy"] > 0.75  # it learned (half the samples are one class)
    assert abs(fp16.metrics["accuracy"] - fp32.metrics["accuracy"]) <= MAX_ACCURACY_GAP


def test_an_lstm_tasks_native_fp16_arm_fails_alone_naming_the_missing_kernel_and_the_emulation(
        write_task: Callable[..., Path]) -> None:
    result = mpaudit.audit(write_task(TINY_TASK, **LSTM_MODEL), steps=2, arms=("fp32", "fp16"), bench=False,
                           fp16_cpu="native")
    fp32, fp16 = result.arms["fp32"], result.arms["fp16"]
    assert fp32.status == "ok"  # one failing arm never sinks the others
    assert fp16.status == "failed" and fp16.fp16_mode == "native"
    assert fp16.error is not None and "\n" not in fp16.error
    assert "native fp16 on this CPU has no kernel" in fp16.error and "--fp16-cpu emulate" in fp16.error


MAX_ACCURACY_GAP = 0.03
"""The bar for the LSTM workload: the fp16 arm within this much accuracy of fp32."""


@pytest.mark.slow
def test_the_lstm_classifier_workload_trains_in_emulated_fp16_like_fp32() -> None:
    result = mpaudit.audit(SUITE_LSTM, arms=("fp32", "fp16"), bench=False)
    fp32, fp16 = result.arms["fp32"], result.arms["fp16"]
    assert fp32.status == fp16.status == "ok" and fp16.fp16_mode == "emulated"
    assert fp32.metrics["accuracy"] > 0.9
    assert abs(fp16.metrics["accuracy"] - fp32.metrics["accuracy"]) <= MAX_ACCURACY_GAP
