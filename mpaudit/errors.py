"""Exceptions, one per failure domain. Each message is one sentence a user can act on.

The CLI maps them to exit codes (see ``mpaudit.cli``): ``TaskError`` and ``UsageError`` exit 2.
"""

from __future__ import annotations


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
