"""mpaudit: can I train this model in mixed precision, how much faster and smaller, which layers hurt?

Public API::

    import mpaudit
    result = mpaudit.audit("model.py", steps=100)   # -> AuditResult
    mpaudit.write_report(result, "reports/model")   # report.json + report.html
    with mpaudit.keep_fp32(model, ["amp"]): ...      # a verified keep-list, in your own loop
"""

from __future__ import annotations

__version__ = "0.1.0"

from mpaudit.errors import MpauditError, ResultError, TaskError, UsageError
from mpaudit.report import write_report
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
from mpaudit.run.audit import AuditConfig, audit
from mpaudit.run.keep import KeepFp32, keep_fp32

__all__ = [
    "SCHEMA_VERSION",
    "ArmResult",
    "AuditConfig",
    "AuditResult",
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
    "__version__",
    "audit",
    "keep_fp32",
    "write_report",
]
