"""Code that applies a verified recommendation in the user's own training loop."""

from __future__ import annotations

import math

from mpaudit.results.model import Recommendation


def snippet(rec: Recommendation) -> str:
    """Python that applies ``rec`` in the user's own training loop."""
    lines = ["import mpaudit", "import torch", ""]
    if rec.init_scale is not None:
        k = math.log2(rec.init_scale)
        exp = f"2**{k:g}" if k == int(k) else repr(rec.init_scale)
        lines.append(f'scaler = torch.amp.GradScaler("cuda", init_scale={exp})')
    if rec.keep_fp32:
        lines.append(f"with mpaudit.keep_fp32(model, {list(rec.keep_fp32)!r}):")
        lines.append("    train(model)  # your training loop, unchanged")
    return "\n".join(lines)
