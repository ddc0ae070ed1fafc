"""The one-pass CPU kernel of the traced statistics: the torch reductions' statistics bit for bit (the sum of |x|
within its reduction order), on every kind of tensor a hook hands over, and a loader that builds it once, falls
back with a reason and never serves a broken build."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trace import _awkward_tensor, _OpLog
from test_trace_batched import _assert_summaries_equal, _deep
from torch import nn

from conftest import Scale
from mpaudit.numerics.layerstats import TraceSummary
from mpaudit.run.distributed import Parallel
from mpaudit.trace import native, reduce
from mpaudit.trace.tracer import Tracer

FP32_MAX = torch.finfo(torch.float32).max
SPECIALS = [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1e-45, -1e-40, FP32_MAX, -1.0, 2.0**-126]


@pytest.fixture
def kernel() -> native.Kernel:
    """The kernel; a machine without a C compiler skips the test (the tracer then uses the torch reductions)."""
    if native._compiler() is None:
        pytest.skip("no C compiler here: the one-pass kernel cannot be built")
    k = reduce.native_kernel()
    assert isinstance(k, native.Kernel), k
    return k


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """``native.load`` and ``reduce.native_kernel`` forget what they loaded, building into an empty cache."""
    monkeypatch.setenv("MPAUDIT_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    reduce.native_kernel.cache_clear()
    yield tmp_path
    native.load.cache_clear()
    reduce.native_kernel.cache_clear()


def test_the_kernel_is_built_where_there_is_a_c_compiler() -> None:
    """The tests' machine has one: a build that fails there is a defect, not a fallback."""
    if native._compiler() is None:
        assert isinstance(reduce.native_kernel(), native.Unavailable)
        pytest.skip("no C compiler here")
    assert isinstance(reduce.native_kernel(), native.Kernel), reduce.native_kernel()
    assert reduce.kernel_description().startswith("native (stats_kernel-")
    assert reduce.kernel_description("cuda").startswith("torch (")


def _tensors() -> list[torch.Tensor]:
    """Sizes around the kernel's lanes (8, 32), its fp32 blocks (1024) and chunks of the conversion, specials at
    every position of a lane group, fp32 / fp16 / bf16 / fp64, contiguous or not, offset views."""
    out: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate([1, 2, 7, 8, 9, 31, 32, 33, 63, 100, 1023, 1024, 1025, 4096 + 5, 70_000]):
        x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-40, 37, (n,), generator=g).float()
        for j, v in enumerate(SPECIALS):
            if n > 1:
                x[(j * 7 + i) % n] = v
        out.append(x)
        out.append(x.to(torch.float16))
        out.append(x.to(torch.bfloat16))
    out.append(_awkward_tensor(3, 3000).reshape(60, 50).t())  # non-contiguous
    out.append(_awkward_tensor(4, 5000)[17:])  # a view at an offset
    out.append(_awkward_tensor(5, 2000).double())
    out.append(torch.zeros(77))
    out.append(torch.full((40,), math.nan))
    out.append(-torch.zeros(33))
    return out


def _rows(tensors: list[torch.Tensor], full: bool, use: bool) -> np.ndarray:
    rows = reduce.StatsRows(len(tensors), use_native=use)
    rows.start(torch.device("cpu"))
    assert (rows.kernel is not None) == use
    for i, t in enumerate(tensors):
        rows.add(i, t, full)
    host, counts = rows.collect(Parallel())
    assert counts == [t.numel() for t in tensors]
    return host.copy()


@pytest.mark.parametrize("full", [True, False])
def test_the_kernel_gives_the_torch_reductions_statistics(kernel: native.Kernel, full: bool) -> None:
    tensors = _tensors()
    got, want = _rows(tensors, full, True), _rows(tensors, full, False)
    # (NaNs either sign: torch itself widens an fp16 NaN to +NaN on its scalar path and keeps the sign on its
    # vector path)
    assert reduce.same_statistics(got, want)
    sums = got.view(np.float64)[:, reduce._COL_SUM]
    if not full:
        assert not sums.any()
    assert (got[:, reduce._POSINF_BIN] > 0).any() and (got[:, reduce._POSINF_BIN + 1] > 0).any()  # Inf, NaN seen


def test_the_kernel_sums_more_accurately_than_fp32(kernel: native.Kernel) -> None:
    """2^24 + 3 ones: an fp32 running sum stalls at 2^24; the kernel's fp32 blocks added in double do not."""
    x = torch.ones(2**24 + 3)
    got = _rows([x], True, True)
    assert got.view(np.float64)[0, reduce._COL_SUM] == 2**24 + 3
    assert got.view(np.float64)[0, reduce._COL_NONZERO] == 2**24 + 3
    assert got[0, reduce._SIGN_BIN + 2 * 127] == 2**24 + 3  # every value in the binade of 1


def test_a_traced_step_is_the_same_on_both_paths(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training step with updates and an overflow partway, under bf16 autocast (half-precision activations),
    traced with the kernel and with the torch reductions."""

    def step() -> TraceSummary:
        model = _deep(12, 40, blow_up_at=5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracer = Tracer(model)
        with tracer:
            for i in range(2):
                tracer.start_step(i)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(torch.randn(8, 40, generator=torch.Generator().manual_seed(i)))
                out.float().square().mean().backward()
                tracer.after_backward()
                opt.step()
                tracer.after_optimizer_step()
                opt.zero_grad()
                assert tracer.finish_step(summary=False) is None
        return tracer.summary()

    with_kernel = step()
    with monkeypatch.context() as m:
        m.setattr(reduce, "native_kernel", lambda: native.Unavailable("for the test"))
        without = step()
    assert any(s.nonfinite for s in without.stats.values())
    _assert_summaries_equal(with_kernel, without)
    assert {s.dtype for s in with_kernel.stats.values()} >= {"bfloat16", "float32"}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_the_kernel_path_dispatches_no_torch_op(kernel: native.Kernel, autocast: torch.dtype | None) -> None:
    """Contiguous fp32, bf16 and fp16 outputs and gradients go to the kernel as they are: no staging copy, no
    conversion, no per-tensor op."""
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(10)], Scale(2.0))
    x, c = torch.randn(4, 16), torch.randn(4, 16)

    def step() -> None:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x)
        (out.float() * c).sum().backward()  # (a sum's gradient alone would be an expanded, strided tensor)

    tracer = Tracer(model, updates=False)
    with tracer:
        for _ in range(2):
            tracer.start_step(0)
            with _OpLog() as log:
                step()
                tracer.after_backward()
            summary = tracer.finish_step()
    with _OpLog() as untraced:
        step()
    assert log.ops == untraced.ops
    assert summary is not None
    assert summary.get("0", "activation").dtype == str(autocast or torch.float32).removeprefix("torch.")


def test_no_compiler_means_the_torch_reductions_and_says_why(fresh_loader: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.load() == native.Unavailable("no C compiler found (set CC, or install cc)")
    assert reduce.kernel_description() == "torch (no C compiler found (set CC, or install cc))"
    rows = reduce.StatsRows(1)
    rows.start(torch.device("cpu"))
    assert rows.kernel is None


def test_a_compiler_that_fails_means_the_torch_reductions(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    broken = tmp_path / "cc-broken"
    broken.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'cc-broken: cannot compile today' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    got = native.load()
    assert isinstance(got, native.Unavailable)
    assert got.reason.startswith("the kernel did not build (") and "cannot compile today" in got.reason
    assert not list(fresh_loader.glob("*.so*"))  # no half-written library left behind
    tried = runs.read_text().count("run")
    # the refusal is remembered (for this compiler, flags and source): the next process says why without
    # running the compiler again
    native.load.cache_clear()
    assert native.load() == got
    assert runs.read_text().count("run") == tried


@pytest.mark.parametrize(("macros", "gnu"), [
    ("#define __GNUC__ 12\n", True),
    ("#define __GNUC__ 4\n#define __clang__ 1\n", False),  # Clang links its own OpenMP runtime
    ("#define __SOMETHING__ 1\n", False),
])
def test_openmp_only_with_gcc(tmp_path: Path, macros: str, gnu: bool) -> None:
    """-fopenmp joins torch's OpenMP runtime only when it links GNU OpenMP, which GCC's does."""
    fake = tmp_path / "cc-fake"
    fake.write_text(f"#!/bin/sh\nprintf '{macros}'\n")
    fake.chmod(0o755)
    assert native._gnu_compiler([str(fake)]) is gnu


def test_the_switch_turns_the_kernel_off(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.load() == native.Unavailable(f"{native.DISABLE_ENV}=0")


def test_the_kernel_is_built_once_and_a_broken_library_is_built_again(fresh_loader: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    first = native.load()
    assert isinstance(first, native.Kernel) and first.path.parent == fresh_loader
    native.load.cache_clear()
    builds: list[Path] = []
    build = native._build

    def counting(cc: list[str], flags: tuple[str, ...], target: Path) -> str | None:
        builds.append(target)
        return build(cc, flags, target)

    monkeypatch.setattr(native, "_build", counting)
    assert isinstance(native.load(), native.Kernel) and not builds  # reused from the cache
    # A library that does not load (a disk filled mid-copy, say) is built again. In another process: this one
    # has the first library loaded, and the loader would hand back that one for the same path.
    first.path.unlink()
    first.path.write_bytes(b"not a shared library")
    code = "from mpaudit.trace import native; k = native.load(); print(type(k).__name__, k.path)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "MPAUDIT_CACHE_DIR": str(fresh_loader)})
    assert done.stdout.split() == ["Kernel", str(first.path)]
    assert first.path.read_bytes()[:4] == b"\x7fELF"


def test_the_build_depends_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """-march=native code is for the CPU it was built on: a cache shared across machines keeps one per CPU."""
    cc = ["cc"]
    source = native.SOURCE.read_bytes()
    one = native._build_key(cc, native.FLAGS, source)
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    assert native._build_key(cc, native.FLAGS, source) != one


def test_one_thread_or_two_give_the_same_bits(kernel: native.Kernel) -> None:
    """Pieces of 2^14 values are summed in order whatever the thread count: every column, the sum's included."""
    if not kernel.threaded:
        pytest.skip("this build of the kernel runs on one thread")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5 * reduce.NATIVE_THREADED_MIN + 123, generator=g) * 1e3
    x[::997] = math.nan
    out = []
    for threads in (1, 2, 3):
        row = torch.tensor(reduce.empty_rows(1))
        for full in (1, 0):
            kernel.stats(x.data_ptr(), x.numel(), row.data_ptr(), full, threads)
        out.append(row.numpy())
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_relative_updates_equal_the_torch_ops(kernel: native.Kernel) -> None:
    """Updates of weights of every kind (zeros, subnormals, huge, non-finite before or after), three tensors in a
    block with padding between them, on one thread and on two."""
    g = torch.Generator().manual_seed(2)
    sizes = [5, reduce.ROW + 1, 3 * reduce.NATIVE_THREADED_MIN]
    starts = np.cumsum([0] + [reduce.rows_for(n) for n in sizes]).tolist()
    before = torch.zeros(starts[-1], reduce.ROW)
    after = torch.zeros_like(before)
    for n, at in zip(sizes, starts, strict=False):
        w = torch.randn(n, generator=g) * 10.0 ** torch.randint(-40, 37, (n,), generator=g).float()
        w[: len(SPECIALS)] = torch.tensor(SPECIALS)[:n]
        step = w * torch.randn(n, generator=g) * 10.0 ** torch.randint(-12, 1, (n,), generator=g).float()
        step[-3:] = torch.tensor([math.inf, math.nan, 0.0])[: min(3, n)]
        before.view(-1)[at * reduce.ROW : at * reduce.ROW + n] = w
        after.view(-1)[at * reduce.ROW : at * reduce.ROW + n] = w + step
    rows = [0, 1, 2]
    results = []
    for use, threads in ((False, 1), (True, 1), (True, 2)):
        stats = reduce.StatsRows(3, use_native=use)
        stats.start(torch.device("cpu"))
        layout = stats.layout([r for r, n in zip(rows, sizes, strict=True) for _ in range(reduce.rows_for(n))])
        with reduce.cpu_threads(threads):
            stats.add_updates(before.clone(), after.clone(), layout, rows, sizes)
        host, counts = stats.collect(Parallel())
        assert counts == sizes and stats.partial == [True] * 3
        results.append(host.copy())
    assert reduce.same_statistics(results[0], results[1], rtol=0.0)  # (NaNs made by arithmetic: either sign)
    assert np.array_equal(results[1], results[2])
    nan = results[0][:, reduce._POSINF_BIN + 1] + results[0][:, reduce._NEGINF_BIN + 1]
    assert (nan > 0).all() and (results[0][:, reduce._POSINF_BIN] > 0).any()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_call_leaves_nothing_behind_for_the_next(kernel: native.Kernel, threads: int) -> None:
    """Each thread keeps its histograms between calls and clears only the bins a call could touch: a call with
    values in every binade, NaN and Inf, then calls with values in a few binades, zeros only, one value, must each
    count only their own values."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(4 * reduce.NATIVE_THREADED_MIN, generator=g) * 10.0 ** torch.randint(
        -45, 38, (4 * reduce.NATIVE_THREADED_MIN,), generator=g).float()
    wide[::101] = math.nan
    wide[::103] = -math.inf
    narrow = [torch.rand(3 * reduce.NATIVE_THREADED_MIN, generator=g) + 1.0, torch.zeros(50), -torch.zeros(9),
              torch.tensor([1e-40]), torch.tensor([-7.0])]
    for t in narrow:
        for first in (wide, -wide):
            before, row = torch.tensor(reduce.empty_rows(1)), torch.tensor(reduce.empty_rows(1))
            kernel.stats(first.data_ptr(), first.numel(), before.data_ptr(), 1, threads)
            kernel.stats(t.data_ptr(), t.numel(), row.data_ptr(), 1, threads)
            assert reduce.same_statistics(row.numpy(), _rows([t], True, False), rtol=1e-6), t[:3]


def test_merging_rows_in_the_kernel_equals_numpy(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    g = np.random.default_rng(4)
    parts = []
    for _ in range(3):
        rows = reduce.empty_rows(7)
        rows[:, : reduce._KEY_BINS] = g.integers(0, 1000, (7, reduce._KEY_BINS))
        floats = rows.view(np.float64)
        floats[:, reduce._COL_NONZERO] = g.integers(0, 1000, 7)
        floats[:, reduce._COL_SUM] = g.random(7) * 1e3
        floats[:, reduce._COL_MAX] = g.random(7) * 1e3
        rows[:, reduce._COL_MIN] = g.integers(-(2**31), 2**31 - 1, 7)
        parts.append(rows)
    merged = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(reduce, "native_kernel", lambda: native.Unavailable("for the test"))
        total = reduce.empty_rows(7)
        for rows in parts:
            reduce.merge_rows(total, rows)
        merged.append(total)
    assert np.array_equal(merged[0], merged[1])
    assert (merged[0][:, reduce._COL_MIN] == np.min([p[:, reduce._COL_MIN] for p in parts], axis=0)).all()


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.delenv("MPAUDIT_CACHE_DIR", raising=False)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native.cache_dir().parent == tmp_path / "tmp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert native.cache_dir() == tmp_path / "cache" / "mpaudit"


def test_dense_tensors_in_another_order_are_read_in_place(kernel: native.Kernel) -> None:
    """A channels-last activation or a transposed gradient fills its memory in another order: read in place, same
    statistics; a tensor with gaps or repeats is copied first."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, 5, 3, generator=g) * 1e3
    base[0, 1, 2, 0] = math.inf
    last = base.to(memory_format=torch.channels_last)
    assert not last.is_contiguous() and reduce._dense(last)
    sliced, expanded = base[:, ::2], torch.randn(5, 1, generator=g).expand(5, 4)
    assert not reduce._dense(sliced) and not reduce._dense(expanded) and reduce._dense(base.t() if base.dim() == 2
                                                                                      else base.permute(3, 1, 0, 2))
    cases = [last, last.bfloat16(), base.permute(3, 1, 0, 2), sliced, expanded, last.half()]
    got, want = _rows(cases, True, True), _rows([c.contiguous() for c in cases], True, False)
    assert reduce.same_statistics(got, want)
    rows = reduce.StatsRows(2)
    rows.start(torch.device("cpu"))
    last_bf16 = last.bfloat16()
    with _OpLog() as log:
        rows.add(0, last)
        rows.add(1, last_bf16)
    assert not {"clone", "copy_", "_to_copy", "contiguous", "reshape", "view"} & set(log.ops), log.ops


def test_a_cache_others_can_write_is_not_used(fresh_loader: Path) -> None:
    """A library is code this process runs: never from a folder another user could have put one in."""
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    fresh_loader.chmod(0o777)
    got = native.load()
    assert isinstance(got, native.Unavailable) and "is not this user's alone" in got.reason
    fresh_loader.chmod(0o700)
    native.load.cache_clear()
    assert isinstance(native.load(), native.Kernel)
