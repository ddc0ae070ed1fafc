"""Code that applies a verified recommendation in the user's own training loop."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mpaudit.arms import fp8_recipe_of
from mpaudit.results.model import Recommendation

FP8_FILTER_TOOLS = ("torchao", "torchtitan", "accelerate")
"""The float8 training stacks a verified ``exclude_from_fp8`` list is given for, ready to paste."""


def snippet(rec: Recommendation, linear_layers: Sequence[str] = ()) -> str:
    """Python that applies ``rec`` in the user's own training loop (a float8 filter: torchao's own API; see
    :func:`fp8_filter_snippets` for torchtitan and Accelerate)."""
    if rec.exclude_from_fp8 or rec.fp8_recipe is not None:
        return fp8_filter_snippets(rec, linear_layers)["torchao"]
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


def _substring_matches(excluded: Sequence[str], linear_layers: Sequence[str]) -> dict[str, list[str]]:
    """For each excluded path, the other Linear layers whose name contains it (torchtitan and torchao's auto filter
    match ``filter_fqns`` by substring, so they would keep those out of float8 too)."""
    out: dict[str, list[str]] = {}
    for path in excluded:
        extra = [fqn for fqn in linear_layers if path in fqn and fqn not in excluded]
        if extra:
            out[path] = extra
    return out


def fp8_filter_snippets(rec: Recommendation, linear_layers: Sequence[str] = ()) -> dict[str, str]:
    """A verified float8 plan ready to paste, per training stack: a torchao ``module_filter_fn`` (with a check that
    every excluded path names a Linear layer: a filter that matches nothing is a bug, not a no-op), a torchtitan
    ``filter_fqns`` list and an Accelerate ``module_filter_func``. ``linear_layers`` (the model's Linear paths) lets
    the torchtitan snippet warn where its substring matching would exclude more than the verified list."""
    recipe = rec.fp8_recipe or fp8_recipe_of(rec.arm) or "tensorwise"
    excluded = list(rec.exclude_from_fp8)
    listed = "{" + ", ".join(repr(p) for p in excluded) + "}" if excluded else "set()"
    torchao = [
        "import torch",
        "from torchao.float8 import Float8LinearConfig, convert_to_float8_training",
        "",
        f"EXCLUDE_FROM_FP8 = {listed}  # verified by mpaudit: these Linear layers stay in bf16",
        "linear_fqns = {fqn for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}",
        "unknown = EXCLUDE_FROM_FP8 - linear_fqns",
        'assert not unknown, f"not Linear layers of this model (the filter would match nothing): {unknown}"',
        "",
        "def module_filter_fn(module: torch.nn.Module, fqn: str) -> bool:",
        "    return fqn not in EXCLUDE_FROM_FP8",
        "",
        "convert_to_float8_training(model, module_filter_fn=module_filter_fn,",
        f'                           config=Float8LinearConfig.from_recipe_name("{recipe}"))',
        "# train under torch.autocast(\"cuda\", dtype=torch.bfloat16) as before; the weights stay fp32",
    ]
    converter = "quantize.linear.float8"
    titan = [
        "# torchtitan job config (TOML); older torchtitan versions call the section [float8]",
        "[model]",
        f'converters = ["{converter}"]',
        "",
        f"[{converter}]",
        f'recipe_name = "{recipe}"',
        "filter_fqns = [" + ", ".join(f'"{p}"' for p in excluded) + "]",
    ]
    for path, extra in _substring_matches(excluded, linear_layers).items():
        titan.append(f"# note: torchtitan matches filter_fqns by substring, so {path!r} also keeps "
                     + ", ".join(repr(x) for x in extra) + " out of float8 (mpaudit verified the exact list)")
    accelerate = [
        "import torch",
        "from accelerate import Accelerator",
        "from accelerate.utils import AORecipeKwargs",
        "from torchao.float8 import Float8LinearConfig",
        "",
        f"EXCLUDE_FROM_FP8 = {listed}  # verified by mpaudit",
        "",
        "# replaces Accelerate's default filter, which keeps the first and last Linear layers out of float8",
        "def module_filter_func(module: torch.nn.Module, fqn: str) -> bool:",
        "    return isinstance(module, torch.nn.Linear) and fqn not in EXCLUDE_FROM_FP8",
        "",
        'accelerator = Accelerator(mixed_precision="fp8", kwargs_handlers=[AORecipeKwargs(',
        f'    config=Float8LinearConfig.from_recipe_name("{recipe}"), module_filter_func=module_filter_func)])',
    ]
    return {"torchao": "\n".join(torchao), "torchtitan": "\n".join(titan), "accelerate": "\n".join(accelerate)}
