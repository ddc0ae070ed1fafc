"""The result of ``mpaudit suite``: each workload's run, and the suite's exit status (no torch).

A workload's status in the index: ``ok`` (ran; no gate failed), ``gate failed`` (ran; a gate failed) or
``error`` (no usable result: a broken task, a crash, a timeout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpaudit.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE
from mpaudit.results.model import AuditResult

EXIT_ERROR = EXIT_USAGE
"""The suite's exit status when a workload errored: the same code ``mpaudit run`` uses for a broken task."""
OK, GATE_FAILED, ERROR = "ok", "gate failed", "error"
"""A workload's status in the index."""

@dataclass(frozen=True)
class WorkloadRun:
    """One workload's audit: how its subprocess ended and, when it wrote one, the result it wrote."""

    name: str
    task: Path
    report_dir: Path
    exit_code: int | None
    """The run's exit status; None when it was cut off by the timeout. Negative: killed by that signal."""
    seconds: float
    stderr_tail: str
    result: AuditResult | None
    error: str | None
    """Why the workload errored, in one sentence; None when it ran to the end."""

    @property
    def status(self) -> str:
        """``ok``, ``gate failed`` or ``error`` (see the module docstring)."""
        if self.error is not None or self.result is None:
            return ERROR
        if self.exit_code == EXIT_GATE_FAILED or (self.result.gate.given and not self.result.gate.passed):
            return GATE_FAILED
        return OK

    @property
    def report_html(self) -> Path | None:
        """The workload's ``report.html`` when its run wrote one."""
        path = self.report_dir / "report.html"
        return path if self.result is not None and path.is_file() else None


@dataclass(frozen=True)
class SuiteResult:
    """Every workload's run, in name order, and where the index was written."""

    suite_dir: Path
    out_dir: Path
    runs: list[WorkloadRun]
    run_args: list[str]
    index_json: Path
    index_html: Path

    @property
    def exit_code(self) -> int:
        """2 when a workload errored, else 1 when a gate failed, else 0 (see the module docstring)."""
        statuses = {run.status for run in self.runs}
        if ERROR in statuses:
            return EXIT_ERROR
        if GATE_FAILED in statuses:
            return EXIT_GATE_FAILED
        return EXIT_OK
