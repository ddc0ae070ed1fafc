"""Settings from outside the command line: rule thresholds from ``--threshold`` and ``pyproject.toml``.

``[tool.mpaudit.thresholds]`` in the nearest ``pyproject.toml`` (searched from the task file's folder up,
then the working directory) overrides the defaults in :class:`mpaudit.numerics.rules.Thresholds`; ``--threshold
NAME=VALUE`` overrides both.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpaudit.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_thresholds(specs: Iterable[str]) -> dict[str, float]:
    """``["gradient_underflow_error=0.05"]`` -> ``{"gradient_underflow_error": 0.05}``."""
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--threshold {spec!r} is not of the form NAME=VALUE.")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--threshold {spec!r}: {value!r} is not a number.") from None
    return out


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` (a file's folder or a folder), else in the cwd."""
    folder = start if start.is_dir() else start.parent
    for candidate in [folder.resolve(), *folder.resolve().parents, Path.cwd()]:
        path = candidate / "pyproject.toml"
        if path.is_file():
            return path
    return None


def pyproject_thresholds(task_path: Path) -> dict[str, Any]:
    """The ``[tool.mpaudit.thresholds]`` table of the nearest pyproject.toml, or an empty dict."""
    path = find_pyproject(task_path)
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path} could not be read as TOML: {exc}.") from exc
    table = data.get("tool", {}).get("mpaudit", {}).get("thresholds", {})
    if not isinstance(table, dict):
        raise UsageError(f"[tool.mpaudit.thresholds] in {path} must be a table of NAME = number.")
    return dict(table)
