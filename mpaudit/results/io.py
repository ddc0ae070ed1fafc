"""Reading and writing results: ``report.json`` files on disk, written atomically, read with one clear error."""

from __future__ import annotations

from pathlib import Path

from mpaudit.errors import ResultError
from mpaudit.results.atomic import atomic_write_text
from mpaudit.results.model import AuditResult


def load_result(path: str | Path) -> AuditResult:
    """Read a ``report.json`` of any known schema version; ResultError when missing, unreadable or unknown.

    Older and hand-trimmed files may lack every optional key; an arm entry without ``name`` takes its key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultError(f"Result file {path} does not exist.") from None
    except IsADirectoryError:
        raise ResultError(f"Result file {path} is a folder, not a report.json.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultError(f"Result file {path} cannot be read: {exc}.") from None
    try:
        return AuditResult.from_json(text)
    except ResultError as exc:
        raise ResultError(f"{path}: {exc}") from None


def save_result(result: AuditResult, path: str | Path) -> Path:
    """Write ``result`` as JSON to ``path`` atomically (the previous file stays whole until the new one is)."""
    return atomic_write_text(path, result.to_json())
