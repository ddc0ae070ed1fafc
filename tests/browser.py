"""Headless Chromium for report tests: load a page, return its DOM after scripts ran and its console lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

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
