"""mpaudit: can I train this model in mixed precision, how much faster and smaller, which layers hurt?

Public API::

    import mpaudit
    result = mpaudit.audit("model.py", steps=100)   # -> AuditResult
    mpaudit.write_report(result, "reports/model")   # report.json + report.html
    with mpaudit.keep_fp32(model, ["amp"]): ...      # a verified keep-list, in your own loop
    with mpaudit.watch(model, optimizer, scaler): ...  # observe your own loop, report when it ends
    optimizer = mpaudit.bf16_optimizer(model, build_optimizer, rounding="stochastic")  # bf16 weights, no lost updates

The names that run a model (``audit``, ``AuditConfig``, ``keep_fp32``, ``KeepFp32``, ``watch``, ``Watch``,
``bf16_optimizer``, ``Bf16Updates``) are imported on first use, so reading, gating and comparing results
(``mpaudit gate``, ``compare``, ``report``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mpaudit.errors import MpauditError, ResultError, TaskError, UsageError
from mpaudit.results.model import (
    SCHEMA_VERSION,
    ArmResult,
    AuditResult,
    Flag,
    Gate,
    GateCheck,
    LayerError,
    LossScale,
    Recommendation,
)

__version__ = "0.1.0"

_LAZY = {
    "audit": "mpaudit.run.audit",
    "AuditConfig": "mpaudit.run.audit",
    "keep_fp32": "mpaudit.run.keep",
    "KeepFp32": "mpaudit.run.keep",
    "bf16_optimizer": "mpaudit.run.half_weights",
    "Bf16Updates": "mpaudit.run.half_weights",
    "write_report": "mpaudit.report",
    "watch": "mpaudit.run.watch",
    "Watch": "mpaudit.run.watch",
}
"""Public names whose modules are imported when first used: the torch side, and the renderers (plotly, jinja2)."""

if TYPE_CHECKING:
    from mpaudit.report import write_report
    from mpaudit.run.audit import AuditConfig, audit
    from mpaudit.run.half_weights import Bf16Updates, bf16_optimizer
    from mpaudit.run.keep import KeepFp32, keep_fp32
    from mpaudit.run.watch import Watch, watch


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "SCHEMA_VERSION",
    "ArmResult",
    "AuditConfig",
    "AuditResult",
    "Bf16Updates",
    "Flag",
    "Gate",
    "GateCheck",
    "KeepFp32",
    "LayerError",
    "LossScale",
    "MpauditError",
    "Recommendation",
    "ResultError",
    "TaskError",
    "UsageError",
    "Watch",
    "__version__",
    "audit",
    "bf16_optimizer",
    "keep_fp32",
    "watch",
    "write_report",
]
