"""Renderers: everything here reads an :class:`~mpaudit.result.AuditResult` and nothing else."""

from __future__ import annotations

from pathlib import Path

from mpaudit.atomic import atomic_write_text
from mpaudit.report.html import render_html
from mpaudit.result import AuditResult


def write_report(result: AuditResult, out_dir: str | Path, *, plotlyjs: str = "inline") -> dict[str, Path]:
    """Write ``report.json`` then ``report.html`` into ``out_dir`` atomically; return their paths."""
    out = Path(out_dir)
    paths = {"json": atomic_write_text(out / "report.json", result.to_json())}
    paths["html"] = atomic_write_text(out / "report.html", render_html(result, plotlyjs=plotlyjs))
    return paths


__all__ = ["render_html", "write_report"]
