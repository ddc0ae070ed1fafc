"""The environment a result was measured in: versions, device, dtype support, threads, TF32, seed."""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mpaudit.errors import UsageError
from mpaudit.trace.reduce import kernel_description

_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without CUDA is a usage error."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but this PyTorch sees no CUDA device.")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise UsageError(f"Unknown device {spec!r}; use auto, cpu or cuda.")


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in _CPU_FLAGS if f in present]
    return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dtype_support(device: torch.device) -> dict[str, bool]:
    """Whether the hardware computes bf16 / fp16 natively (fast), as opposed to emulating them slowly."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return {"bf16": torch.cuda.is_bf16_supported(), "fp16": major >= 6}
    flags = set(_cpu_flags())
    return {"bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "fp16": bool(flags & {"avx512_fp16", "amx_fp16"})}


def collect_env(
    device: torch.device, seed: int, task_path: Path, task_sha256: str, command: list[str]
) -> dict[str, Any]:
    """A JSON-ready description of where and how the audit ran."""
    from mpaudit import __version__

    env: dict[str, Any] = {
        "mpaudit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cuda_version": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "dtype_support": dtype_support(device),
        "threads": torch.get_num_threads(),
        "trace_kernel": kernel_description(device.type),
        "tf32": {
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
        },
        "seed": seed,
        "task_path": str(task_path),
        "task_sha256": task_sha256,
        "command": command,
    }
    return env


@contextlib.contextmanager
def tf32_setting(allow: bool) -> Iterator[None]:
    """Set TF32 for matmul and cuDNN for the duration of an audit, then restore the user's setting."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
