"""The terminal progress display: arm, step/total, loss and ETA on stderr (rich)."""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mpaudit.results.model import ArmResult
from mpaudit.vocab import OK


class RichProgress:
    """Draws one bar per arm on stderr. Use as a context manager."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar = Progress(
            TextColumn("[bold]{task.fields[arm]:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._ids: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def arm_started(self, arm: str, total: int | None) -> None:
        self._ids[arm] = self._bar.add_task(arm, total=total, arm=arm, loss="–")

    def step(self, arm: str, step: int, loss: float) -> None:
        text = f"{loss:.4g}" if math.isfinite(loss) else str(loss)
        self._bar.update(self._ids[arm], completed=step, loss=text)  # type: ignore[arg-type]

    def arm_finished(self, arm: str, result: ArmResult) -> None:
        task_id = self._ids.get(arm)
        if task_id is not None:
            self._bar.update(task_id, total=result.steps, completed=result.steps)  # type: ignore[arg-type]
        if result.status != OK:
            self.console.print(f"[red]{arm}: {result.status}[/red] {result.error or ''}", markup=True)



    def arm_resumed(self, arm: str, result: ArmResult) -> None:
        self.console.print(f"{arm}: resumed from the saved result ({result.status}, {result.steps} steps)")


def progress_enabled(quiet: bool) -> bool:
    """Progress is shown unless ``--quiet`` or stderr is not a terminal (CI logs stay clean)."""
    return not quiet and sys.stderr.isatty()
