"""The traced statistics' one-pass CPU kernel (``stats_kernel.c``), compiled with the machine's C compiler on first
use and loaded with ctypes.

Torch's eager ops reduce a tensor in about ten passes (shift, bin, abs, zero the non-finite, count, sum, max,
min), each reading and writing the whole tensor; the kernel reads it once, straight from the tensor's memory, and
computes the sampled weights' relative updates in the same pass. Its statistics are the torch path's bit for bit,
but for the sum of |x|, which it adds in another order (fp32 partial sums of 1024 values, in double), and the sign
bit of a NaN made by arithmetic (the CPU's choice; either sign counts as NaN).

It is built once per source, compiler, flags and CPU into the cache (``$MPAUDIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/mpaudit``, else ``~/.cache/mpaudit``), with ``-O3 -march=native`` and, where torch runs on GNU
OpenMP, ``-fopenmp``, atomically (processes starting together, like the ranks of a ``torchrun`` job, each write
their own file and rename it into place). Without a compiler, or when the build or its check fails, or with
``MPAUDIT_NATIVE_KERNEL=0``, tracing uses the torch reductions: the same statistics, slower.
:func:`mpaudit.trace.reduce.kernel_description` says which runs, for a result's environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("stats_kernel.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")
"""Flags of every build (no fused multiply-adds: the relative updates must round as torch's two ops do). Tried
first with ``-march=native`` and, where torch runs on GNU OpenMP, ``-fopenmp``; without them when the compiler
refuses."""
NATIVE_FLAG = "-march=native"
OPENMP_FLAG = "-fopenmp"
COMPILE_TIMEOUT_S = 120
DISABLE_ENV = "MPAUDIT_NATIVE_KERNEL"
"""Set to 0 to trace with the torch reductions only."""


@dataclass(frozen=True)
class Kernel:
    """The loaded kernel (see ``stats_kernel.c``): ``stats(ptr, n, row_ptr, full, threads)`` adds n fp32 values at
    ``ptr`` to the int64 statistics row at ``row_ptr``; ``half(ptr, n, row_ptr, full, threads, fp16)`` n bf16
    (``fp16=0``) or fp16 values; ``update(before_ptr, after_ptr, n, row_ptr, threads)`` adds the relative updates
    of n sampled weights; ``merge(into_ptr, rows_ptr, n_rows)`` merges statistics rows. ``threaded``: built with
    OpenMP (else ``threads`` is ignored); ``layout`` is what the file was written for (bins, key shift, row width,
    the min key of zero); ``path`` the shared library."""

    stats: Callable[[int, int, int, int, int], None]
    half: Callable[[int, int, int, int, int, int], None]
    update: Callable[[int, int, int, int, int], None]
    merge: Callable[[int, int, int], None]
    threaded: bool
    layout: tuple[int, ...]
    path: Path


@dataclass(frozen=True)
class Unavailable:
    """Why there is no kernel, in one sentence."""

    reason: str


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else the one Python was built with, else ``cc``, if it is on the PATH."""
    for spec in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if not spec:
            continue
        words = shlex.split(spec)
        if words and shutil.which(words[0]):
            return words
    return None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MPAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpaudit``, else
    ``~/.cache/mpaudit``; when that cannot be written (a read-only home), a folder of this user's in the temporary
    directory."""
    explicit = os.environ.get("MPAUDIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    preferred = Path(base) / "mpaudit"
    try:
        preferred.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK | os.X_OK):
            return preferred
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    fallback = Path(tempfile.gettempdir()) / f"mpaudit-{uid}"
    with contextlib.suppress(OSError):
        fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback


def _private(folder: Path) -> bool:
    """Whether ``folder`` is this user's and not writable by everyone (a library another user could put there, in
    a shared temporary directory, say, would be code this process runs)."""
    try:
        info = folder.stat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return True
    return info.st_uid == os.getuid() and not info.st_mode & 0o002


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep))  # once per distinct line (every core repeats them)


def _build_key(cc: list[str], flags: tuple[str, ...], source: bytes) -> str:
    binary = Path(shutil.which(cc[0]) or cc[0]).resolve()
    try:
        stamp = f"{binary} {binary.stat().st_mtime_ns} {binary.stat().st_size}"
    except OSError:
        stamp = str(binary)
    h = hashlib.sha256()
    for part in (source, " ".join(cc).encode(), stamp.encode(), " ".join(flags).encode(),
                 platform.machine().encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _build(cc: list[str], flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the kernel into ``target`` (atomically); the compiler's complaint when it fails, else None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S, check=False)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return lines[0] if lines else f"exit status {done.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _load(path: Path) -> Kernel:
    lib = ctypes.CDLL(str(path))
    layout_fn = lib.mpaudit_stats_layout
    layout_fn.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    layout_fn.restype = None
    out = (ctypes.c_int64 * 4)()
    layout_fn(out)
    stats = lib.mpaudit_stats_f32
    stats.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    stats.restype = None
    half = lib.mpaudit_stats_half
    half.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    half.restype = None
    update = lib.mpaudit_update_f32
    update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    update.restype = None
    merge = lib.mpaudit_merge_rows
    merge.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    merge.restype = None
    threaded = lib.mpaudit_stats_threaded
    threaded.argtypes = []
    threaded.restype = ctypes.c_int
    return Kernel(stats=stats, half=half, update=update, merge=merge, threaded=bool(threaded()), layout=tuple(out),
                  path=path)


def _gnu_compiler(cc: list[str]) -> bool:
    """Whether ``cc`` is GCC (whose ``-fopenmp`` links GNU OpenMP, the runtime torch already loaded), not Clang or
    another compiler that defines ``__GNUC__`` too but links its own OpenMP runtime."""
    try:
        done = subprocess.run([*cc, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    macros = done.stdout
    return done.returncode == 0 and "__GNUC__" in macros and not any(
        name in macros for name in ("__clang__", "__INTEL_COMPILER", "__INTEL_LLVM_COMPILER", "__NVCOMPILER"))


def _torch_openmp() -> bool:
    """Whether the torch in this process runs on GNU OpenMP (``libgomp``, as the PyPI Linux wheels do). Only then is
    the kernel built with ``-fopenmp``: it then shares torch's OpenMP runtime and its threads; against another
    runtime (Intel's, LLVM's) it would start a second pool of threads."""
    import torch  # noqa: F401  (its libraries, OpenMP's among them, are mapped once it is imported)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "/libgomp" in maps


@functools.cache
def load() -> Kernel | Unavailable:
    """The kernel, built into the cache if it is not there yet (once per process), or why there is none."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in {"0", "false", "no", "off"}:
        return Unavailable(f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}")
    if platform.system() == "Windows":
        return Unavailable("the one-pass kernel is built only on Linux and macOS")
    cc = _compiler()
    if cc is None:
        return Unavailable("no C compiler found (set CC, or install cc)")
    source = SOURCE.read_bytes()
    problems = []
    openmp = (OPENMP_FLAG,) if _torch_openmp() else ()
    folder = cache_dir()
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    if not _private(folder):
        return Unavailable(f"the kernel cache {folder} is not this user's alone (set MPAUDIT_CACHE_DIR)")
    for flags in dict.fromkeys([(NATIVE_FLAG, *openmp, *FLAGS), (NATIVE_FLAG, *FLAGS), FLAGS]):
        target = folder / f"stats_kernel-{_build_key(cc, flags, source)}.so"
        failed = target.with_suffix(".failed")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if target.exists():
                with contextlib.suppress(OSError, AttributeError):  # unreadable: built again below
                    return _load(target)
            if failed.exists():  # refused before: not tried again in every process
                problems.append(f"{' '.join(cc)} {' '.join(flags)}: {failed.read_text().strip()}")
                continue
            problem: str | None
            if OPENMP_FLAG in flags and not _gnu_compiler(cc):
                problem = "not GCC: its OpenMP runtime would be a second one beside torch's"
            else:
                problem = _build(cc, flags, target)
            if problem is not None:
                problems.append(f"{' '.join(cc)} {' '.join(flags)}: {problem}")
                with contextlib.suppress(OSError):
                    failed.write_text(problem + "\n")
                continue
            return _load(target)
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            problems.append(f"{target}: {e}")
    return Unavailable("the kernel did not build (" + "; ".join(problems) + ")")
