"""Renderers: everything here reads an :class:`~mpaudit.results.model.AuditResult` (or a comparison) and nothing else.

``report.html`` (:mod:`.html`, templates in ``templates/``, charts in :mod:`.charts` and :mod:`.layers_view`),
``summary.md`` (:mod:`.markdown`), JUnit XML (:mod:`.junit`), the compare views (:mod:`.compare_view`) and the
suite index (:mod:`.suite_index`).
"""

from __future__ import annotations

from pathlib import Path

from mpaudit.results.atomic import atomic_write_text
from mpaudit.results.model import AuditResult


def write_report(result: AuditResult, out_dir: str | Path, *, plotlyjs: str = "inline",
                 min_severity: str = "warning") -> dict[str, Path]:
    """Write ``report.json``, then ``report.html``, ``summary.md`` and ``layers.csv`` into ``out_dir`` atomically.

    The JSON goes first: if rendering fails, the measured result is already safe on disk. ``min_severity`` is the
    least severe flag ``summary.md`` lists (the rest are counted).
    """
    from mpaudit.report.html import render_html
    from mpaudit.report.markdown import summary_markdown

    out = Path(out_dir)
    paths = {"json": atomic_write_text(out / "report.json", result.to_json())}
    paths["html"] = atomic_write_text(out / "report.html", render_html(result, plotlyjs=plotlyjs))
    paths["summary"] = atomic_write_text(out / "summary.md", summary_markdown(result, min_severity=min_severity))
    layers = result.layers()
    if not layers.empty:
        paths["layers"] = atomic_write_text(out / "layers.csv", layers.drop(columns=["hist"]).to_csv(index=False))
    return paths


def render_html(result: AuditResult, *, plotlyjs: str = "inline") -> str:
    """The self-contained report page (see :func:`mpaudit.report.html.render_html`)."""
    from mpaudit.report.html import render_html as render

    return render(result, plotlyjs=plotlyjs)


def summary_markdown(result: AuditResult, min_severity: str = "warning") -> str:
    """``summary.md`` (see :func:`mpaudit.report.markdown.summary_markdown`)."""
    from mpaudit.report.markdown import summary_markdown as summary

    return summary(result, min_severity=min_severity)


__all__ = ["render_html", "summary_markdown", "write_report"]
