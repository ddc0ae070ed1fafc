"""``mpaudit suite DIR``: audit every workload ``DIR/<name>/model.py`` and write one index page.

Each workload runs ``mpaudit run`` in its own subprocess (a crash, a hang cut off by ``timeout_s`` or a
broken task file cannot take the others down), ``jobs`` at a time, and writes its report into
``OUT/<name>/``. Then every ``report.json`` is read back and ``OUT/index.json`` and ``OUT/index.html``
are written (atomically) from those results alone.

Exit status (what the CLI returns), worst first:

* ``2`` any workload **errored**: its run exited with a usage/contract error (2), an internal error (3),
  was killed or timed out, or left no readable ``report.json``. An error outranks a gate failure
  because the suite could not say anything about that workload.
* ``1`` every workload ran, and at least one failed its gate (``--max-drop`` / ``--max-loss-gap`` in
  ``run_args``).
* ``0`` every workload ran and every gate given passed (a diverged fp16 arm without a gate is a finding
  in the report, not a failure of the suite).
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mpaudit.errors import EXIT_GATE_FAILED, EXIT_OK, ResultError, UsageError
from mpaudit.results.atomic import atomic_write_text
from mpaudit.results.model import AuditResult
from mpaudit.results.suite import ERROR, GATE_FAILED, OK, SuiteResult, WorkloadRun

TASK_FILE = "model.py"
"""A workload is a folder holding this file."""
STDERR_TAIL_LINES = 20
"""Lines of a failed run's stderr kept in the index (the end of a traceback says what went wrong)."""
STDERR_TAIL_CHARS = 4000
"""And at most this many characters of them."""
THREADS_ENV = "OMP_NUM_THREADS"
"""With ``jobs > 1``, each run gets ``cpu_count // jobs`` threads through this variable (unless it is
already set), so parallel runs do not oversubscribe the cores. Step times are then per share of the CPU."""


def discover(suite_dir: str | Path, pattern: str | None = None) -> list[Path]:
    """The ``*/model.py`` files under ``suite_dir`` whose folder name matches ``pattern``, sorted by name.

    ``pattern`` is a glob when it contains ``*``, ``?`` or ``[``, else a substring (like ``pytest -k``).
    """
    root = Path(suite_dir)
    if not root.is_dir():
        raise UsageError(f"Suite folder {root} does not exist or is not a folder.")
    tasks = sorted(root.glob(f"*/{TASK_FILE}"), key=lambda p: p.parent.name)
    if not tasks:
        raise UsageError(f"{root} holds no workload: expected folders with a {TASK_FILE} inside.")
    if pattern:
        is_glob = any(ch in pattern for ch in "*?[")
        tasks = [t for t in tasks if (fnmatch.fnmatchcase(t.parent.name, pattern) if is_glob
                                     else pattern in t.parent.name)]
        if not tasks:
            raise UsageError(f"No workload under {root} matches {pattern!r}.")
    return tasks


def run_suite(
    suite_dir: str | Path,
    out_dir: str | Path,
    *,
    pattern: str | None = None,
    jobs: int = 1,
    run_args: Sequence[str] = (),
    timeout_s: float | None = None,
    on_done: Callable[[WorkloadRun], None] | None = None,
    resume: bool = False,
) -> SuiteResult:
    """Audit every workload under ``suite_dir`` (each in its own ``mpaudit run`` subprocess, ``jobs`` at a
    time, ``run_args`` passed to each), then write ``out_dir/index.json`` and ``out_dir/index.html``.

    A failing, crashing or hanging workload never stops the others; it is listed with its exit code and
    the tail of its stderr. ``on_done`` is called as each workload finishes (for progress output). With
    ``resume``, a workload whose ``report.json`` is complete is not run again, and one with a partial report is
    continued (``mpaudit run --resume``).

    Raises:
        UsageError: no workload to run, or ``jobs`` / ``timeout_s`` out of range.
    """
    from mpaudit.report.suite_index import render_index_html, render_index_json  # jinja2 only once there is a suite

    if jobs < 1:
        raise UsageError("--jobs must be at least 1.")
    if timeout_s is not None and timeout_s <= 0:
        raise UsageError("--timeout must be a positive number of seconds.")
    tasks = discover(suite_dir, pattern)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = _child_env(jobs)

    def one(task: Path) -> WorkloadRun:
        report_dir = out / task.parent.name
        run = _kept(task, report_dir, list(run_args)) if resume else None
        if run is None:
            partial = resume and (report_dir / "report.json").is_file()
            run = _run_workload(task, report_dir, [*run_args, *(["--resume"] if partial else [])], timeout_s, env)
        if on_done is not None:
            on_done(run)
        return run

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = list(pool.map(one, tasks))

    suite = SuiteResult(
        suite_dir=Path(suite_dir), out_dir=out, runs=runs, run_args=list(run_args),
        index_json=out / "index.json", index_html=out / "index.html",
    )
    atomic_write_text(suite.index_json, render_index_json(suite))
    atomic_write_text(suite.index_html, render_index_html(suite))
    return suite


def _child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    if jobs > 1 and THREADS_ENV not in env:
        env[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _kept(task: Path, report_dir: Path, run_args: list[str]) -> WorkloadRun | None:
    """The workload's complete saved result (``--resume``), as if it had just run; None when there is none."""
    try:
        result = AuditResult.from_json((report_dir / "report.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ResultError):
        return None
    if not result.complete:
        return None
    code = EXIT_GATE_FAILED if result.gate.given and not result.gate.passed else EXIT_OK
    return WorkloadRun(name=task.parent.name, task=task, report_dir=report_dir, exit_code=code, seconds=0.0,
                       stderr_tail="", result=result, error=None)


def _run_workload(task: Path, report_dir: Path, run_args: list[str], timeout_s: float | None,
                  env: dict[str, str]) -> WorkloadRun:
    """Run ``mpaudit run`` on one task in a subprocess and read back the report it wrote."""
    name = task.parent.name
    if "--resume" not in run_args:
        for stale in ("report.json", "report.html"):  # a failed run must not show last time's report
            (report_dir / stale).unlink(missing_ok=True)
    command = [sys.executable, "-m", "mpaudit", "run", str(task.resolve()), "--out", str(report_dir.resolve()),
               "-q", *run_args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace", env=env,
                              timeout=timeout_s, check=False)
        exit_code: int | None = proc.returncode
        stderr = proc.stderr
    except subprocess.TimeoutExpired as exc:
        exit_code = None
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - start
    tail = _tail(stderr)

    result, error = None, None
    if exit_code is None:
        error = f"timed out after {timeout_s:g} s and was stopped"
    elif exit_code not in (EXIT_OK, EXIT_GATE_FAILED):
        error = _failure(exit_code, tail)
    else:
        try:
            result = AuditResult.from_json((report_dir / "report.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            error = f"exited with {exit_code} but wrote no report.json"
        except ResultError as exc:
            error = f"its report.json cannot be read: {exc}"
    return WorkloadRun(name=name, task=task, report_dir=report_dir, exit_code=exit_code, seconds=seconds,
                       stderr_tail=tail, result=result, error=error)


def _failure(exit_code: int, tail: str) -> str:
    """One sentence for a run that ended in error: the last line it printed, or how it died."""
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    if exit_code < 0:
        return f"killed by signal {-exit_code}" + (f" after: {last}" if last else "")
    return f"exited with {exit_code}" + (f": {last}" if last else "")


def _tail(text: str) -> str:
    """The last :data:`STDERR_TAIL_LINES` lines of ``text``, at most :data:`STDERR_TAIL_CHARS` characters."""
    tail = "\n".join(text.rstrip().splitlines()[-STDERR_TAIL_LINES:])
    return tail[-STDERR_TAIL_CHARS:]


__all__ = ["ERROR", "GATE_FAILED", "OK", "SuiteResult", "WorkloadRun", "discover", "run_suite"]
