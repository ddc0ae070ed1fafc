"""fp16 LSTM layers on a CPU, computed step by step as a GPU computes them: the part of the fp16 emulation
(:mod:`mpaudit.run.fp16_emulation`) that covers recurrent layers.

Why: under CPU fp16 autocast ``nn.LSTM`` reaches ``aten::mkldnn_rnn_layer`` (one call per layer and direction)
with fp16 inputs, and oneDNN has no fp16 LSTM on CPUs without fp16 units: the fp16 arm failed with "could not create
a primitive descriptor for the LSTM forward propagation primitive". (``nn.GRU``, ``nn.RNN``, ``nn.LSTM`` with
``proj_size`` or packed sequences, and every ``*Cell`` decompose on a CPU into per-step ``addmm``/``mm`` calls, which
the emulation computes (autocast casts the hidden state to fp16 where it enters each step's matmul, as a GPU holds it
in fp16), and elementwise gate ops on the CPU's fp16 kernels: they need nothing from this module. Their gate
arithmetic rounds to fp16 after each op where cuDNN keeps it in fp32, and the state a GRU, or an LSTM over packed
sequences, carries between steps stays fp32 (the zero initial state is fp32 and the gate update promotes) where a
GPU's is fp16: differences of about a rounding, in both directions.)

What a GPU computes for an fp16 LSTM layer (cuDNN, and PyTorch's fused CUDA cell): the gate pre-activations come from
fp16 matmuls on tensor cores (fp32 accumulation, result rounded to fp16): ``x_t W_ih^T`` for every time step in one
GEMM, ``h_{t-1} W_hh^T`` once per step; the gate arithmetic (biases, sigmoid/tanh, ``c_t = f c_{t-1} + i g``,
``h_t = o tanh(c_t)``) runs in fp32 (cuDNN's math precision for fp16 RNNs, and the fused cell's ``accscalar_t``); the
states ``h_t`` and ``c_t`` are stored in fp16, so the hidden state each step's matmul reads is fp16. This module
computes exactly that, in fp32 on the CPU, rounding at those points; nothing is rounded below fp16's precision and
nothing fp16 would lose is kept.

Backward mirrors it: per step (in reverse) the gate gradients are computed in fp32 from the saved fp32 activations
and stored in fp16 (as the GPU stores them), the gradient reaching the previous step's hidden state is an fp16 matmul
``dgates_t W_hh`` (fp16 result), the cell-state gradient carried to the previous step is rounded to fp16; the weight
and input gradients are one GEMM each over all steps (fp32 accumulation, one rounding), as cuDNN computes them.

Cost: a Python loop over time steps of about a dozen small ops each way, against oneDNN's fused fp32 LSTM. A whole
training step of a 2-layer LSTM classifier (batch 64, 28 steps, hidden 128) costs about 1.5x fp32's in CPU time, half
of it in the GEMMs themselves (``benchmarks/fp16_emulation.py lstm``): cheap enough to round the hidden state at every
step rather than only what a layer returns.

Not modelled: cuDNN's exact order of fp32 additions inside a step, and whether a particular cuDNN algorithm keeps
some intermediate in fp32 rather than fp16; the differences are at most a rounding of an fp16 value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import torch
from torch._ops import OpOverload

from mpaudit.numerics.op_policy import PINNED_TORCH

_aten = torch.ops.aten
_FP16: Final = torch.float16
_FP32: Final = torch.float32
_LSTM_MODE: Final = 2
"""``mode`` of ``mkldnn_rnn_layer`` for an LSTM (``ideep::rnn_kind::LSTM``; PyTorch only sends LSTMs there)."""
_GATES: Final = 4
_TO_INTERNAL: Final = (3, 0, 1, 2)
"""PyTorch's gate order is (i, f, g, o); internally (o, i, f, g), so the three sigmoid gates are contiguous and the
two gates whose gradient is driven by the cell state (i, f, g) follow the one driven by the hidden state (o)."""
_TO_PYTORCH: Final = (1, 2, 3, 0)
_NO_AUTOCAST: Final = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

LSTM_LAYER: Final[OpOverload] = _aten.mkldnn_rnn_layer.default
LSTM_LAYER_BACKWARD: Final[OpOverload] = _aten.mkldnn_rnn_layer_backward.default
RECURRENT_OPS: Final[tuple[OpOverload, ...]] = (LSTM_LAYER, LSTM_LAYER_BACKWARD)
"""The recurrent aten ops the emulation computes step by step when their inputs are fp16 CPU tensors."""


class UnsupportedRecurrentCall(NotImplementedError):
    """A call of a recurrent op in a form PyTorch never sends it (a non-LSTM mode, packed batch sizes); the message
    completes "the emulation does not compute it ...", e.g. "for mode 1 (...)"."""


def bind(func: OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def wants_emulation(func: OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether a call of a recurrent op gets fp16 CPU tensors only (its byte workspace aside): mixed dtypes go to the
    native kernel, which raises as it would."""
    seen = False
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.dtype != _FP16 or value.device.type != "cpu":
                return False
            seen = True
    return seen


def emulate(func: OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Compute ``func`` (one of :data:`RECURRENT_OPS`) on fp16 inputs as a GPU does."""
    a = bind(func, args, kwargs)
    if a["mode"] != _LSTM_MODE:
        raise UnsupportedRecurrentCall(
            f"for mode {a['mode']} (PyTorch {PINNED_TORCH} sends only LSTMs, mode {_LSTM_MODE})"
        )
    if len(a["batch_sizes"]):
        raise UnsupportedRecurrentCall(
            f"for packed batch sizes (PyTorch {PINNED_TORCH} sends packed sequences elsewhere)"
        )
    with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
        if func is LSTM_LAYER:
            return _lstm_forward(a)
        return _lstm_backward(a)


# ------------------------------------------------------------------------------------------------ helpers


def _onednn_matmul() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``a @ b`` in fp32 through oneDNN's inner product (what PyTorch's own CPU fusions call), when this build has
    it: on CPUs where the BLAS behind ``torch.mm`` does not use the widest vector units (MKL on AMD CPUs) it is about
    twice as fast, as fast as the native fp32 LSTM's own GEMMs. None when it is missing or disagrees with mm."""
    try:
        linear = torch.ops.mkldnn._linear_pointwise.default
        a, b = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.eye(3)[:, [2, 0]]
        if not torch.equal(linear(a, b.t(), None, "none", [], ""), a @ b):
            return None
    except Exception:  # a build without oneDNN, or an op that changed: torch.mm is always right
        return None

    def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return linear(x, y.t(), None, "none", [], "")

    return matmul


_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _onednn_matmul() or torch.mm
"""fp32 ``a @ b`` for the recurrence's GEMMs."""


def _internal(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """Weights or biases (gate blocks along dim 0, PyTorch's order) as fp32, in the internal gate order."""
    rest = t.shape[1:]
    return t.reshape(_GATES, hidden, *rest)[list(_TO_INTERNAL)].reshape(_GATES * hidden, *rest).to(_FP32)


def _pytorch(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """Gradients (gate blocks along dim 0, internal order) back in PyTorch's gate order."""
    rest = t.shape[1:]
    return t.reshape(_GATES, hidden, *rest)[list(_TO_PYTORCH)].reshape(_GATES * hidden, *rest)


def _workspace_views(
    workspace: torch.Tensor, steps: int, batch: int, hidden: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 views of the byte workspace: gate activations (T, B, 4H), tanh(c_t) and the fp16-rounded c_t
    (T, B, H each), indexed by time step."""
    flat = workspace.view(_FP32)
    n_gates, n_state = steps * batch * _GATES * hidden, steps * batch * hidden
    acts = flat[:n_gates].view(steps, batch, _GATES * hidden)
    tanh_c = flat[n_gates:n_gates + n_state].view(steps, batch, hidden)
    cells = flat[n_gates + n_state:n_gates + 2 * n_state].view(steps, batch, hidden)
    return acts, tanh_c, cells


def _workspace_bytes(steps: int, batch: int, hidden: int) -> int:
    return (_GATES + 2) * steps * batch * hidden * 4


def _previous(states: torch.Tensor, initial: torch.Tensor, reverse: bool) -> torch.Tensor:
    """For each time step the state the step read (``initial`` for the first step processed)."""
    if reverse:
        return torch.cat([states[1:], initial.unsqueeze(0).to(states.dtype)])
    return torch.cat([initial.unsqueeze(0).to(states.dtype), states[:-1]])


# ------------------------------------------------------------------------------------------------ forward


def _lstm_forward(a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x: torch.Tensor = a["input"]  # (T, B, I), time-major (mkldnn_rnn transposes batch_first inputs before)
    steps, batch, features = x.shape
    hidden: int = a["hidden_size"]
    w_ih, w_hh = _internal(a["weight0"], hidden), _internal(a["weight1"], hidden)
    # The input projections of every step: one fp16 GEMM (fp32 accumulation, rounded to fp16), as cuDNN does it.
    x_proj = _matmul(x.reshape(steps * batch, features).to(_FP32), w_ih.t()).to(_FP16).to(_FP32)
    if a["has_biases"]:
        x_proj += _internal(a["weight2"], hidden)
        x_proj += _internal(a["weight3"], hidden)
    x_proj_steps = x_proj.view(steps, batch, _GATES * hidden).unbind(0)

    save = torch.is_grad_enabled()
    workspace = torch.empty(_workspace_bytes(steps, batch, hidden), dtype=torch.uint8)
    acts, tanh_c, cells32 = _workspace_views(workspace, steps, batch, hidden)
    output = torch.empty(steps, batch, hidden, dtype=_FP16)
    cells = torch.empty(steps, batch, hidden, dtype=_FP16)
    gate_views = acts.view(steps, batch, _GATES, hidden).unbind(2)
    o_s, i_s, f_s, g_s = (g.unbind(0) for g in gate_views)
    sig_s, tanh_s = acts[:, :, : 3 * hidden].unbind(0), acts[:, :, 3 * hidden:].unbind(0)
    acts_s, tanh_c_s, out_s, cells_s = acts.unbind(0), tanh_c.unbind(0), output.unbind(0), cells.unbind(0)

    w_hh_t = w_hh.t()
    h = a["hx_"].to(_FP32)  # fp32 holding the fp16 state
    c: torch.Tensor = a["cx_"]  # fp16
    order = range(steps - 1, -1, -1) if a["reverse"] else range(steps)
    for t in order:
        # pre-activations: fp32 sum of the fp16 input projection (biases added) and the fp16 recurrent product
        torch.add(x_proj_steps[t], _matmul(h, w_hh_t).to(_FP16), out=acts_s[t])
        sig_s[t].sigmoid_()
        tanh_s[t].tanh_()
        c_new = torch.mul(f_s[t], c)
        c_new.addcmul_(i_s[t], g_s[t])
        torch.tanh(c_new, out=tanh_c_s[t])
        torch.mul(o_s[t], tanh_c_s[t], out=out_s[t])  # h_t, computed in fp32, stored in fp16
        cells_s[t].copy_(c_new)  # c_t stored in fp16
        c = cells_s[t]
        h = out_s[t].to(_FP32)
    last = order[-1]
    hy, cy = output[last].clone(), cells[last].clone()
    if not save:  # nothing will run backward: no workspace
        return output, hy, cy, workspace[:0]
    cells32.copy_(cells)
    return output, hy, cy, workspace


# ------------------------------------------------------------------------------------------------ backward


def _lstm_backward(a: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    x: torch.Tensor = a["input"]
    steps, batch, features = x.shape
    hidden: int = a["hidden_size"]
    reverse: bool = a["reverse"]
    if a["workspace"].numel() != _workspace_bytes(steps, batch, hidden):
        raise UnsupportedRecurrentCall(
            "for a workspace its own forward did not write (run the forward and backward() inside the emulation)"
        )
    acts, tanh_c, cells = _workspace_views(a["workspace"], steps, batch, hidden)
    w_ih, w_hh = _internal(a["weight1"], hidden), _internal(a["weight2"], hidden)
    hx: torch.Tensor = a["hx_"]
    cx: torch.Tensor = a["cx_tmp"]

    # Per-step factors of the gate gradients, for every step at once (fp32, from the saved fp32 activations):
    # d pre_o = dh * tanh(c) o(1-o); d pre_i = dc * g i(1-i); d pre_f = dc * c_prev f(1-f); d pre_g = dc * i (1-g^2)
    o, i, f, g = acts.view(steps, batch, _GATES, hidden).unbind(2)
    sig = acts[:, :, : 3 * hidden]
    dsig = (sig * (1 - sig)).view(steps, batch, 3, hidden).unbind(2)
    factors = torch.stack([tanh_c * dsig[0], g * dsig[1], _previous(cells, cx, reverse) * dsig[2], i * (1 - g * g)],
                          dim=2)  # (T, B, 4, H)
    dc_from_h = o * (1 - tanh_c * tanh_c)  # dc += dh * o (1 - tanh(c)^2)

    grad_output, grad_hy, grad_cy = a["grad_output"], a["grad_hy"], a["grad_cy"]
    dy = (grad_output.to(_FP32) if grad_output is not None else torch.zeros(steps, batch, hidden)).unbind(0)
    dh_rec: torch.Tensor = grad_hy if grad_hy is not None else torch.zeros(batch, hidden, dtype=_FP16)
    dc: torch.Tensor = grad_cy if grad_cy is not None else torch.zeros(batch, hidden, dtype=_FP16)

    dgates = torch.empty(steps, batch, _GATES * hidden, dtype=_FP16)
    scratch = torch.empty(batch, _GATES, hidden)
    factors_s, dc_from_h_s, f_s, dgates_s = factors.unbind(0), dc_from_h.unbind(0), f.unbind(0), dgates.unbind(0)
    order = range(steps) if reverse else range(steps - 1, -1, -1)
    for t in order:
        dh = torch.add(dy[t], dh_rec)  # fp32: the output's gradient plus the fp16 recurrent one
        dc = torch.addcmul(dc, dh, dc_from_h_s[t])
        torch.mul(factors_s[t][:, :1], dh.unsqueeze(1), out=scratch[:, :1])
        torch.mul(factors_s[t][:, 1:], dc.unsqueeze(1), out=scratch[:, 1:])
        dgates_s[t].copy_(scratch.view(batch, _GATES * hidden))  # stored in fp16, as a GPU stores them
        dh_rec = _matmul(dgates_s[t].to(_FP32), w_hh).to(_FP16)  # fp16 matmul: fp32 accumulation, fp16 result
        dc = torch.mul(dc, f_s[t]).to(_FP16)  # the cell-state gradient carried to the previous step in fp16

    # Input and weight gradients: one GEMM each over every step (fp32 accumulation, one rounding), as cuDNN does.
    dg = dgates.view(steps * batch, _GATES * hidden).to(_FP32)
    dx = _matmul(dg, w_ih).to(_FP16).view(steps, batch, features)
    dw_ih = _matmul(dg.t(), x.reshape(steps * batch, features).to(_FP32)).to(_FP16)
    h_prev = _previous(a["output"], hx, reverse).reshape(steps * batch, hidden).to(_FP32)
    dw_hh = _matmul(dg.t(), h_prev).to(_FP16)
    db = _pytorch(dg.sum(0).to(_FP16), hidden)
    return dx, _pytorch(dw_ih, hidden), _pytorch(dw_hh, hidden), db, db.clone(), dh_rec, dc
