"""Float8 casts under a training recipe's scaling: what one GEMM operand loses (pure Python/numpy, no torch).

Float8 training casts each operand of each Linear layer's three GEMMs to e4m3 or e5m2 after multiplying it by a
scale: one per tensor (``tensorwise``: ``fmt.max / amax`` of the whole tensor), one per row along the contraction
dimension (``rowwise``: the same per row, rounded down to a power of two) or one per block of 32 elements along the
contraction dimension (``mxfp8``: a power-of-two e8m0 scale). A value then flushes to zero when the scale leaves it
below half of the format's smallest subnormal, and saturates when it lands above the format's max.

The three GEMMs of a Linear layer ``y = x @ W.T`` and the operands each casts:

=============== =========================== ==================================================================
GEMM            product                     contraction dimension
=============== =========================== ==================================================================
``forward``     ``input @ weight.T``        the input features (a row of the input, a row of the weight)
``grad_input``  ``grad_output @ weight``    the output features (a row of grad_output, a column of the weight)
``grad_weight`` ``grad_output.T @ input``   the tokens (a column of grad_output, a column of the input)
=============== =========================== ==================================================================

A :class:`CastStats` record counts, for one operand of one GEMM of one layer under one recipe, over every call and
traced step merged into it: the nonzero finite values of the high-precision tensor, how many of them the cast
flushed to zero, left subnormal or saturated (measured by casting the real tensor with the recipe's own scales,
:mod:`mpaudit.trace.fp8_probe`), the largest |x| and the binade histogram of the *scaled* values |x|·scale (layout of
:mod:`mpaudit.numerics.formats`). Every statistic merges. An :class:`Fp8Trace` holds the records of one arm: the
fp32 arm records every recipe asked for and its alternative (the prediction), a float8 arm its own recipe on its own
tensors (the observation that confirms or refutes it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mpaudit.numerics.formats import E4M3, E5M2, HIST_BINS, HIST_MAX_EXP, HIST_MIN_EXP, Format
from mpaudit.results.codec import FLOAT_SCHEMA, DictLayout, decode_float, encode_float

GEMMS = ("forward", "grad_input", "grad_weight")
"""A Linear layer's three GEMMs, in the order a step runs them."""
GEMM_OPERANDS: dict[str, tuple[str, str]] = {
    "forward": ("input", "weight"),
    "grad_input": ("grad_output", "weight"),
    "grad_weight": ("grad_output", "input"),
}
"""The two operands each GEMM casts to float8."""
GEMM_WORDS: dict[str, str] = {
    "forward": "forward GEMM (input × weight)",
    "grad_input": "input-gradient GEMM (grad_output × weight)",
    "grad_weight": "weight-gradient GEMM (grad_output × input)",
}
RECIPE_WORDS: dict[str, str] = {
    "tensorwise": "tensorwise scaling (one scale per tensor)",
    "rowwise": "rowwise scaling (one power-of-two scale per row along the contraction dimension)",
    "mxfp8": "MX block scaling (one e8m0 scale per 32 elements along the contraction dimension)",
}
FP8_FORMATS: dict[str, Format] = {"e4m3": E4M3, "e5m2": E5M2}

Key = tuple[str, str, str, str]
"""(layer, recipe, gemm, operand)."""


def _nan_max(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


@dataclass(frozen=True, eq=False)
class CastStats:
    """What casting one operand to float8 under a recipe's scaling did, over every call merged into it.

    ``nonzero`` counts the nonzero finite values of the high-precision tensor; ``flushed``, ``subnormal`` and
    ``saturated`` count those that the cast turned into zero, left in the format's subnormal range, or found above
    the format's max (clamped to it). ``amax`` is the largest finite |x| seen; ``scale_log2_min`` / ``_max`` bound the
    log2 of the scales applied; ``hist`` is the binade histogram of the scaled nonzero values |x|·scale.
    """

    format: str
    count: int = 0
    nonzero: int = 0
    flushed: int = 0
    subnormal: int = 0
    saturated: int = 0
    amax: float = 0.0
    scale_log2_min: float = math.inf
    scale_log2_max: float = -math.inf
    hist: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CastStats):
            return NotImplemented
        return (self.format, self.count, self.nonzero, self.flushed, self.subnormal, self.saturated) == (
            other.format, other.count, other.nonzero, other.flushed, other.subnormal, other.saturated,
        ) and (self.amax, self.scale_log2_min, self.scale_log2_max) == (
            other.amax, other.scale_log2_min, other.scale_log2_max,
        ) and bool(np.array_equal(self.hist, other.hist))

    __hash__ = None  # type: ignore[assignment]

    @property
    def fmt(self) -> Format:
        return FP8_FORMATS[self.format]

    @property
    def flush_fraction(self) -> float:
        """Share of the nonzero values the cast flushed to zero (0.0 when there are none)."""
        return self.flushed / self.nonzero if self.nonzero else 0.0

    @property
    def subnormal_fraction(self) -> float:
        """Share of the nonzero values left in the format's subnormal range (fewer mantissa bits)."""
        return self.subnormal / self.nonzero if self.nonzero else 0.0

    @property
    def saturation_fraction(self) -> float:
        """Share of the nonzero values above the format's max after scaling (clamped to it)."""
        return self.saturated / self.nonzero if self.nonzero else 0.0

    def merge(self, other: CastStats) -> CastStats:
        return CastStats(
            format=self.format or other.format,
            count=self.count + other.count,
            nonzero=self.nonzero + other.nonzero,
            flushed=self.flushed + other.flushed,
            subnormal=self.subnormal + other.subnormal,
            saturated=self.saturated + other.saturated,
            amax=_nan_max(self.amax, other.amax),
            scale_log2_min=min(self.scale_log2_min, other.scale_log2_min),
            scale_log2_max=max(self.scale_log2_max, other.scale_log2_max),
            hist=self.hist + other.hist,
        )

    def to_dict(self) -> dict[str, Any]:
        nz = np.flatnonzero(self.hist)
        start, stop = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        return {
            "format": self.format, "count": self.count, "nonzero": self.nonzero, "flushed": self.flushed,
            "subnormal": self.subnormal, "saturated": self.saturated, "amax": encode_float(self.amax),
            "scale_log2_min": encode_float(self.scale_log2_min), "scale_log2_max": encode_float(self.scale_log2_max),
            "hist_start": start, "hist": [int(c) for c in self.hist[start:stop]],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CastStats:
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        counts = [int(c) for c in d.get("hist", [])]
        start = int(d.get("hist_start", 0))
        hist[start : start + len(counts)] = counts
        return cls(
            format=str(d["format"]), count=int(d["count"]), nonzero=int(d["nonzero"]), flushed=int(d["flushed"]),
            subnormal=int(d["subnormal"]), saturated=int(d["saturated"]), amax=decode_float(d["amax"]),
            scale_log2_min=decode_float(d["scale_log2_min"]), scale_log2_max=decode_float(d["scale_log2_max"]),
            hist=hist,
        )


@dataclass(frozen=True)
class GemmLoss:
    """One GEMM of one layer under one recipe: the operand that loses most, and how much each operand loses."""

    gemm: str
    flush: float
    """The larger of the two operands' flushed shares."""
    saturation: float
    """The larger of the two operands' saturated shares."""
    operand: str
    """The operand with the larger flushed share (with the larger saturated share when nothing flushes)."""
    operands: dict[str, CastStats]


@dataclass(frozen=True)
class Fp8Trace(DictLayout):
    """One arm's float8 cast statistics per (layer, recipe, GEMM, operand), merged over its traced steps.

    ``layers`` are the Linear layers in the order their forward first ran; ``notes`` say what could not be
    recorded (an MX GEMM whose contraction dimension is not a multiple of 32 cannot be cast by the recipe).
    """

    stats: dict[Key, CastStats] = field(default_factory=dict)
    steps: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def get(self, layer: str, recipe: str, gemm: str, operand: str) -> CastStats | None:
        return self.stats.get((layer, recipe, gemm, operand))

    @property
    def recipes(self) -> list[str]:
        return list(dict.fromkeys(k[1] for k in self.stats))

    def gemm_loss(self, layer: str, recipe: str, gemm: str) -> GemmLoss | None:
        """What ``gemm`` of ``layer`` loses under ``recipe``; None when neither operand was recorded."""
        operands = {op: s for op in GEMM_OPERANDS[gemm] if (s := self.get(layer, recipe, gemm, op)) is not None}
        if not operands:
            return None
        worst = max(operands, key=lambda op: (operands[op].flush_fraction, operands[op].saturation_fraction))
        return GemmLoss(gemm=gemm, flush=max(s.flush_fraction for s in operands.values()),
                        saturation=max(s.saturation_fraction for s in operands.values()), operand=worst,
                        operands=operands)

    def losses(self, recipe: str) -> dict[str, dict[str, GemmLoss]]:
        """Per layer (forward order), per GEMM: what ``recipe`` loses."""
        out: dict[str, dict[str, GemmLoss]] = {}
        for layer in self.all_layers():
            per = {g: loss for g in GEMMS if (loss := self.gemm_loss(layer, recipe, g)) is not None}
            if per:
                out[layer] = per
        return out

    def all_layers(self) -> list[str]:
        return list(dict.fromkeys([*self.layers, *(k[0] for k in self.stats)]))

    def items(self) -> Iterator[tuple[Key, CastStats]]:
        order = {name: i for i, name in enumerate(self.all_layers())}
        for key in sorted(self.stats, key=lambda k: (order[k[0]], k[1], GEMMS.index(k[2]), k[3])):
            yield key, self.stats[key]

    def merge(self, other: Fp8Trace) -> Fp8Trace:
        stats = dict(self.stats)
        for key, value in other.stats.items():
            stats[key] = stats[key].merge(value) if key in stats else value
        return Fp8Trace(stats=stats, steps=self.steps + other.steps,
                        layers=tuple(dict.fromkeys([*self.layers, *other.layers])),
                        notes=tuple(dict.fromkeys([*self.notes, *other.notes])))

    @classmethod
    def merge_all(cls, traces: Iterable[Fp8Trace]) -> Fp8Trace:
        out = cls()
        for t in traces:
            out = out.merge(t)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "hist_min_exp": HIST_MIN_EXP,
            "hist_max_exp": HIST_MAX_EXP,
            "steps": list(self.steps),
            "layers": list(self.layers),
            "notes": list(self.notes),
            "stats": [{"layer": k[0], "recipe": k[1], "gemm": k[2], "operand": k[3], **s.to_dict()}
                      for k, s in self.items()],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fp8Trace:
        if (d.get("hist_min_exp", HIST_MIN_EXP), d.get("hist_max_exp", HIST_MAX_EXP)) != (HIST_MIN_EXP, HIST_MAX_EXP):
            raise ValueError("this float8 trace uses a histogram layout this mpaudit does not read")
        return cls(
            stats={(str(r["layer"]), str(r["recipe"]), str(r["gemm"]), str(r["operand"])): CastStats.from_dict(r)
                   for r in d.get("stats", [])},
            steps=tuple(int(s) for s in d.get("steps", [])),
            layers=tuple(str(x) for x in d.get("layers", [])),
            notes=tuple(str(x) for x in d.get("notes", [])),
        )

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON Schema of :meth:`to_dict`'s layout (``mpaudit schema``)."""
        return FP8_TRACE_SCHEMA


FP8_TRACE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Float8 cast statistics of one arm's traced steps per Linear layer, recipe, GEMM and operand "
                   "(Fp8Trace.to_dict).",
    "properties": {
        "hist_min_exp": {"type": "integer"},
        "hist_max_exp": {"type": "integer"},
        "steps": {"type": "array", "items": {"type": "integer"}},
        "layers": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
        "stats": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "layer": {"type": "string"}, "recipe": {"type": "string"}, "gemm": {"type": "string"},
                    "operand": {"type": "string"}, "format": {"type": "string"}, "count": {"type": "integer"},
                    "nonzero": {"type": "integer"}, "flushed": {"type": "integer"},
                    "subnormal": {"type": "integer"}, "saturated": {"type": "integer"}, "amax": FLOAT_SCHEMA,
                    "scale_log2_min": FLOAT_SCHEMA, "scale_log2_max": FLOAT_SCHEMA,
                    "hist_start": {"type": "integer"}, "hist": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["layer", "recipe", "gemm", "operand", "format", "count", "nonzero", "flushed",
                             "subnormal", "saturated", "amax", "hist_start", "hist"],
            },
        },
    },
    "required": ["steps", "layers", "stats"],
}
"""JSON Schema of a serialised float8 trace (``arms.<name>.fp8_casts`` in ``report.json``)."""
