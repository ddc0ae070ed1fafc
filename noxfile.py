"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``bench`` (speed goals), ``suites``.

Every session installs ``torch==2.13.0`` first: on this project's CI machines that is a CPU build on local disk,
and any looser spec would pull a multi-GB CUDA build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"
BENCHMARKS = ("speed.py", "fp16_emulation.py", "fp8.py", "trace_overhead.py", "watch_overhead.py")
"""The benchmark scripts (``benchmarks/workload.py`` is the MLP they share, not a benchmark)."""


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (a few minutes on 2 CPU cores), the float8 tests included."""
    _install(session, "dev,fp8")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "mpaudit", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the package."""
    _install(session)
    session.run("mypy", "mpaudit")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed goals, measured side by side in one run and printed as ratios (not a test)."""
    _install(session, "dev,fp8")
    for script in BENCHMARKS:
        session.run("python", f"benchmarks/{script}", *session.posargs)


@nox.session
def suites(session: nox.Session) -> None:
    """Audit every bundled workload at default settings and write reports/suites/index.html."""
    _install(session, "dev,suites")
    session.run("mpaudit", "suite", "suites", "--out", "reports/suites", *session.posargs)
