"""The host-side statistics model of a trace: mergeable per-tensor records and the per-arm summary.

Pure Python/numpy/pandas (no torch), so renderers and ``compare`` can read it from JSON alone.

A record describes one traced tensor of one layer ("role"):

- ``activation``: the module's output (floating tensors of a tuple/dict output are merged);
- ``grad_output``: the gradient w.r.t. that output (in the fp16 arm: multiplied by the loss scale);
- ``grad:<param>``: the gradient of a parameter, e.g. ``grad:weight`` (fp16 arm: still scaled);
- ``update:<param>``: the optimizer step r = Δw / 2^floor(log2|w|), the update in units of the weight's
  binade, so that :func:`mpaudit.numerics.formats.update_lost` says which updates weights stored in fp16/bf16
  would not register. Recorded over a fixed sample of at most ``mpaudit.trace.tracer.UPDATE_SAMPLE`` elements per
  parameter, with counts and histogram only (max / min / sum are NaN). A zero weight's update is scaled by
  2^127, far above any format's loss edge.

Every statistic merges (counts and histograms add, maxima max, minima min), so a multi-step summary is
the merge of step summaries, and several ranks' summaries merge the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd

from mpaudit.numerics.formats import (
    FORMATS,
    HIST_BINS,
    HIST_MAX_EXP,
    HIST_MIN_EXP,
    WhatIf,
    hist_from_values,
    update_lost,
    what_if,
)
from mpaudit.results.codec import FLOAT_SCHEMA, DictLayout, decode_float, encode_float

ACTIVATION = "activation"
GRAD_OUTPUT = "grad_output"
GRAD_PREFIX = "grad:"
UPDATE_PREFIX = "update:"
ROOT_LAYER = "(model)"
"""The layer name of the model's root module (whose module path is the empty string)."""

WHAT_IF_KINDS = ("flush", "subnormal", "overflow")


def is_gradient(role: str) -> bool:
    """True for roles holding gradients (``grad_output`` and ``grad:<param>``), which a loss scale multiplies."""
    return role == GRAD_OUTPUT or role.startswith(GRAD_PREFIX)


def is_update(role: str) -> bool:
    """True for ``update:<param>`` roles (relative optimizer steps, not plain tensor values)."""
    return role.startswith(UPDATE_PREFIX)


def _role_order(role: str) -> tuple[int, str]:
    if role == ACTIVATION:
        return (0, "")
    if role == GRAD_OUTPUT:
        return (1, "")
    if role.startswith(GRAD_PREFIX):
        return (2, role)
    return (3, role)


def _nan_or(pick: Any, a: float, b: float) -> float:
    """``pick(a, b)``, or NaN when either is NaN (not measured), whatever the order."""
    return math.nan if math.isnan(a) or math.isnan(b) else float(pick(a, b))


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Mergeable statistics of one traced tensor (over every call and step merged into it).

    ``max_abs``, ``min_nonzero_abs`` and ``sum_abs`` are over finite values; ``min_nonzero_abs`` is inf and
    ``max_abs`` 0 when there is no nonzero finite value; all three are NaN (not measured) for ``update:*``
    records, which keep only counts and the histogram to keep tracing cheap. ``hist`` is the binade histogram
    of the nonzero finite values (layout in :mod:`mpaudit.numerics.formats`). ``dtype`` lists the dtypes seen.
    """

    count: int = 0
    zeros: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    max_abs: float = 0.0
    min_nonzero_abs: float = math.inf
    sum_abs: float = 0.0
    hist: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))
    dtype: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        floats = ("max_abs", "min_nonzero_abs", "sum_abs")
        same_floats = all(
            getattr(self, f) == getattr(other, f) or (math.isnan(getattr(self, f)) and math.isnan(getattr(other, f)))
            for f in floats
        )
        return (
            (self.count, self.zeros, self.nan, self.posinf, self.neginf, self.dtype)
            == (other.count, other.zeros, other.nan, other.posinf, other.neginf, other.dtype)
            and same_floats
            and bool(np.array_equal(self.hist, other.hist))
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def finite_nonzero(self) -> int:
        """Number of nonzero finite values (the histogram's total)."""
        return int(self.hist.sum())

    @property
    def mean_abs(self) -> float:
        """Mean |x| over the finite values (zeros included); NaN when there are none."""
        finite = self.count - self.nonfinite
        return self.sum_abs / finite if finite else math.nan

    @property
    def zero_fraction(self) -> float:
        """Fraction of all values that are exactly zero; NaN for an empty record."""
        return self.zeros / self.count if self.count else math.nan

    def what_if(self, fmt: str, scale_log2: int = 0) -> WhatIf:
        """:func:`mpaudit.numerics.formats.what_if` on this record's histogram for the format named ``fmt``."""
        return what_if(self.hist, FORMATS[fmt], scale_log2)

    def merge(self, other: TensorStats) -> TensorStats:
        """The statistics of both records' values together."""
        dtypes = sorted({d for d in (self.dtype + "," + other.dtype).split(",") if d})
        return TensorStats(
            count=self.count + other.count,
            zeros=self.zeros + other.zeros,
            nan=self.nan + other.nan,
            posinf=self.posinf + other.posinf,
            neginf=self.neginf + other.neginf,
            max_abs=_nan_or(max, self.max_abs, other.max_abs),
            min_nonzero_abs=_nan_or(min, self.min_nonzero_abs, other.min_nonzero_abs),
            sum_abs=self.sum_abs + other.sum_abs,
            hist=self.hist + other.hist,
            dtype=",".join(dtypes),
        )

    @classmethod
    def from_array(cls, values: npt.ArrayLike, dtype: str = "") -> TensorStats:
        """The statistics of an array computed on the host with numpy (the reference the tracer matches)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        finite = x[np.isfinite(x)]
        nonzero = np.abs(finite[finite != 0])
        return cls(
            count=int(x.size),
            zeros=int((x == 0).sum()),
            nan=int(np.isnan(x).sum()),
            posinf=int((x == np.inf).sum()),
            neginf=int((x == -np.inf).sum()),
            max_abs=float(np.abs(finite).max()) if finite.size else 0.0,
            min_nonzero_abs=float(nonzero.min()) if nonzero.size else math.inf,
            sum_abs=float(np.abs(finite).sum()),
            hist=hist_from_values(x),
            dtype=dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; the histogram is stored trimmed: ``hist`` counts from bin ``hist_start`` on."""
        nz = np.flatnonzero(self.hist)
        start, stop = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        return {
            "count": self.count,
            "zeros": self.zeros,
            "nan": self.nan,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "max_abs": encode_float(self.max_abs),
            "min_nonzero_abs": encode_float(self.min_nonzero_abs),
            "sum_abs": encode_float(self.sum_abs),
            "dtype": self.dtype,
            "hist_start": start,
            "hist": [int(c) for c in self.hist[start:stop]],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorStats:
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        counts = [int(c) for c in d.get("hist", [])]
        start = int(d.get("hist_start", 0))
        hist[start : start + len(counts)] = counts
        return cls(
            count=int(d["count"]),
            zeros=int(d["zeros"]),
            nan=int(d["nan"]),
            posinf=int(d["posinf"]),
            neginf=int(d["neginf"]),
            max_abs=decode_float(d["max_abs"]),
            min_nonzero_abs=decode_float(d["min_nonzero_abs"]),
            sum_abs=decode_float(d["sum_abs"]),
            hist=hist,
            dtype=str(d.get("dtype", "")),
        )


@dataclass(frozen=True)
class NonfiniteSite:
    """Where a trace first saw a non-finite value: the layer, the role (tensor) and the step."""

    layer: str
    role: str
    step: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NonfiniteSite:
        return cls(layer=str(d["layer"]), role=str(d["role"]), step=int(d["step"]))


def _earlier(a: NonfiniteSite | None, b: NonfiniteSite | None) -> NonfiniteSite | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if b.step < a.step else a


@dataclass(frozen=True)
class TraceSummary(DictLayout):
    """What one arm's tracer saw: merged statistics per (layer, role) over the traced steps.

    ``loss_scales[i]`` is the loss scale in force at ``steps[i]`` (None without a GradScaler). ``layers``
    is the forward order of the traced modules. ``first_nonfinite_forward`` is the first module in forward
    order whose output held a NaN/Inf at the earliest such step; ``first_nonfinite_backward`` the first in
    backward order whose gradient did.
    """

    stats: dict[tuple[str, str], TensorStats] = field(default_factory=dict)
    steps: tuple[int, ...] = ()
    loss_scales: tuple[float | None, ...] = ()
    layers: tuple[str, ...] = ()
    first_nonfinite_forward: NonfiniteSite | None = None
    first_nonfinite_backward: NonfiniteSite | None = None

    def get(self, layer: str, role: str) -> TensorStats | None:
        return self.stats.get((layer, role))

    def roles(self, layer: str) -> list[str]:
        """The roles recorded for ``layer``: activation, grad_output, grad:*, update:*."""
        return sorted((r for (lay, r) in self.stats if lay == layer), key=_role_order)

    def items(self) -> Iterator[tuple[str, str, TensorStats]]:
        """``(layer, role, stats)`` in forward order of layers, then role order."""
        order = {name: i for i, name in enumerate(self.layers)}
        keys = sorted(self.stats, key=lambda k: (order.get(k[0], len(order)), k[0], _role_order(k[1])))
        for layer, role in keys:
            yield layer, role, self.stats[(layer, role)]

    @property
    def scale_log2(self) -> int | None:
        """log2 of the median loss scale over the traced steps (rounded down); None without loss scaling."""
        scales = [s for s in self.loss_scales if s is not None and s > 0 and math.isfinite(s)]
        if not scales:
            return None
        return math.floor(math.log2(statistics.median(scales)))

    def merge(self, other: TraceSummary) -> TraceSummary:
        """Both summaries' steps together (statistics merged per layer and role)."""
        stats = dict(self.stats)
        for key, value in other.stats.items():
            stats[key] = stats[key].merge(value) if key in stats else value
        layers = list(self.layers) + [name for name in other.layers if name not in self.layers]
        return TraceSummary(
            stats=stats,
            steps=self.steps + other.steps,
            loss_scales=self.loss_scales + other.loss_scales,
            layers=tuple(layers),
            first_nonfinite_forward=_earlier(self.first_nonfinite_forward, other.first_nonfinite_forward),
            first_nonfinite_backward=_earlier(self.first_nonfinite_backward, other.first_nonfinite_backward),
        )

    @classmethod
    def merge_all(cls, summaries: Iterable[TraceSummary]) -> TraceSummary:
        out = cls()
        for s in summaries:
            out = out.merge(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not arrays; non-finite floats as strings), the layout of ``arms.<name>.trace``."""

        def site(s: NonfiniteSite | None) -> dict[str, Any] | None:
            return None if s is None else {"layer": s.layer, "role": s.role, "step": s.step}

        return {
            "hist_min_exp": HIST_MIN_EXP,
            "hist_max_exp": HIST_MAX_EXP,
            "steps": list(self.steps),
            "loss_scales": [None if s is None else encode_float(s) for s in self.loss_scales],
            "layers": list(self.layers),
            "first_nonfinite_forward": site(self.first_nonfinite_forward),
            "first_nonfinite_backward": site(self.first_nonfinite_backward),
            "stats": [{"layer": layer, "role": role, **s.to_dict()} for layer, role, s in self.items()],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceSummary:
        if (d.get("hist_min_exp", HIST_MIN_EXP), d.get("hist_max_exp", HIST_MAX_EXP)) != (HIST_MIN_EXP, HIST_MAX_EXP):
            raise ValueError("this trace uses a histogram layout this mpaudit does not read")
        ff, fb = d.get("first_nonfinite_forward"), d.get("first_nonfinite_backward")
        return cls(
            stats={(str(r["layer"]), str(r["role"])): TensorStats.from_dict(r) for r in d.get("stats", [])},
            steps=tuple(int(s) for s in d.get("steps", [])),
            loss_scales=tuple(None if s is None else decode_float(s) for s in d.get("loss_scales", [])),
            layers=tuple(str(name) for name in d.get("layers", [])),
            first_nonfinite_forward=None if ff is None else NonfiniteSite.from_dict(ff),
            first_nonfinite_backward=None if fb is None else NonfiniteSite.from_dict(fb),
        )

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON Schema of :meth:`to_dict`'s layout (``mpaudit schema``)."""
        return TRACE_SCHEMA

    def to_frame(self, grad_scale_log2: int = 0) -> pd.DataFrame:
        """One row per layer × role: the raw statistics and, for every format, what-if fractions.

        Columns ``<fmt>_flush``, ``<fmt>_subnormal``, ``<fmt>_overflow`` hold :func:`~mpaudit.numerics.formats.what_if`
        at the scale in force (gradients of a loss-scaled arm already include it; ``grad_scale_log2`` shifts
        gradient rows further, e.g. to ask how the fp32 arm's gradients would fare at the fp16 arm's scale).
        ``<fmt>_update_lost`` is filled for ``update:*`` rows, whose what-if columns are NaN.
        """
        import pandas as pd  # only the tables need it; reading and gating results stays light
        rows: list[dict[str, Any]] = []
        for layer, role, s in self.items():
            row: dict[str, Any] = {
                "layer": layer,
                "role": role,
                "dtype": s.dtype,
                "count": s.count,
                "zeros": s.zeros,
                "nan": s.nan,
                "posinf": s.posinf,
                "neginf": s.neginf,
                "nonfinite": s.nonfinite,
                "zero_fraction": s.zero_fraction,
                "max_abs": s.max_abs,
                "min_nonzero_abs": s.min_nonzero_abs,
                "sum_abs": s.sum_abs,
                "mean_abs": s.mean_abs,
            }
            shift = grad_scale_log2 if is_gradient(role) else 0
            for name, fmt in FORMATS.items():
                if is_update(role):
                    values = dict.fromkeys(WHAT_IF_KINDS, math.nan)
                    row[f"{name}_update_lost"] = update_lost(s.hist, fmt)
                else:
                    w = s.what_if(name, shift)
                    values = {"flush": w.flush, "subnormal": w.subnormal, "overflow": w.overflow}
                    row[f"{name}_update_lost"] = math.nan
                for kind in WHAT_IF_KINDS:
                    row[f"{name}_{kind}"] = values[kind]
            row["hist"] = [int(c) for c in s.hist]
            rows.append(row)
        return pd.DataFrame(rows, columns=_frame_columns())


def _frame_columns() -> list[str]:
    cols = ["layer", "role", "dtype", "count", "zeros", "nan", "posinf", "neginf", "nonfinite", "zero_fraction"]
    cols += ["max_abs", "min_nonzero_abs", "sum_abs", "mean_abs"]
    for name in FORMATS:
        cols += [f"{name}_{kind}" for kind in WHAT_IF_KINDS]
    cols += [f"{name}_update_lost" for name in FORMATS]
    return [*cols, "hist"]


_SITE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "object", "properties": {"layer": {"type": "string"}, "role": {"type": "string"},
                                          "step": {"type": "integer"}}, "required": ["layer", "role", "step"]},
        {"type": "null"},
    ]
}
_INT_LIST: dict[str, Any] = {"type": "array", "items": {"type": "integer"}}
TRACE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Per-layer statistics of one arm's traced steps (TraceSummary.to_dict).",
    "properties": {
        "hist_min_exp": {"type": "integer"},
        "hist_max_exp": {"type": "integer"},
        "steps": _INT_LIST,
        "loss_scales": {"type": "array", "items": {"anyOf": [FLOAT_SCHEMA, {"type": "null"}]}},
        "layers": {"type": "array", "items": {"type": "string"}},
        "first_nonfinite_forward": _SITE_SCHEMA,
        "first_nonfinite_backward": _SITE_SCHEMA,
        "stats": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "layer": {"type": "string"}, "role": {"type": "string"}, "count": {"type": "integer"},
                    "zeros": {"type": "integer"}, "nan": {"type": "integer"}, "posinf": {"type": "integer"},
                    "neginf": {"type": "integer"}, "max_abs": FLOAT_SCHEMA, "min_nonzero_abs": FLOAT_SCHEMA,
                    "sum_abs": FLOAT_SCHEMA, "dtype": {"type": "string"}, "hist_start": {"type": "integer"},
                    "hist": _INT_LIST,
                },
                "required": ["layer", "role", "count", "zeros", "nan", "posinf", "neginf", "max_abs",
                             "min_nonzero_abs", "sum_abs", "hist_start", "hist"],
            },
        },
    },
    "required": ["steps", "layers", "stats"],
}
"""JSON Schema of a serialised trace (``arms.<name>.trace`` in ``report.json``)."""
