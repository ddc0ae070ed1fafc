"""Non-finite floats in JSON: strict JSON has no NaN/Infinity literal, so results write them as strings.

Every result class (run, trace, speed and memory) encodes and decodes floats through these two functions.
"""

from __future__ import annotations

import math
from typing import Any

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""The strings written for non-finite floats, and the values they are read back as."""


def encode_float(x: float) -> float | str:
    """``x`` itself when finite, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def decode_float(x: Any) -> float:
    """A float from JSON: a number, one of the strings above, or null (read as NaN, "not measured")."""
    if isinstance(x, str):
        if x in NONFINITE:
            return NONFINITE[x]
        raise ValueError(f"not a number: {x!r}")
    return math.nan if x is None else float(x)
