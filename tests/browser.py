"""Headless Chromium for report tests: load a page, return its DOM after scripts ran and its console lines."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    # any network fetch fails fast and shows up as a console error
    "--host-resolver-rules=MAP * ~NOTFOUND",
]
_CONSOLE = re.compile(r"INFO:CONSOLE[^\]]*\] (.*)")


def chromium() -> str:
    """Path of the Chromium binary, or skip the test with the reason."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def load_page(page: Path, timeout_s: float = 90) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message it printed."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout_s,
        )
    console = [m.group(1) for m in _CONSOLE.finditer(proc.stderr)]
    return proc.stdout, console


def screenshot(page: Path, png: Path, size: str = "1200,2400", timeout_s: float = 90) -> None:
    """Save a PNG of the page (for people looking at the report, not asserted on)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             "--virtual-time-budget=10000", f"--screenshot={png}", page.resolve().as_uri()],
            capture_output=True, timeout=timeout_s, check=False,
        )


OVERFLOW_PROBE = """
<script>
window.addEventListener("load", function () { setTimeout(function () {
  var root = document.documentElement, width = root.clientWidth, offenders = [];
  function where(el) {
    var section = el.closest("section");
    var name = el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
      (typeof el.className === "string" && el.className ? "." + el.className.trim().split(/\\s+/).join(".") : "");
    var text = (el.textContent || "").trim().replace(/\\s+/g, " ").slice(0, 60);
    return (section ? section.id + " > " : "") + name + (text ? " '" + text + "'" : "");
  }
  function visibleRight(el, right) {  // what a scroll container or a clipping ancestor shows of it
    for (var a = el.parentElement; a && a !== document.body && a !== root; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== "visible") { right = Math.min(right, a.getBoundingClientRect().right); }
    }
    return right;
  }
  document.querySelectorAll("body *").forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0 || getComputedStyle(el).visibility === "hidden") { return; }
    var right = visibleRight(el, r.right);
    if (right > width + 1 || (r.left < -1 && r.right > 0)) {  // wholly off-screen helpers (plotly's) don't count
      offenders.push(where(el) + " (" + Math.round(r.left) + ".." + Math.round(right) + " px)");
    }
  });
  var out = document.createElement("pre");
  out.id = "mpaudit-overflow-probe";
  out.textContent = JSON.stringify({width: width, inner_width: window.innerWidth, scroll_width: root.scrollWidth,
                                    offenders: offenders});
  document.body.appendChild(out);
}, 1500); });
</script>
"""
"""Measures, once the page's scripts ran, whether the page scrolls sideways and which elements stick out of the
viewport (an element inside its own scroll container counts only as far as the container shows it)."""

_PROBE_OUT = re.compile(r'<pre id="mpaudit-overflow-probe">(.*?)</pre>', re.S)


def overflow(page: Path, width: int, height: int = 2000, timeout_s: float = 90) -> dict[str, Any]:
    """Load a test-only copy of ``page`` (with :data:`OVERFLOW_PROBE` added) in a ``width`` px wide window:
    ``{width, inner_width, scroll_width, offenders}`` where ``offenders`` lists the elements past the right edge."""
    text = page.read_text(encoding="utf-8")
    probe = page.with_name(f"{page.stem}.overflow-probe-{width}.html")
    probe.write_text(text.replace("</body>", OVERFLOW_PROBE + "</body>", 1), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run(
                [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                 "--virtual-time-budget=15000", "--dump-dom", probe.resolve().as_uri()],
                capture_output=True, text=True, timeout=timeout_s,
            )
    finally:
        probe.unlink(missing_ok=True)
    found = _PROBE_OUT.search(proc.stdout)
    assert found, f"the overflow probe did not report (chromium exit {proc.returncode}): {proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return result
