"""What float8 training's casts do to each Linear layer's GEMM operands, measured on the real training tensors.

On a traced step, :class:`Fp8Probe` takes every Linear layer's input (forward hook), weight and output gradient
(a hook on its output) and casts each GEMM operand to float8 exactly as a recipe would: torchao's own scale
(``tensor_to_scale`` with the recipe's granularity, axis and power-of-two rounding; for MX torchao's ``to_mx``) and its
own saturating cast. It counts the nonzero values that flushed to zero, landed subnormal or saturated, and bins the
scaled values by binade (:class:`~mpaudit.numerics.fp8.CastStats`). In the fp32 arm it does so for every recipe the
audit asks for and its alternative — the prediction; in a float8 arm for that arm's recipe, on the tensors the arm
itself casts (its bf16 activations and gradients) — the observation.

Which operand is cast along which axis (torchao's ``matmul_with_hp_or_float8_args``; the contraction dimension of
each GEMM): forward: input per row (its last dimension), weight per output row; input gradient: grad_output per row,
weight per input column; weight gradient: grad_output per column (over the tokens), input per column. Tensorwise
scaling uses one scale per tensor for all of them. Counts stay on the device until :meth:`Fp8Probe.finish_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpaudit.numerics.formats import HIST_BINS, HIST_MIN_EXP
from mpaudit.numerics.fp8 import FP8_FORMATS, CastStats, Fp8Trace
from mpaudit.run.fp8 import MX_BLOCK, import_torchao, quiet_import
from mpaudit.trace.tracer import layer_name


class _Cast:
    """One operand's cast: the torchao cast config it follows, the axis its scales reduce, its format."""

    def __init__(self, gemm: str, operand: str, dtype: torch.dtype, granularity: Any, axis: int | None,
                 pow2: bool) -> None:
        self.gemm, self.operand, self.dtype = gemm, operand, dtype
        self.granularity, self.axis, self.pow2 = granularity, axis, pow2
        self.format = "e4m3" if dtype == torch.float8_e4m3fn else "e5m2"


def _casts(recipe: str) -> list[_Cast]:
    """The six operand casts of a Linear layer under ``recipe`` (tensorwise / rowwise), read from torchao's config."""
    fp8 = import_torchao()
    from torchao.float8.config import ScalingGranularity

    c = fp8.Float8LinearConfig.from_recipe_name(recipe)

    def axis(cfg: Any, dim: int) -> int | None:
        return dim if cfg.scaling_granularity is ScalingGranularity.AXISWISE else None

    # the operands as torchao holds them: input (tokens, K), weight.t() (K, N), grad_output (tokens, N)
    plan = [
        ("forward", "input", c.cast_config_input, -1),
        ("forward", "weight", c.cast_config_weight, 0),
        ("grad_input", "grad_output", c.cast_config_grad_output, -1),
        ("grad_input", "weight", c.cast_config_weight_for_grad_input, -1),
        ("grad_weight", "grad_output", c.cast_config_grad_output_for_grad_weight, 0),
        ("grad_weight", "input", c.cast_config_input_for_grad_weight, 0),
    ]
    out = []
    for gemm, operand, cfg, dim in plan:
        if cfg.scaling_type.value == "disabled":
            continue  # this operand stays in high precision in the recipe
        out.append(_Cast(gemm, operand, cfg.target_dtype, cfg.scaling_granularity, axis(cfg, dim),
                         c.round_scales_to_power_of_2))
    return out


class Fp8Probe:
    """Float8 cast statistics of the Linear layers at ``paths`` for ``recipes`` on traced steps.

    Protocol, like the tracer's: ``with probe:`` around the loop; per traced step ``start_step`` → forward/backward
    → ``finish_step``. Hooks do nothing on other steps.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], recipes: Sequence[str], autocast_input: bool = False):
        self.model = model
        self.paths = list(paths)
        self.recipes = list(recipes)
        self.autocast_input = autocast_input
        """Cast the input to the autocast dtype first, as torchao's ``Float8Linear`` does (a float8 arm)."""
        self._plans = {r: _casts(r) for r in self.recipes if r != "mxfp8"}
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._step = 0
        self._pending: dict[tuple[str, str, str, str], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        self._order: list[str] = []
        self._notes: list[str] = []
        self._merged = Fp8Trace()
        self._hist_ones: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks

    def __enter__(self) -> Fp8Probe:
        modules = dict(self.model.named_modules())
        for path in self.paths:
            self._handles.append(modules[path].register_forward_hook(self._hook(layer_name(path))))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        self._pending.clear()

    def start_step(self, step: int) -> None:
        self._step, self._active = step, True
        self._pending.clear()
        self._order = []

    def finish_step(self) -> Fp8Trace | None:
        if not self._active:
            return None
        self._active = False
        keys = list(self._pending)
        stats: dict[tuple[str, str, str, str], CastStats] = {}
        if keys:
            counts = torch.stack([t for k in keys for _, t, _ in self._pending[k]]).cpu().numpy()
            hists = torch.stack([h for k in keys for _, _, h in self._pending[k]]).cpu().numpy()
            i = 0
            for key in keys:
                for fmt, _, _ in self._pending[key]:
                    row, hist = counts[i], hists[i]
                    i += 1
                    record = CastStats(format=fmt, count=int(row[0]), nonzero=int(row[1]), flushed=int(row[2]),
                                       subnormal=int(row[3]), saturated=int(row[4]), amax=float(row[5]),
                                       scale_log2_min=float(row[6]), scale_log2_max=float(row[7]),
                                       hist=hist.astype(np.int64))
                    stats[key] = stats[key].merge(record) if key in stats else record
        self._pending.clear()
        summary = Fp8Trace(stats=stats, steps=(self._step,), layers=tuple(self._order),
                           notes=tuple(dict.fromkeys(self._notes)))
        self._merged = self._merged.merge(summary)
        return summary

    def summary(self) -> Fp8Trace:
        return self._merged

    def _hook(self, layer: str) -> Any:
        def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            if self.autocast_input and torch.is_autocast_enabled():
                x = x.to(torch.get_autocast_dtype("cuda"))
            if layer not in self._order:
                self._order.append(layer)
            x2 = x.reshape(-1, x.shape[-1])
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            weight_t = weight.detach().t()
            with torch.no_grad():
                for recipe in self.recipes:
                    self._forward_casts(layer, recipe, x, x2, weight_t)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._backward_casts(layer, g))

        return forward_hook

    def _forward_casts(self, layer: str, recipe: str, x: torch.Tensor, x2: torch.Tensor,
                       weight_t: torch.Tensor) -> None:
        if recipe == "mxfp8":
            self._mx(layer, recipe, "forward", "input", x2)
            self._mx(layer, recipe, "forward", "weight", weight_t.t())
            self._mx(layer, recipe, "grad_input", "weight", weight_t)
            self._mx(layer, recipe, "grad_weight", "input", x2.t())
            return
        for cast in self._plans[recipe]:
            if cast.operand == "input":
                self._cast(layer, recipe, cast, x if cast.gemm == "forward" else x2)
            elif cast.operand == "weight":
                self._cast(layer, recipe, cast, weight_t)

    def _backward_casts(self, layer: str, grad: torch.Tensor) -> None:
        if not self._active:
            return
        g2 = grad.detach().reshape(-1, grad.shape[-1])
        with torch.no_grad():
            for recipe in self.recipes:
                if recipe == "mxfp8":
                    self._mx(layer, recipe, "grad_input", "grad_output", g2)
                    self._mx(layer, recipe, "grad_weight", "grad_output", g2.t())
                    continue
                for cast in self._plans[recipe]:
                    if cast.operand == "grad_output":
                        self._cast(layer, recipe, cast, g2)

    # ------------------------------------------------------------------ the casts

    def _cast(self, layer: str, recipe: str, cast: _Cast, x: torch.Tensor) -> None:
        from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

        scale = tensor_to_scale(x, cast.dtype, scaling_granularity=cast.granularity, axiswise_dim=cast.axis,
                                round_scales_to_power_of_2=cast.pow2)
        scaled = x.to(torch.float32) * scale
        quantized = to_fp8_saturated(scaled, cast.dtype).to(torch.float32)
        self._record(layer, recipe, cast.gemm, cast.operand, cast.format, x, scaled, quantized, scale)

    def _mx(self, layer: str, recipe: str, gemm: str, operand: str, x: torch.Tensor) -> None:
        """MX cast of ``x`` in blocks of 32 along its last dimension (torchao's ``to_mx``, RCEIL scales, e4m3)."""
        if x.shape[-1] % MX_BLOCK:
            self._notes.append(f"{layer}: the {gemm} GEMM's contraction dimension ({x.shape[-1]}) is not a multiple "
                               f"of {MX_BLOCK}, so MX scaling cannot cast it")
            return
        with quiet_import():
            from torchao.prototype.mx_formats.config import ScaleCalculationMode
            from torchao.prototype.mx_formats.mx_tensor import to_mx

        x = x.contiguous()
        scale_e8m0, data = to_mx(x, torch.float8_e4m3fn, MX_BLOCK, ScaleCalculationMode.RCEIL)
        exponent = scale_e8m0.view(torch.uint8).to(torch.float32) - 127.0
        blocks = x.to(torch.float32).reshape(*x.shape[:-1], -1, MX_BLOCK)
        scale = torch.exp2(-exponent).reshape(*x.shape[:-1], -1, 1)
        scaled = (blocks * scale).reshape(x.shape)
        quantized = data.to(torch.float32).reshape(x.shape)
        self._record(layer, recipe, gemm, operand, "e4m3", x, scaled, quantized, scale)

    def _record(self, layer: str, recipe: str, gemm: str, operand: str, fmt: str, x: torch.Tensor,
                scaled: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor) -> None:
        """Count what the cast did: nonzero finite values that became zero, stayed subnormal, or lay beyond the value
        that rounds to the format's max (its max plus half an ulp: a value the cast changes by more than rounding)."""
        spec = FP8_FORMATS[fmt]
        saturates_above = spec.max + 2.0 ** (spec.max_binade - spec.mantissa_bits - 1)
        xf = x.to(torch.float32)
        finite = torch.isfinite(xf)
        nonzero = finite & (xf != 0)
        q_abs = quantized.abs()
        min_normal = spec.min_normal
        log_scale = torch.log2(scale.to(torch.float32))
        f64 = torch.float64
        counts = torch.stack([
            torch.tensor(float(x.numel()), dtype=f64, device=x.device),
            nonzero.sum().to(f64),
            (nonzero & (quantized == 0)).sum().to(f64),
            (nonzero & (q_abs > 0) & (q_abs < min_normal)).sum().to(f64),
            (nonzero & (scaled.abs() >= saturates_above)).sum().to(f64),
            torch.where(finite, xf.abs(), 0.0).amax().to(f64),
            log_scale.amin().to(f64),
            log_scale.amax().to(f64),
        ])
        binade = torch.frexp(scaled.abs())[1].to(torch.int64) - 1 - HIST_MIN_EXP
        index = torch.where(nonzero, binade.clamp(0, HIST_BINS - 1), HIST_BINS).reshape(-1)
        hist = torch.zeros(HIST_BINS + 1, dtype=torch.int64, device=x.device)
        hist.index_add_(0, index, torch.ones_like(index))
        self._pending.setdefault((layer, recipe, gemm, operand), []).append((fmt, counts, hist[:HIST_BINS]))


__all__ = ["Fp8Probe"]
