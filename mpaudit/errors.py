"""Exceptions, one per failure domain (each message one sentence a user can act on), and the exit codes
of the ``mpaudit`` command.

The CLI (``mpaudit.cli``) maps ``TaskError``, ``UsageError`` and ``ResultError`` to :data:`EXIT_USAGE`.
"""

from __future__ import annotations

EXIT_OK = 0
"""The audit ran and every gate given passed."""
EXIT_GATE_FAILED = 1
"""The audit ran and a gate failed."""
EXIT_USAGE = 2
"""A usage or task-contract error, or a result file that cannot be read."""
EXIT_INTERNAL = 3
"""An unexpected internal error: a bug (rerun with ``--debug`` for the traceback and report it)."""
EXIT_RANK_FAILED = 4
"""A rank of a distributed audit failed: the report holds the arms finished before the failure."""


EXIT_FILE_ENV = "MPAUDIT_EXIT_FILE"
"""Set by ``mpaudit run --nproc``: the file rank 0 writes its exit code to (torchrun reports every failure as 1)."""


class MpauditError(Exception):
    """Base class of every error mpaudit raises on purpose."""


class TaskError(MpauditError):
    """The task file (``model.py``) is missing, does not import, or breaks the contract."""


class UsageError(MpauditError):
    """The options make no sense together (unknown arm, malformed gate, missing baseline, ...)."""


class ResultError(MpauditError):
    """A saved ``report.json`` cannot be read (missing, not JSON, unknown schema)."""


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``: how a failed arm or measurement names its error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
