"""What a float8 arm means for torch: torchao's own conversion of the model's Linear layers, real or emulated.

The float8 arms (``fp8``, ``fp8-rowwise``, ``mxfp8``) train what a torchao user runs:
``torchao.float8.convert_to_float8_training(model, module_filter_fn=..., config=Float8LinearConfig.from_recipe_name(
recipe))`` swaps every ``nn.Linear`` the filter passes for a ``Float8Linear`` whose three GEMMs (forward, input
gradient, weight gradient) cast their operands to float8 with the recipe's dynamic scales; everything else runs under
bf16 autocast, and the weights stay fp32 (master weights). On a GPU with float8 units (compute capability 8.9 or
higher) the GEMMs are torchao's real kernels; everywhere else torchao's emulation (``emulate=True``: the same casts and
scales, then a high-precision matmul of the dequantised operands), whose numerics are float8's but whose speed says
nothing about a GPU. MX block scaling (``mxfp8``) trains through torchao's ``MXFP8TrainingOpConfig``
(``prototype.moe_training``) on GPUs with MX units (compute capability 10.0); elsewhere the arm is ``skipped`` (see
:func:`skip_reason`).

The conversion runs after the initial-weight fingerprint (:func:`mpaudit.run.prepare.prepare_arm`), so every arm
still proves it started from the same weights. A filter that excludes a module path naming no Linear layer of the
model is a :class:`~mpaudit.errors.UsageError`, not a no-op: a filter that silently stops matching is how a model
drifts back into float8 unnoticed.

torchao is an optional extra (``pip install mpaudit[fp8]``); it is imported only when a float8 arm is set up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mpaudit.arms import Arm
from mpaudit.errors import UsageError
from mpaudit.vocab import Fp8Mode

FP8_CAPABILITY = (8, 9)
"""CUDA compute capability from which torchao's float8 GEMMs (``torch._scaled_mm``) run on the GPU's units."""
MX_CAPABILITY = (10, 0)
"""CUDA compute capability from which MXFP8 GEMMs run on the GPU's units (Blackwell)."""
DIM_MULTIPLE = 16
"""``torch._scaled_mm`` needs both dimensions of a weight to be multiples of this on the GPU."""
MX_BLOCK = 32
"""Elements per MX scaling block along the contraction dimension."""

MX_SKIP_REASON = (
    "no MX training path runs on this device: torchao 0.18's MXFP8 training (prototype.moe_training) needs a GPU with "
    "MX units (compute capability 10.0) and triton; it has no emulated path (on a CPU its first forward fails)"
)


def torchao_available() -> bool:
    """True when torchao can be imported (without importing it)."""
    return importlib.util.find_spec("torchao") is not None


def require_torchao(arms: Sequence[Arm]) -> None:
    """A UsageError naming the first float8 arm when torchao is not installed."""
    wanted = [a.name for a in arms if a.fp8 is not None]
    if wanted and not torchao_available():
        raise UsageError(f"Arm {wanted[0]!r} trains float8 GEMMs with torchao, which is not installed: "
                         "pip install 'mpaudit[fp8]'.")


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Import torchao without its load-time log lines (kernels for GPUs this machine lacks, pytree notices)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_torchao() -> Any:
    """``torchao.float8``, imported quietly."""
    with quiet_import():
        import torchao.float8

    return torchao.float8


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def fp8_mode(arm: Arm, device: torch.device) -> Fp8Mode | None:
    """``real`` where the device has units for the arm's float8 GEMMs, ``emulated`` elsewhere; None for arms
    without float8."""
    if arm.fp8 is None:
        return None
    capability = _capability(device)
    needed = MX_CAPABILITY if arm.fp8 == "mxfp8" else FP8_CAPABILITY
    return "real" if capability is not None and capability >= needed else "emulated"


def skip_reason(arm: Arm, device: torch.device) -> str | None:
    """Why ``arm`` cannot run on ``device`` (one line), or None when it can."""
    if arm.fp8 == "mxfp8" and fp8_mode(arm, device) != "real":
        return MX_SKIP_REASON
    return None


def linear_paths(model: nn.Module) -> list[str]:
    """Module paths of the model's ``nn.Linear`` layers (subclasses included), in ``named_modules`` order; the
    root module is left out (torchao cannot swap it in place)."""
    return [path for path, m in model.named_modules() if path and isinstance(m, nn.Linear)]


def check_exclusions(model: nn.Module, excluded: Sequence[str]) -> None:
    """A UsageError when a path to keep out of float8 names no Linear layer of ``model``."""
    paths = linear_paths(model)
    unknown = [p for p in excluded if p not in paths]
    if unknown:
        shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
        raise UsageError(f"The float8 filter excludes {unknown[0]!r}, which names no Linear layer of the model "
                         f"(its Linear layers: {shown or 'none'}): a filter that matches nothing keeps nothing out "
                         "of float8.")


def float8_config(recipe: str, emulate: bool) -> Any:
    """torchao's ``Float8LinearConfig`` for ``recipe`` (``tensorwise`` or ``rowwise``), emulated or not."""
    fp8 = import_torchao()
    return dataclasses.replace(fp8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What converting a model did: the Linear layers now in float8, those kept out, and why some were.

    ``called`` fills as the model runs: the converted layers whose own forward has run. A converted layer whose
    parent multiplies by its weight directly (``nn.MultiheadAttention`` does with ``out_proj``) never calls it, so
    none of its GEMMs runs in float8 whatever the conversion says."""

    converted: list[str]
    excluded: list[str]
    notes: list[str]
    called: set[str] = dataclasses.field(default_factory=set)

    def in_float8(self) -> list[str]:
        """The converted layers that ran in float8: those called as modules, once any was (before the first
        step, every converted layer)."""
        if not self.called:
            return list(self.converted)
        return [p for p in self.converted if p in self.called]

    def all_notes(self) -> list[str]:
        """``notes``, and a note naming the converted layers that never ran as modules (once any did)."""
        idle = [p for p in self.converted if p not in self.called] if self.called else []
        if not idle:
            return list(self.notes)
        return [*self.notes, "Converted to float8 by torchao but never called as a module in training, so none of "
                "their GEMMs ran in float8 (a parent that uses the weight directly, as nn.MultiheadAttention does "
                "with out_proj, computes in the autocast dtype): " + ", ".join(idle) + "."]


def convert(model: nn.Module, arm: Arm, device: torch.device) -> Conversion:
    """Swap ``model``'s Linear layers for torchao's float8 ones under ``arm``'s recipe, in place (call it after the
    fingerprint). Layers in ``arm.exclude_from_fp8`` stay ``nn.Linear`` (bf16 under autocast); a path there that
    names no Linear layer raises UsageError. On real kernels, Linear layers whose dimensions are not multiples of 16
    stay out too (``torch._scaled_mm`` refuses them), with a note."""
    assert arm.fp8 is not None
    check_exclusions(model, arm.exclude_from_fp8)
    excluded = set(arm.exclude_from_fp8)
    real = fp8_mode(arm, device) == "real"
    misfits: list[str] = []

    def keep_in_fp8(module: nn.Module, fqn: str) -> bool:
        if fqn in excluded or not isinstance(module, nn.Linear):
            return False
        if real and (module.in_features % DIM_MULTIPLE or module.out_features % DIM_MULTIPLE):
            misfits.append(fqn)
            return False
        return True

    before = linear_paths(model)
    if arm.fp8 == "mxfp8":
        with quiet_import():
            from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig
            from torchao.quantization import quantize_
        chosen = [p for p in before if keep_in_fp8(model.get_submodule(p), p)]
        quantize_(model, MXFP8TrainingOpConfig(), filter_fn=lambda m, fqn: fqn in chosen)
        converted = chosen
    else:
        fp8 = import_torchao()
        fp8.convert_to_float8_training(model, module_filter_fn=keep_in_fp8,
                                       config=float8_config(arm.fp8, emulate=not real))
        converted = [p for p in before if is_float8_linear(model.get_submodule(p))]
    notes = []
    if misfits:
        notes.append("Kept out of float8 because a dimension is not a multiple of 16 (torch._scaled_mm needs it): "
                     + ", ".join(misfits) + ".")
    conversion = Conversion(converted=converted, excluded=sorted(excluded, key=before.index), notes=notes)
    if arm.fp8 != "mxfp8":  # MX converts the weights, not the modules: a direct use of the weight is MX too
        for path in converted:
            _note_first_call(model.get_submodule(path), path, conversion.called)
    return conversion


def _note_first_call(module: nn.Module, path: str, called: set[str]) -> None:
    """Add ``path`` to ``called`` the first time ``module`` runs, with a forward pre-hook that then removes itself
    (no cost after the first step)."""
    def hook(mod: nn.Module, args: Any) -> None:
        called.add(path)
        handle.remove()

    handle = module.register_forward_pre_hook(hook)


def unconvert(model: nn.Module) -> None:
    """Make every torchao ``Float8Linear`` compute as a plain ``nn.Linear`` from now on (in place), so the trained
    weights are evaluated in fp32 like every arm's. The modules themselves stay (only their ``forward`` changes):
    FSDP2 knows its parameters through them, so a replacement module would hold sharded weights it never gathers."""
    for path, module in model.named_modules():
        if path and is_float8_linear(module):
            module.forward = types.MethodType(nn.Linear.forward, module)


def is_float8_linear(module: nn.Module) -> bool:
    """True for torchao's float8 Linear layers."""
    return type(module).__name__ == "Float8Linear"


__all__ = ["Conversion", "check_exclusions", "convert", "fp8_mode", "linear_paths", "require_torchao", "skip_reason",
           "unconvert"]
