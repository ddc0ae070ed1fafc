"""JUnit XML for CI test views (GitHub, GitLab, Jenkins): each gate check is one test case.

One ``<testsuite name="mpaudit.<task>">`` holds:

* one test case per gate check: ``classname="mpaudit.<task>.<arm>"``, ``name="<kind> <metric>"`` (for
  example ``max_drop accuracy``); a failed check carries ``<failure message="...">`` with the check's
  sentence, and every check its sentence in ``<system-out>``;
* one test case per arm, ``name="status"``: passes when every run of the arm finished ``ok``; a diverged
  or failed arm is an ``<error>``, with or without a gate. JUnit keeps *failures* (an assertion the user
  asked for did not hold: a gate check) apart from *errors* (the test did not complete normally), so
  ``failures`` always equals the number of failed gate checks and ``errors`` the number of arms that did
  not finish. A CI view that fails on errors therefore shows a diverged arm even without a gate; the exit
  code of ``mpaudit run`` still follows the gate alone.

Built with ``xml.etree.ElementTree``, which escapes markup; characters XML 1.0 cannot hold at all (ANSI
escapes in an error message, NUL) are dropped first.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from mpaudit.ci.compare import Comparison
from mpaudit.results.model import AuditResult, GateCheck
from mpaudit.vocab import OK

SUITE_PREFIX = "mpaudit"
"""Test-case class names are ``mpaudit.<task>.<arm>``, so CI views group them by task and arm."""

STATUS_CASE = "status"
"""The name of the per-arm test case that says whether the arm finished."""

_XML_INVALID = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: object) -> str:
    """``text`` without the characters XML 1.0 forbids (control characters, lone surrogates)."""
    return _XML_INVALID.sub("", str(text))


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: xml_text(v) for k, v in attrs.items()})
    if text is not None:
        element.text = xml_text(text)
    return element


def _seconds(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) and x >= 0 else "0"


def _tally(suite: ET.Element) -> None:
    """Set tests/failures/errors/skipped on a suite from its test cases."""
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", str(sum(1 for c in cases if c.find("error") is not None)))
    suite.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))


def _document(suite: ET.Element) -> str:
    _tally(suite)
    root = ET.Element("testsuites", {"name": SUITE_PREFIX})
    root.append(suite)
    for key in ("tests", "failures", "errors", "time"):
        if suite.get(key) is not None:
            root.set(key, suite.get(key, "0"))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _properties(suite: ET.Element, items: Iterable[tuple[str, object]]) -> None:
    props = _sub(suite, "properties")
    for name, value in items:
        if value is not None:
            _sub(props, "property", name=name, value=value)


def junit_xml(result: AuditResult) -> str:
    """The result as JUnit XML: one test case per gate check and one ``status`` case per arm."""
    prefix = f"{SUITE_PREFIX}.{result.task}"
    total = sum(r.train_s for name in result.arms for r in result.runs(name) if math.isfinite(r.train_s))
    suite = ET.Element("testsuite", {"name": xml_text(prefix), "time": _seconds(total)})
    if result.created:
        suite.set("timestamp", xml_text(result.created))
    env = result.env
    _properties(suite, [
        ("task", result.task), ("task_sha256", env.get("task_sha256")), ("device", env.get("device")),
        ("device_name", env.get("device_name")), ("torch_version", env.get("torch_version")),
        ("mpaudit_version", result.mpaudit_version or env.get("mpaudit_version")),
        ("steps", result.config.get("steps")), ("seeds", ",".join(str(s) for s in result.seeds)),
        ("gate_given", str(result.gate.given).lower()),
    ])
    for check in result.gate.checks:
        case = _sub(suite, "testcase", classname=f"{prefix}.{check.arm}", name=f"{check.kind} {check.metric}",
                    time="0")
        if not check.passed:
            _sub(case, "failure", _check_details(check), message=check.message, type=check.kind)
        _sub(case, "system-out", check.message)
    for name in result.arms:
        runs = result.runs(name)
        time = sum(r.train_s for r in runs if math.isfinite(r.train_s))
        case = _sub(suite, "testcase", classname=f"{prefix}.{name}", name=STATUS_CASE, time=_seconds(time))
        bad = [(seed, run) for seed, run in zip(result.seeds, runs, strict=False) if run.status != OK]
        if bad:
            lines = [f"{name} {run.status} with seed {seed}" + (f": {run.error}" if run.error else "")
                     for seed, run in bad]
            _sub(case, "error", "\n".join(lines), message=lines[0].splitlines()[0], type=bad[0][1].status)
        else:
            _sub(case, "system-out", f"{name} finished ok in {len(runs)} run{'s' if len(runs) != 1 else ''}.")
    if result.warnings:
        _sub(suite, "system-err", "\n".join(result.warnings))
    return _document(suite)


def _check_details(check: GateCheck) -> str:
    """The numbers behind a gate check, one ``key: value`` per line, for the failure body."""
    keys = ("arm", "metric", "kind", "baseline", "value", "delta", "delta_low", "delta_high", "limit", "seeds")
    return "\n".join(f"{k}: {getattr(check, k)}" for k in keys if getattr(check, k, None) is not None)


def junit_xml_for_comparison(c: Comparison) -> str:
    """A comparison as JUnit XML: every judged check is a test case (a regression is a ``<failure>``); an
    incomparable pair is one ``<error>``; the notes go to the suite's ``<system-out>``."""
    prefix = f"{SUITE_PREFIX}.{c.task}"
    suite = ET.Element("testsuite", {"name": xml_text(f"{SUITE_PREFIX}.compare.{c.task}"), "time": "0"})
    _properties(suite, [
        *((f"base_{k}", v) for k, v in c.base.items()), *((f"new_{k}", v) for k, v in c.new.items()),
        ("exit_code", c.exit_code),
    ])
    if not c.comparable:
        case = _sub(suite, "testcase", classname=prefix, name="comparable", time="0")
        message = c.notes[-1] if c.notes else "no arm in common"
        _sub(case, "error", message, message=message, type="not_comparable")
    for check in c.checks:
        if check.outcome == "note":
            continue
        classname = f"{prefix}.{check.arm}" if check.arm else prefix
        case = _sub(suite, "testcase", classname=classname, name=check.subject, time="0")
        if check.outcome == "regression":
            _sub(case, "failure", check.message, message=check.message, type="regression")
        _sub(case, "system-out", check.message)
    if c.notes:
        _sub(suite, "system-out", "\n".join(c.notes))
    return _document(suite)
