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
    if rec.fp32_master or rec.update_rounding is not None:
        lines.append("model = model.to(torch.bfloat16)  # weights, gradients and optimizer state in bf16, as before")
        args = ["model", "build_optimizer"]  # build_optimizer(model) -> your optimizer, on the bf16 parameters
        if rec.update_rounding is not None:
            args.append(f"rounding={rec.update_rounding!r}")
        if rec.fp32_master:
            args.append(f"fp32_master={list(rec.fp32_master)!r}")
        lines.append(f"optimizer = mpaudit.bf16_optimizer({', '.join(args)})")
        if rec.update_rounding == "stochastic" and not rec.fp32_master:
            lines.append("# AdamW only, with torchao installed, the same rounding: "
                         "torchao.optim._AdamW(model.parameters(), lr=..., bf16_stochastic_round=True)")
        lines.append("train(model, optimizer)  # your training loop, unchanged: optimizer.step() keeps small updates")
    return "\n".join(lines)
