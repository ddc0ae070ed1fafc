"""Stopping an audit without losing it: SIGINT and SIGTERM become an exception the flow can record.

Inside :func:`interruptible`, the first SIGINT (Ctrl-C) or SIGTERM raises :class:`Interrupted` in the main thread.
It derives from ``BaseException``, so a task's ``except Exception`` does not swallow it; the training loop records
the arm in flight as ``interrupted`` with its steps so far, the audit keeps every finished arm, and the command
writes the partial result and exits 130 (SIGINT) or 143 (SIGTERM). A second signal while the partial result is
being written is ignored: the files are written atomically, so they are whole either way.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop an audit and keep its work."""


class Interrupted(BaseException):
    """The user (SIGINT) or the system (SIGTERM) stopped the audit; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.result: Any = None
        """What was finished when it arrived (an arm's partial result, or the audit's), set on the way up."""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once inside the block; later ones are ignored until it ends.

    Outside the main thread (where Python cannot set signal handlers) the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return  # already on the way out: let the partial result be written
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM inside the block (writing the partial result), then restore the handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
