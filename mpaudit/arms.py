"""The arms as plain data: one precision recipe each, trained from the same seed on the same batches.

| arm         | forward/backward                                  | weights & optimizer             | loss scaling   |
| ----------- | ------------------------------------------------- | ------------------------------- | -------------- |
| fp32        | fp32 (TF32 off unless asked)                      | fp32                            | none           |
| bf16        | ``torch.autocast(dtype=torch.bfloat16)``          | fp32 master weights             | none           |
| fp16        | ``torch.autocast(dtype=torch.float16)``           | fp32 master weights             | GradScaler     |
| bf16-pure   | bf16 (the model cast, no autocast)                | bf16 weights, grads, opt. state | none           |
| fp8         | float8 GEMMs in Linear layers (tensorwise), bf16  | fp32 master weights             | none           |
| fp8-rowwise | float8 GEMMs in Linear layers (rowwise), bf16     | fp32 master weights             | none           |
| mxfp8       | MXFP8 GEMMs in Linear layers (blocks of 32), bf16 | fp32 master weights             | none           |

``bf16-pure`` keeps no fp32 master copy: an update smaller than half a bf16 ulp of its weight (2^-9 of the weight's
binade) rounds away. Its recommended variants change how updates reach the bf16 weights: ``fp32_master`` (named
modules keep a persistent fp32 copy the optimizer steps) and ``update_rounding`` (``stochastic``: updates
computed in fp32 and rounded stochastically to bf16, exact in expectation; ``kahan``: a compensation buffer carries
what rounding lost into the next step). ``bf16-pure`` is not a default arm.

The float8 arms (``fp8``, ``fp8-rowwise``, ``mxfp8``; none a default) convert the model's ``nn.Linear`` layers with
torchao after the initial-weight fingerprint, so their GEMMs take float8 operands under the recipe's scaling, while
everything else runs under bf16 autocast. Their recommended variant keeps named Linear layers out of float8
(``exclude_from_fp8``, arm ``fp8+filter``).

No torch here: the readers of results (gate, compare, renderers) use the names and recipes too. What a recipe
means for torch (autocast, GradScaler, fp16 emulation) lives in :mod:`mpaudit.run.precision`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from mpaudit.errors import UsageError
from mpaudit.vocab import BASELINE

HalfDtype = Literal["bfloat16", "float16"]
"""The autocast dtypes of mixed-precision arms, by their ``torch`` attribute names."""

HALF_FORMAT: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16"}
"""The format name (as in :mod:`mpaudit.numerics.formats`) of each autocast dtype."""

Fp8Recipe = Literal["tensorwise", "rowwise", "mxfp8"]
"""How a float8 arm scales the operands of its GEMMs: ``tensorwise`` (one dynamic scale per tensor, torchao's
default recipe), ``rowwise`` (one power-of-two scale per row along the contraction dimension, torchao's ``rowwise``
recipe) or ``mxfp8`` (one e8m0 scale per block of 32 elements along the contraction dimension, OCP MX)."""
FP8_RECIPES: tuple[Fp8Recipe, ...] = ("tensorwise", "rowwise", "mxfp8")
FP8_ARM_OF_RECIPE: dict[str, str] = {"tensorwise": "fp8", "rowwise": "fp8-rowwise", "mxfp8": "mxfp8"}
"""The arm that trains each float8 recipe."""
ALTERNATIVE_RECIPE: dict[str, Fp8Recipe] = {"tensorwise": "rowwise", "rowwise": "tensorwise", "mxfp8": "rowwise"}
"""The scaling recipe tried as the alternative to a filter on each float8 recipe (and predicted beside it)."""

UpdateRounding = Literal["stochastic", "kahan"]
"""How a half-weight recipe rounds the optimizer's fp32 update into the bf16 weights (default: to nearest):
``stochastic`` (up with probability proportional to the remainder: exact in expectation) or ``kahan`` (a
compensation buffer keeps what rounding lost and adds it back at the next step)."""
UPDATE_ROUNDINGS: tuple[UpdateRounding, ...] = ("stochastic", "kahan")
ROUNDING_SUFFIX: dict[str, str] = {"stochastic": "sr", "kahan": "kahan"}
"""Arm-name suffix of each update rounding (``bf16-pure+sr``)."""


@dataclass(frozen=True)
class Arm:
    """A precision recipe: the autocast dtype (None for fp32), whether a GradScaler scales the loss, and the dtype
    the weights are stored in (None: fp32, the master weights of every autocast arm)."""

    name: str
    autocast_dtype: HalfDtype | None
    grad_scaler: bool
    description: str
    keep_fp32: tuple[str, ...] = ()
    """Module paths run in fp32 inside autocast (:func:`mpaudit.keep_fp32`): a recommendation under test."""
    init_scale: float | None = None
    """The GradScaler's initial loss scale; None keeps PyTorch's default (2^16)."""
    weights_dtype: HalfDtype | None = None
    """The dtype the model's weights, gradients and optimizer state are stored in (the model is cast to it after the
    initial-weight fingerprint); None keeps them fp32."""
    fp32_master: tuple[str, ...] = ()
    """Module paths whose parameters keep a persistent fp32 master copy the optimizer steps (half-weight arms only):
    a recommendation under test (:func:`mpaudit.bf16_optimizer`)."""
    update_rounding: UpdateRounding | None = None
    """How updates are rounded into the half-precision weights of the other parameters (half-weight arms only);
    None rounds to nearest, as the optimizer does by itself."""
    fp8: Fp8Recipe | None = None
    """The float8 training recipe of the model's Linear layers (torchao), None for arms without float8 GEMMs."""
    exclude_from_fp8: tuple[str, ...] = ()
    """Linear module paths a float8 arm keeps out of float8 (they run under bf16 autocast): a recommendation under
    test. Each must name a Linear layer of the model: a path that matches none is an error, not a no-op."""

    @property
    def is_baseline(self) -> bool:
        return self.autocast_dtype is None and self.weights_dtype is None

    @property
    def half_weights(self) -> bool:
        """True when the recipe stores the weights in half precision (no fp32 master copy, unless ``fp32_master``)."""
        return self.weights_dtype is not None

    @property
    def rounds_updates_to_nearest(self) -> bool:
        """True when small updates can round away: half-precision weights, updated by the optimizer alone (no
        fp32 master copy, no stochastic or compensated rounding). Only such arms get ``update_underflow`` flags."""
        return self.weights_dtype is not None and self.update_rounding is None and not self.fp32_master

    @property
    def half_format(self) -> str | None:
        """``"fp16"`` or ``"bf16"``: the 16-bit format this arm computes in; None for fp32."""
        dtype = self.autocast_dtype or self.weights_dtype
        return HALF_FORMAT[dtype] if dtype is not None else None

    def with_changes(
        self, keep_fp32: Sequence[str] = (), init_scale: float | None = None, *,
        fp32_master: Sequence[str] = (), update_rounding: UpdateRounding | None = None,
        exclude_from_fp8: Sequence[str] = (),
    ) -> Arm:
        """This recipe plus a keep-list, an initial loss scale, fp32 master copies, an update rounding and/or Linear
        layers kept out of float8, named after the change (``fp16+keep``, ``fp16+scale2^24``, ``fp16+keep+scale2^24``,
        ``bf16-pure+master``, ``bf16-pure+sr``, ``bf16-pure+kahan``, ``fp8+filter``)."""
        if (fp32_master or update_rounding is not None) and self.weights_dtype is None:
            raise UsageError(f"Arm {self.name!r} keeps fp32 master weights already: fp32_master and update_rounding "
                             "apply to half-weight arms (bf16-pure).")
        if exclude_from_fp8 and self.fp8 is None:
            raise UsageError(f"Arm {self.name!r} has no float8 layers to exclude: exclude_from_fp8 applies to the "
                             "float8 arms (fp8, fp8-rowwise, mxfp8).")
        if update_rounding is not None and update_rounding not in UPDATE_ROUNDINGS:
            raise UsageError(f"Unknown update rounding {update_rounding!r}; pick from {', '.join(UPDATE_ROUNDINGS)}.")
        name = self.name
        parts = []
        if keep_fp32:
            name += "+keep"
            parts.append("keeps " + ", ".join(keep_fp32) + " in fp32")
        if init_scale is not None:
            name += f"+scale2^{math.log2(init_scale):g}"
            parts.append(f"GradScaler init_scale {init_scale:g}")
        if fp32_master:
            name += "+master"
            parts.append("fp32 master weights for " + ", ".join(fp32_master))
        if update_rounding is not None:
            name += "+" + ROUNDING_SUFFIX[update_rounding]
            parts.append(f"{update_rounding} rounding of bf16 updates")
        if exclude_from_fp8:
            name += "+filter"
            parts.append("keeps " + ", ".join(exclude_from_fp8) + " out of float8")
        return replace(self, name=name, keep_fp32=tuple(keep_fp32), init_scale=init_scale,
                       fp32_master=tuple(fp32_master), update_rounding=update_rounding,
                       exclude_from_fp8=tuple(exclude_from_fp8),
                       description=self.description + ("; " + "; ".join(parts) if parts else ""))


ARMS: dict[str, Arm] = {
    BASELINE: Arm(BASELINE, None, False, "fp32 forward and backward, fp32 weights"),
    "bf16": Arm("bf16", "bfloat16", False, "bf16 autocast, fp32 master weights"),
    "fp16": Arm("fp16", "float16", True, "fp16 autocast, fp32 master weights, GradScaler"),
    "bf16-pure": Arm("bf16-pure", None, False, "model, gradients and optimizer state in bf16, no fp32 master "
                     "weights, no autocast, no loss scaling", weights_dtype="bfloat16"),
    "fp8": Arm("fp8", "bfloat16", False, "float8 GEMMs in every Linear layer (torchao, tensorwise dynamic "
               "scaling: e4m3 inputs and weights, e5m2 gradients), bf16 autocast elsewhere, fp32 master weights",
               fp8="tensorwise"),
    "fp8-rowwise": Arm("fp8-rowwise", "bfloat16", False, "float8 GEMMs in every Linear layer (torchao, rowwise "
                       "dynamic scaling with power-of-two scales, e4m3 throughout), bf16 autocast elsewhere, fp32 "
                       "master weights", fp8="rowwise"),
    "mxfp8": Arm("mxfp8", "bfloat16", False, "MXFP8 GEMMs in every Linear layer (torchao, e4m3 blocks of 32 with "
                 "e8m0 scales), bf16 autocast elsewhere, fp32 master weights", fp8="mxfp8"),
}
DEFAULT_ARMS: tuple[str, ...] = (BASELINE, "bf16", "fp16")
"""The arms ``mpaudit run`` trains without ``--arms`` (``bf16-pure`` and the float8 arms are asked for by name)."""

FP8_ARMS: tuple[str, ...] = tuple(name for name, arm in ARMS.items() if arm.fp8 is not None)
"""The float8 arms (they need torchao: ``pip install mpaudit[fp8]``)."""


def base_arm(arm_name: str) -> Arm | None:
    """The recipe an arm known only by name in a result started from (``bf16-pure+sr s1`` -> ``bf16-pure``)."""
    return ARMS.get(arm_name.split("+", 1)[0].split(" ", 1)[0])


def stores_half_weights(arm_name: str) -> bool:
    """True for arms known by name whose recipe stores the weights in half precision (``bf16-pure`` and its
    variants)."""
    known = base_arm(arm_name)
    return known is not None and known.half_weights


def fp8_recipe_of(arm_name: str) -> str | None:
    """The float8 recipe of an arm known only by name in a result (``fp8+filter`` -> ``tensorwise``); None for arms
    without float8 GEMMs."""
    known = base_arm(arm_name)
    return known.fp8 if known is not None else None


def half_format_of(arm_name: str) -> str | None:
    """The 16-bit format of an arm known only by name in a result (``fp16+keep`` -> ``fp16``); None for fp32."""
    base = arm_name.split("+", 1)[0].split(" ", 1)[0]
    known = base_arm(arm_name)
    if known is not None:
        return known.half_format
    return "fp16" if base.startswith("fp16") else "bf16" if base.startswith("bf16") else None


def parse_arms(names: str | Sequence[str]) -> list[Arm]:
    """Turn ``"fp32,fp16"`` (or a list of names) into arms, in the order given, without repeats."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UsageError("No arm given; pick from " + ", ".join(ARMS) + ".")
    arms: list[Arm] = []
    for name in names:
        if name not in ARMS:
            raise UsageError(f"Unknown arm {name!r}; pick from " + ", ".join(ARMS) + ".")
        if ARMS[name] in arms:
            raise UsageError(f"Arm {name!r} is given twice.")
        arms.append(ARMS[name])
    return arms
