"""The arms as plain data: one precision recipe each, trained from the same seed on the same batches.

| arm    | forward/backward                         | weights & optimizer | loss scaling             |
| ------ | ---------------------------------------- | ------------------- | ------------------------ |
| fp32   | fp32 (TF32 off unless asked)             | fp32                | none                     |
| bf16   | ``torch.autocast(dtype=torch.bfloat16)`` | fp32 master weights | none                     |
| fp16   | ``torch.autocast(dtype=torch.float16)``  | fp32 master weights | ``torch.amp.GradScaler`` |

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


@dataclass(frozen=True)
class Arm:
    """A precision recipe: the autocast dtype (None for fp32) and whether a GradScaler scales the loss."""

    name: str
    autocast_dtype: HalfDtype | None
    grad_scaler: bool
    description: str
    keep_fp32: tuple[str, ...] = ()
    """Module paths run in fp32 inside autocast (:func:`mpaudit.keep_fp32`): a recommendation under test."""
    init_scale: float | None = None
    """The GradScaler's initial loss scale; None keeps PyTorch's default (2^16)."""

    @property
    def is_baseline(self) -> bool:
        return self.autocast_dtype is None

    @property
    def half_format(self) -> str | None:
        """``"fp16"`` or ``"bf16"``: the 16-bit format this arm computes in; None for fp32."""
        return HALF_FORMAT[self.autocast_dtype] if self.autocast_dtype is not None else None

    def with_changes(self, keep_fp32: Sequence[str] = (), init_scale: float | None = None) -> Arm:
        """This recipe plus a keep-list and/or an initial loss scale, named after the change
        (``fp16+keep``, ``fp16+scale2^24``, ``fp16+keep+scale2^24``)."""
        name = self.name
        parts = []
        if keep_fp32:
            name += "+keep"
            parts.append("keeps " + ", ".join(keep_fp32) + " in fp32")
        if init_scale is not None:
            name += f"+scale2^{math.log2(init_scale):g}"
            parts.append(f"GradScaler init_scale {init_scale:g}")
        return replace(self, name=name, keep_fp32=tuple(keep_fp32), init_scale=init_scale,
                       description=self.description + ("; " + "; ".join(parts) if parts else ""))


ARMS: dict[str, Arm] = {
    BASELINE: Arm(BASELINE, None, False, "fp32 forward and backward, fp32 weights"),
    "bf16": Arm("bf16", "bfloat16", False, "bf16 autocast, fp32 master weights"),
    "fp16": Arm("fp16", "float16", True, "fp16 autocast, fp32 master weights, GradScaler"),
}
DEFAULT_ARMS: tuple[str, ...] = (BASELINE, "bf16", "fp16")


def half_format_of(arm_name: str) -> str | None:
    """The 16-bit format of an arm known only by name in a result (``fp16+keep`` -> ``fp16``); None for fp32."""
    base = arm_name.split("+", 1)[0].split(" ", 1)[0]
    known = ARMS.get(base)
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
