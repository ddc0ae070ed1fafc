"""CUDA autocast's op policy on a CPU: each listed op runs in the dtype CUDA autocast gives it.

Checked three ways: each op of the tables returns the dtype its policy promises (fp32 list: fp32, lower-precision
list: half, ...); every op against the real CUDA autocast kernels run on fake CUDA tensors (a CPU build registers
them; ``FakeTensorMode`` routes CUDA-device tensors through them without a GPU), output dtypes compared; and, when a
GPU is there, against real CUDA autocast, dtypes and values. Then the composition: backward dtypes, ``keep_fp32``,
the autocast state code reads, the cast cache, threads, and ``--autocast-policy cpu`` as CPU autocast ships.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from op_cases import CASES, Make, floats
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mpaudit
from mpaudit.arms import ARMS
from mpaudit.numerics import op_policy
from mpaudit.numerics.op_policy import CPU_POLICY, CUDA_ONLY_OPS, CUDA_POLICY, NOT_APPLICABLE
from mpaudit.run import autocast_policy
from mpaudit.run.autocast_policy import cuda_autocast_ops, cuda_autocast_policy, gpu_autocast_state
from mpaudit.run.precision import autocast, step_context

A = torch.ops.aten
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- op cases


PROMOTE_WITH_OTHER = frozenset(op_policy.CUDA_PROMOTE) | {"cat", "stack"}
"""Cases whose ``other`` input makes the mixed-dtype (promote) case."""


def _dtypes(value: Any) -> list[torch.dtype]:
    return [t.dtype for t in floats(value)]


def _float_dtypes(args: Any, kwargs: dict[str, Any]) -> tuple[torch.dtype, ...]:
    """The dtypes of an op call's floating tensor arguments."""
    return tuple(a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point())


@contextlib.contextmanager
def emulated(dtype: torch.dtype) -> Iterator[None]:
    """What a CPU arm's forward runs in under the CUDA policy."""
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=dtype), gpu_autocast_state(dtype):
        yield


@contextlib.contextmanager
def cuda_autocast_state(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast on with ``dtype`` (``torch.autocast("cuda")`` refuses to turn on without a GPU)."""
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("cuda", was[1])
        torch.clear_autocast_cache()


def _run(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised (compared like a result)."""
    try:
        return fn()
    except Exception as exc:
        return exc


# ---------------------------------------------------------------------------------------------- the tables


def test_the_tables_hold_every_op_cuda_autocast_handles_exactly_once() -> None:
    handled = set(cuda_autocast_ops())
    assert handled  # a CPU build registers CUDA's autocast kernels too
    assert handled - set(NOT_APPLICABLE) == set(CUDA_POLICY)
    tables = [*op_policy.CUDA_LOWER_PRECISION_FP, *op_policy.CUDA_FP32, *op_policy.CUDA_FP32_SET_OPT_DTYPE,
              *op_policy.CUDA_FP32_APPEND_DTYPE, *op_policy.CUDA_PROMOTE, *op_policy.CUDA_BANNED]
    assert len(tables) == len(set(tables)) == len(CUDA_POLICY)
    assert not set(NOT_APPLICABLE) & set(CUDA_POLICY)


def test_the_cpu_tables_hold_every_op_cpu_autocast_handles(native_cpu_autocast: None) -> None:
    names = torch._C._dispatch_get_all_op_names()
    handled = {n.removeprefix("aten::") for n in names
               if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCPU")}
    assert handled == set(CPU_POLICY)
    cpu_tables = [*op_policy.CPU_LOWER_PRECISION_FP, *op_policy.CPU_FP32, *op_policy.CPU_PROMOTE]
    assert len(cpu_tables) == len(set(cpu_tables))


def test_every_listed_op_exists_and_the_differing_ones_get_a_kernel() -> None:
    assert all(autocast_policy.resolve(name) is not None for name in {*CUDA_POLICY, *CPU_POLICY})
    registered = set(autocast_policy.install())
    assert registered == set(op_policy.differing_ops())
    for name in ("exp", "softmax.int", "sum", "layer_norm", "pow.Tensor_Scalar", "norm.Scalar", "avg_pool3d"):
        assert name in registered
    for name in ("linear", "mm", "conv2d", "nll_loss", "mkldnn_rnn_layer"):  # alike under both: CPU's kernel runs
        assert name not in registered


def test_the_tables_are_torch_free() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(op_policy))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported


def test_every_op_of_the_cuda_tables_with_a_cpu_kernel_has_a_case() -> None:
    assert set(CUDA_POLICY) - CUDA_ONLY_OPS <= set(CASES)
    assert set(CASES) <= set(CUDA_POLICY) | set(CPU_POLICY)


def test_a_torch_version_other_than_the_pinned_one_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert autocast_policy.version_mismatch(torch.__version__) is None
    assert autocast_policy.version_mismatch(op_policy.PINNED_TORCH + ".7+cu128") is None
    message = autocast_policy.version_mismatch("2.99.0")
    assert message is not None and "2.99.0" in message and op_policy.PINNED_TORCH in message
    autocast_policy.uninstall()
    try:
        monkeypatch.setattr(torch, "__version__", "2.99.0")
        with pytest.warns(UserWarning, match="2.99.0"):
            autocast_policy.install()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            autocast_policy.install()  # installed: no second warning
    finally:
        monkeypatch.undo()
        autocast_policy.uninstall()
        autocast_policy.install()


# ---------------------------------------------------------------------------------------------- per op dtypes


def _ops_of(*policies: str) -> list[str]:
    return sorted(op for op, policy in CUDA_POLICY.items() if policy in policies and op not in CUDA_ONLY_OPS)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", _ops_of("fp32", "fp32_set_opt_dtype", "fp32_append_dtype"))
def test_fp32_list_ops_return_fp32_for_half_inputs(op: str, dtype: torch.dtype) -> None:
    make = Make(dtype)
    with emulated(dtype):
        out = CASES[op](make)
    assert _dtypes(out) and set(_dtypes(out)) == {torch.float32}
    if op in CPU_KEEPS_HALF:
        with torch.autocast("cpu", dtype=dtype):
            assert _dtypes(CASES[op](make)) == [dtype]


CPU_KEEPS_HALF = ("exp", "softmax.int", "log_softmax.int", "sum", "layer_norm", "pow.Tensor_Scalar", "norm.Scalar")
"""The issue's examples: CPU autocast runs these in half precision (CUDA autocast in fp32)."""


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", _ops_of("lower_precision_fp"))
def test_lower_precision_list_ops_return_half_for_fp32_inputs(op: str, dtype: torch.dtype) -> None:
    with emulated(dtype):
        out = CASES[op](Make(torch.float32))
    assert _dtypes(out) and set(_dtypes(out)) == {dtype}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", _ops_of("promote"))
def test_promote_ops_run_in_the_widest_input_type(op: str, dtype: torch.dtype) -> None:
    with emulated(dtype):
        mixed = CASES[op](Make(dtype, other_dtype=torch.float32))
        half = CASES[op](Make(dtype))
    assert set(_dtypes(mixed)) == {torch.float32}
    assert set(_dtypes(half)) == {dtype}


def test_set_opt_dtype_ops_respect_a_given_dtype() -> None:
    x = Make(torch.float16).x(3, 4)
    with emulated(torch.float16):
        assert x.sum(dtype=torch.float64).dtype == torch.float64
        assert F.softmax(x, -1, dtype=torch.float16).dtype == torch.float16
        assert x.sum().dtype == torch.float32
        assert x.long().sum().dtype == torch.long  # not floating: no dtype set, as CUDA does


def test_banned_binary_cross_entropy_raises_cuda_autocasts_error() -> None:
    p = Make(torch.float16).prob(3, 4)
    with emulated(torch.float16), pytest.raises(RuntimeError, match="unsafe to autocast"):
        F.binary_cross_entropy(p, p)
    with torch.autocast("cpu", dtype=torch.float16):
        assert F.binary_cross_entropy(p, p).dtype == torch.float32  # CPU autocast runs it in fp32


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_ops_only_cpu_autocast_lists_run_in_their_input_dtype(dtype: torch.dtype) -> None:
    make = Make(dtype)
    for op in ("avg_pool3d", "max_pool3d", "reflection_pad1d", "replication_pad2d", "trace", "grid_sampler_2d"):
        with emulated(dtype):
            assert _dtypes(CASES[op](make)) == [dtype], op
        with torch.autocast("cpu", dtype=dtype):
            assert _dtypes(CASES[op](make)) == [torch.float32], op


def test_an_op_whose_cpu_kernel_lacks_half_is_computed_in_fp32_and_rounded_like_a_gpu_kernel() -> None:
    """CPU has no fp16/bf16 avg_pool3d (CPU autocast lists it as fp32 for that reason); a GPU has one, computing
    in fp32 and rounding the result: the emulation does the same instead of failing."""
    x = Make(torch.bfloat16).x(1, 2, 4, 4, 4)
    with pytest.raises(NotImplementedError):
        F.avg_pool3d(x, 2)
    with emulated(torch.bfloat16):
        out = F.avg_pool3d(x, 2)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.avg_pool3d(x.float(), 2).bfloat16())


# ---------------------------------------------------------------------------------------------- vs CUDA autocast


def _variants(op: str) -> list[tuple[str, Callable[[torch.dtype], Make]]]:
    variants: list[tuple[str, Callable[[torch.dtype], Make]]] = [
        ("half inputs", lambda d: Make(d)),
        ("fp32 inputs", lambda d: Make(torch.float32)),
    ]
    if op in PROMOTE_WITH_OTHER:
        variants.append(("mixed inputs", lambda d: Make(d, other_dtype=torch.float32)))
    return variants


FAKE_CUDA_CANNOT_RUN = {
    "gru_cell": "its CUDA path calls the fused cell kernel, which needs a CUDA build",
    "grid_sampler": "its CUDA path asks cuDNN whether it applies, which needs a CUDA build",
    "grid_sampler_2d": "its CUDA path asks cuDNN whether it applies, which needs a CUDA build",
}
"""Cases the real CUDA kernels cannot run on fake tensors in a CPU build, with the reason (the per-op dtype tests
above and the GPU test below cover them)."""


def _fake_cuda_dtypes(op: str, make: Make, dtype: torch.dtype) -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), cuda_autocast_state(dtype):
        out = _run(lambda: CASES[op](replace(make, device="cuda", fake=True)))
    return out if isinstance(out, Exception) else _dtypes(out)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_case_picks_the_dtypes_cuda_autocasts_own_kernels_pick(dtype: torch.dtype) -> None:
    """The real CUDA autocast kernels, run on fake CUDA tensors, against the emulation on CPU tensors."""
    mismatches = []
    for op in sorted(set(CASES) - set(FAKE_CUDA_CANNOT_RUN)):
        for label, make_of in _variants(op):
            make = make_of(dtype)
            cuda = _fake_cuda_dtypes(op, make, dtype)
            with emulated(dtype):
                cpu = _run(lambda op=op, make=make: CASES[op](make))
            if isinstance(cuda, Exception) or isinstance(cpu, Exception):
                if type(cuda) is not type(cpu) or str(cuda) != str(cpu):
                    mismatches.append(f"{op} ({label}): CUDA {cuda!r}, emulated {cpu!r}")
                continue
            if _dtypes(cpu) != cuda:
                mismatches.append(f"{op} ({label}): CUDA {cuda}, emulated {_dtypes(cpu)}")
    assert not mismatches, "\n".join(mismatches)


class _OpSequence(TorchDispatchMode):
    """Records (op, dtypes of its floating tensor arguments) of every aten op with a floating input.

    CUDA's ``softmax``/``log_softmax`` with ``dtype=float32`` on a half input call ``_softmax(x, half_to_float=True)``
    (read half, compute and write fp32); the CPU kernels have no such flag and convert first. Both compute the same
    numbers, so the fused form is recorded as the conversion followed by the fp32 op.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        dtypes = _float_dtypes(args, kwargs)
        if func in (A._softmax.default, A._log_softmax.default) and args[2]:
            self.ops += [("aten::_to_copy", dtypes), (func.name(), (torch.float32,))]
        elif dtypes and func.name() != "prim::device":
            self.ops.append((func.name(), dtypes))
        return func(*args, **kwargs)


def _small_model_inputs(m: Make) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [m.x(3, 4, 8), m.x(8, 8), m.x(8), m.x(8), m.x(8), m.x(5, 8), m.x(5), m.x(2, 3, 8, 8), m.x(4, 3, 3, 3)], \
        m.zeros_long(12)


def _small_model_loss(tensors: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """A forward with the issue's hand-rolled softmax, LayerNorm, pow, norm, einsum, conv + GroupNorm, losses."""
    x, w, b, gamma, beta, w_head, b_head, image, kernel = tensors
    h = F.linear(x, w, b)
    e = torch.exp(h @ h.transpose(-1, -2))
    attn = e / e.sum(-1, keepdim=True)
    h = F.layer_norm(attn @ h, (8,), gamma, beta) + torch.pow(h, 2).mean() + h.norm()
    logits = F.linear(F.gelu(h), w_head, b_head)
    c = F.softmax(F.group_norm(F.conv2d(image, kernel, padding="same"), 2).flatten(1), -1).sum()
    z = torch.einsum("bij,jk->bik", h, w)
    return (F.cross_entropy(logits.flatten(0, 1), target) + c + F.mse_loss(z, h) + torch.cumsum(z, 1).mean()
            + F.log_softmax(z, -1).mean())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_a_small_models_forward_runs_the_ops_cuda_autocast_runs_in_the_same_dtypes(dtype: torch.dtype) -> None:
    """Op by op, the whole forward (casts included) against CUDA autocast's kernels on fake CUDA tensors. (Forward
    only: autograd on fake CUDA tensors needs a CUDA build.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    make = Make(torch.float32)
    tensors, target = _small_model_inputs(make)
    with _OpSequence() as emulated_ops, emulated(dtype):
        _small_model_loss(tensors, target)
    with FakeTensorMode():
        tensors, target = _small_model_inputs(replace(make, device="cuda", fake=True))
        with _OpSequence() as cuda_ops, cuda_autocast_state(dtype):
            _small_model_loss(tensors, target)
    assert emulated_ops.ops == cuda_ops.ops
    assert ("aten::exp", (torch.float32,)) in cuda_ops.ops
    assert ("aten::_log_softmax", (dtype,)) in cuda_ops.ops  # cross_entropy asks for log_softmax in its input's dtype
    with _OpSequence() as cpu_ops, torch.autocast("cpu", dtype=dtype):
        _small_model_loss(*_small_model_inputs(make))
    assert ("aten::exp", (dtype,)) in cpu_ops.ops  # what CPU autocast does instead


VALUE_TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}
"""Emulated CPU vs real CUDA, per result dtype: CUDA kernels add in another order (and fp16 tensor cores keep fp32
partial sums the CPU's kernels round differently), so results agree to a couple of units in the last place."""


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_case_matches_real_cuda_autocast_in_dtypes_and_values(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    mismatches = []
    for op in sorted(CASES):
        for label, make_of in _variants(op):
            make = make_of(dtype)
            with torch.autocast("cuda", dtype=dtype):
                gpu = _run(lambda op=op, make=make: CASES[op](replace(make, device="cuda")))
            with emulated(dtype):
                cpu = _run(lambda op=op, make=make: CASES[op](make))
            if isinstance(gpu, Exception) or isinstance(cpu, Exception):
                if type(gpu) is not type(cpu):
                    mismatches.append(f"{op} ({label}): CUDA {gpu!r}, emulated {cpu!r}")
                continue
            if _dtypes(cpu) != _dtypes(gpu):
                mismatches.append(f"{op} ({label}): CUDA {_dtypes(gpu)}, emulated {_dtypes(cpu)}")
                continue
            for c, g in zip(floats(cpu), floats(gpu), strict=True):
                try:
                    torch.testing.assert_close(c, g.cpu(), equal_nan=True, **VALUE_TOLERANCE[c.dtype])
                except AssertionError as exc:
                    mismatches.append(f"{op} ({label}): {str(exc).splitlines()[0]}")
    assert not mismatches, "\n".join(mismatches)


# ---------------------------------------------------------------------------------------------- --autocast-policy cpu


@pytest.fixture
def native_cpu_autocast() -> Iterator[None]:
    """CPU autocast exactly as torch ships it (the policy's kernels removed), restored afterwards."""
    autocast_policy.uninstall()
    try:
        yield
    finally:
        autocast_policy.install()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_outside_the_policy_every_case_is_bit_identical_to_cpu_autocast_as_shipped(dtype: torch.dtype) -> None:
    """Once installed, the kernels apply CPU autocast's rules outside :func:`cuda_autocast_policy` (the ``cpu``
    policy, and any other ``torch.autocast("cpu")`` in the process): same dtypes, same bits, same errors."""
    runs = [(op, label, make_of(dtype)) for op in sorted(CASES) for label, make_of in _variants(op)]

    def results() -> list[Any]:
        with torch.autocast("cpu", dtype=dtype):
            return [_run(lambda op=op, make=make: CASES[op](make)) for op, _, make in runs]

    autocast_policy.uninstall()
    try:
        shipped = results()
    finally:
        autocast_policy.install()
    installed = results()
    for (op, label, _), want, got in zip(runs, shipped, installed, strict=True):
        if isinstance(want, Exception):
            assert type(got) is type(want) and str(got) == str(want), f"{op} ({label})"
            continue
        assert _dtypes(got) == _dtypes(want), f"{op} ({label})"
        for g, w in zip(floats(got), floats(want), strict=True):
            assert torch.equal(g, w), f"{op} ({label})"


def test_the_cpu_policy_keeps_cpu_autocasts_behaviour() -> None:
    arm = ARMS["fp16"]
    x = Make(torch.float16).x(3, 4)
    with step_context(arm, "cpu", "emulate", "cpu"), autocast(arm, "cpu"):
        assert torch.exp(x).dtype == torch.float16
        assert F.softmax(x, -1).dtype == torch.float16
        assert not torch.is_autocast_enabled("cuda")
    with step_context(arm, "cpu", "emulate", "cuda"), autocast(arm, "cpu"):
        assert torch.exp(x).dtype == torch.float32
        assert F.softmax(x, -1).dtype == torch.float32
        assert torch.is_autocast_enabled("cuda")
    assert torch.exp(x).dtype == torch.float16 and not torch.is_autocast_enabled("cuda")


def test_fp32_arms_and_gpu_arms_need_no_policy_context() -> None:
    from mpaudit.run.precision import follows_cuda_policy

    assert not follows_cuda_policy(ARMS["fp32"], "cpu", "cuda")
    assert not follows_cuda_policy(ARMS["bf16"], "cuda", "cuda")  # CUDA autocast itself
    assert not follows_cuda_policy(ARMS["bf16"], "cpu", "cpu")
    assert follows_cuda_policy(ARMS["bf16"], "cpu", "cuda")
    assert isinstance(step_context(ARMS["fp32"], "cpu", "emulate", "cuda"), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------- composition


class _Recorder(TorchDispatchMode):
    """Records (op name, dtypes of its floating tensor arguments) of every aten op that reaches dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.calls.append((func.name(), _float_dtypes(args, kwargs)))
        return func(*args, **kwargs)

    def dtypes_of(self, name: str) -> list[tuple[torch.dtype, ...]]:
        return [d for n, d in self.calls if n == name]


def test_backward_runs_each_op_in_the_dtype_its_forward_ran_in() -> None:
    """Autograd records the casts: softmax's and layer_norm's backward run in fp32, the matmul's in fp16, and the
    input's gradient comes back in its own dtype, as on a GPU."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with emulated(torch.float16):
        h = x @ w
        y = F.layer_norm(F.softmax(h, -1), (8,))
    assert h.dtype == torch.float16 and y.dtype == torch.float32
    with _Recorder() as rec:
        y.sum().backward()
    assert rec.dtypes_of("aten::_softmax_backward_data") == [(torch.float32, torch.float32)]
    assert all(set(d) == {torch.float32} for d in rec.dtypes_of("aten::native_layer_norm_backward"))
    assert rec.dtypes_of("aten::mm") and all(set(d) == {torch.float16} for d in rec.dtypes_of("aten::mm"))
    # the same graph written out by hand, as CUDA autocast builds it
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    h2 = x2.half() @ w2.half()
    y2 = F.layer_norm(F.softmax(h2.float(), -1), (8,))
    y2.sum().backward()
    assert x.grad is not None and w.grad is not None
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


def test_keep_fp32_regions_stay_fp32_under_the_policy() -> None:
    seen: dict[str, tuple[torch.dtype, bool, bool]] = {}

    class Probe(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.exp(self.fc(x) * 0.1)
            seen[self.name] = (self.fc(x).dtype, torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
            return h

    torch.manual_seed(0)
    model = nn.Sequential(Probe("free"), Probe("kept"), nn.Linear(8, 2))
    arm = ARMS["fp16"].with_changes(keep_fp32=["1"])
    with mpaudit.keep_fp32(model, arm.keep_fp32), step_context(arm, "cpu", "emulate"), autocast(arm, "cpu"):
        out = model(torch.randn(4, 8))
    assert seen["free"] == (torch.float16, True, True)
    assert seen["kept"] == (torch.float32, False, False)  # every autocast is off inside the kept module
    assert out.dtype == torch.float16  # the next Linear is back under autocast


def test_code_that_reads_the_autocast_state_sees_what_a_gpu_shows() -> None:
    seen: list[tuple[bool, torch.dtype, bool]] = []

    class ReadsState(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                seen.append((torch.is_autocast_enabled(), torch.get_autocast_dtype("cuda"),
                             torch.is_autocast_enabled("cpu")))
            return x

    model = ReadsState()
    for name in ("fp16", "bf16"):
        arm = ARMS[name]
        with step_context(arm, "cpu", "emulate", "cuda"), autocast(arm, "cpu"):
            model(torch.ones(1))
        with step_context(arm, "cpu", "emulate", "cpu"), autocast(arm, "cpu"):
            model(torch.ones(1))
    fp16, bf16 = torch.float16, torch.bfloat16
    assert [s[:1] + s[2:] for s in seen] == [(True, True), (False, True)] * 2
    assert seen[0][1] == fp16 and seen[2][1] == bf16
    assert not torch.is_autocast_enabled("cuda")  # restored


def test_torchao_float8_linear_casts_its_input_as_on_a_gpu() -> None:
    """torchao's Float8Linear casts its input to ``torch.get_autocast_gpu_dtype()`` when
    ``torch.is_autocast_enabled()`` (CUDA's state): under the policy it does, as on a GPU; under CPU autocast alone
    it does not."""
    pytest.importorskip("torchao.float8")
    from torchao.float8 import convert_to_float8_training

    torch.manual_seed(0)
    model = convert_to_float8_training(nn.Sequential(nn.Linear(64, 32)))
    x = torch.randn(16, 64) * 3
    arm = ARMS["bf16"]

    def run(policy: str, cast_input: bool) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with step_context(arm, "cpu", "emulate", policy), autocast(arm, "cpu"), torch.no_grad():
                return model(x.bfloat16() if cast_input else x)

    gpu_like, cpu_like = run("cpu", cast_input=True), run("cpu", cast_input=False)
    assert not torch.equal(gpu_like, cpu_like)  # the input's rounding to bf16 shows in the float8 output
    assert torch.equal(run("cuda", cast_input=False), gpu_like)


def test_a_weight_used_twice_is_cast_once_per_forward_as_cuda_caches_it() -> None:
    """CUDA autocast caches the half cast of an fp32 leaf that requires grad for the rest of the autocast region:
    the weight's two uses share one cast (their gradients add up in half before the one cast back). Ops both
    policies treat alike use CPU autocast's own C++ cache; the policy's kernels (einsum here) keep their own."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    b = torch.randn(3, 5)

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.of_w = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is A._to_copy.default and args[0].data_ptr() == w.data_ptr() and args[0].shape == w.shape:
                self.of_w += 1
            return func(*args, **(kwargs or {}))

    with Casts() as casts:
        with emulated(torch.float16):
            y = torch.einsum("ij,jk->ik", b, w) + torch.einsum("ij,jk->ik", 2 * b, w)
        assert casts.of_w == 1
        with emulated(torch.float16):
            torch.einsum("ij,jk->ik", b, w)
        assert casts.of_w == 2  # a new forward casts again: the cache lives as long as the forward
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def test_the_policy_is_per_thread() -> None:
    x = Make(torch.float16).x(3, 4)
    results: dict[str, torch.dtype] = {}
    ready, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        ready.wait()
        with torch.autocast("cpu", dtype=torch.float16):
            results["other"] = torch.exp(x).dtype
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with emulated(torch.float16):
        ready.set()
        done.wait()
        results["this"] = torch.exp(x).dtype
    worker.join()
    assert results == {"this": torch.float32, "other": torch.float16}


def test_emulated_fp16_still_computes_the_matmuls_under_the_policy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Softmax(-1), nn.Linear(16, 4))
    arm = ARMS["fp16"]
    with step_context(arm, "cpu", "emulate", "cuda") as mode, autocast(arm, "cpu"):
        out = model(torch.randn(4, 8))
        out.float().sum().backward()
    assert out.dtype == torch.float16
    assert mode is not None and mode.calls["aten::addmm"] == 2 and mode.calls["aten::mm"] >= 2


def test_policy_overhead_per_listed_op_is_small() -> None:
    """A Python kernel per listed op: a few microseconds each (median of many calls, against a native op)."""
    import time

    x = torch.randn(8)
    timings: Counter[str] = Counter()
    with emulated(torch.bfloat16):
        for _ in range(50):
            torch.exp(x), torch.sin(x)
        for _ in range(5):
            for name, fn in (("exp", torch.exp), ("sin", torch.sin)):
                t0 = time.perf_counter()
                for _ in range(200):
                    fn(x)
                timings[name] += time.perf_counter() - t0
    per_call_us = (timings["exp"] - timings["sin"]) / 1000 * 1e6
    assert per_call_us < 50  # measured ~2-4 us on an idle core; generous for a busy CI runner


def test_an_audit_leaves_cpu_autocast_as_it_found_it(tiny_task: Any) -> None:
    """The policy's kernels are registered for the audit's arms and removed when it ends (code the user runs next
    in the same process, a ``torch.compile`` under ``torch.autocast("cpu")`` say, meets CPU autocast as shipped);
    kernels the caller had installed stay."""
    autocast_policy.uninstall()
    try:
        mpaudit.audit(tiny_task, arms=("fp32", "bf16"), steps=2, bench=False)
        assert not autocast_policy.installed()
        autocast_policy.install()
        mpaudit.audit(tiny_task, arms=("fp32", "bf16"), steps=2, bench=False)
        assert autocast_policy.installed()
    finally:
        autocast_policy.install()
