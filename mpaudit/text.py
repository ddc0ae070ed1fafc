"""How numbers and messages are written for people, in every view (terminal, HTML, Markdown, compare, suites).

Plain Python, no torch; the one place a number's format is decided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_ERROR_CHARS = 200
"""Error messages quoted in a sentence or a table cell are cut to their first line and this many characters."""


def fmt(x: Any, digits: int = 4) -> str:
    """A number for people: ``digits`` significant digits, non-finite spelled out, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "+Inf" if x > 0 else "-Inf"
        return f"{x:.{digits}g}"
    return str(x)


def cut(text: str | None, limit: int = MAX_ERROR_CHARS) -> str:
    """The first line of ``text``, cut to ``limit`` characters (an ellipsis marks the cut)."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def byte_size(n: float) -> str:
    """Bytes for people: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def recipe_text(config: Mapping[str, Any]) -> str:
    """The training recipe a result's ``config`` records, in words (empty for the plain default or older results):
    ``custom_step()`` or ``LambdaLR scheduler, clip_grad_norm 1, grad_accumulation 4``."""
    if config.get("custom_step"):
        return "custom_step() (the task's own step through amp)"
    parts = []
    if config.get("scheduler"):
        parts.append(f"{config['scheduler']} scheduler")
    if config.get("clip_grad_norm") is not None:
        parts.append(f"clip_grad_norm {config['clip_grad_norm']:g} (after unscale_)")
    if (config.get("grad_accumulation") or 1) > 1:
        parts.append(f"grad_accumulation {config['grad_accumulation']}")
    return ", ".join(parts)
