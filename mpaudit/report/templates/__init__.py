"""The jinja2 templates of the HTML views, and the one environment that renders them (autoescape on)."""

from __future__ import annotations

import re

import jinja2
from markupsafe import Markup, escape


def breakable(text: object, after: str = "./") -> Markup:
    """``text`` escaped, with a line-break opportunity (``<wbr>``) after every character of ``after`` that a letter
    or ``_`` follows: a module path such as ``bert.encoder.layer.0.attention.self.query`` or a file path wraps at its
    separators instead of pushing a table past the page (``after="._/"`` also breaks ``snake_case`` names)."""
    pattern = re.compile("([" + re.escape(after) + r"])(?=[^\W\d])")  # never inside a number: 1.43e+06
    return Markup(pattern.sub(r"\1<wbr>", str(escape(text))))


ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("mpaudit.report.templates", "."),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["breakable"] = breakable
