"""JUnit XML: parses back, one test case per gate check and per arm, counts match the gate, names escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import mpaudit
from factories import make_arm, make_result
from mpaudit.ci.compare import compare
from mpaudit.report.junit import junit_xml, junit_xml_for_comparison
from mpaudit.results.model import ArmResult, AuditResult

arm = make_arm


def result(*arms: ArmResult, task: str = "model", **max_drop: float) -> AuditResult:
    return make_result(*arms, task=task, max_drop=max_drop)


def cases(root: ET.Element) -> dict[tuple[str, str], ET.Element]:
    return {(c.get("classname", ""), c.get("name", "")): c for c in root.iter("testcase")}


def test_real_run_with_a_failing_gate(overflow_task: Path) -> None:
    res = mpaudit.audit(overflow_task, bench=False, steps=30, arms=("fp32", "bf16", "fp16"),
                        max_drop={"accuracy": 0.05})
    assert res.arms["fp16"].status == "diverged"
    xml = junit_xml(mpaudit.AuditResult.from_json(res.to_json()))
    assert xml == junit_xml(res), "rendering from report.json gives the same XML"
    root = ET.fromstring(xml)
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "mpaudit.overflow"
    assert int(suite.get("tests", -1)) == len(res.gate.checks) + len(res.arms) == 5
    assert int(suite.get("failures", -1)) == len(res.gate.failures) == 1
    assert int(suite.get("errors", -1)) == 1  # the diverged fp16 arm
    assert root.get("failures") == "1"
    by_id = cases(root)
    failure = by_id[("mpaudit.overflow.fp16", "max_drop accuracy")].find("failure")
    assert failure is not None and failure.get("message") == res.gate.failures[0].message
    assert "diverged" in failure.get("message", "")
    assert by_id[("mpaudit.overflow.bf16", "max_drop accuracy")].find("failure") is None
    error = by_id[("mpaudit.overflow.fp16", "status")].find("error")
    assert error is not None and error.get("type") == "diverged"
    assert by_id[("mpaudit.overflow.fp32", "status")].find("error") is None


def test_a_diverged_arm_without_a_gate_is_an_error_not_a_failure() -> None:
    res = result(arm("fp32", accuracy=0.9), arm("fp16", status="diverged", error="loss is inf at step 3"))
    root = ET.fromstring(junit_xml(res))
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "1")
    error = cases(root)[("mpaudit.model.fp16", "status")].find("error")
    assert error is not None and error.get("message") == "fp16 diverged with seed 0: loss is inf at step 3"


def test_hostile_names_and_messages_are_escaped() -> None:
    task = 'evil"<task>&'
    message = "boom </failure><injected/> \x1b[31mred\x1b[0m\x00 & ]]> \"quoted\"\nsecond line"
    res = result(arm("fp32", accuracy=0.9), arm("bf16<&>", accuracy=0.5), arm("fp16", status="failed", error=message),
                 task=task, accuracy=0.01)
    xml = junit_xml(res)
    root = ET.fromstring(xml)  # well-formed despite markup, quotes, NUL and ANSI escapes
    assert root.find(".//injected") is None
    classnames = {c.get("classname") for c in root.iter("testcase")}
    assert 'mpaudit.evil"<task>&.bf16<&>' in classnames
    error = cases(root)[('mpaudit.evil"<task>&.fp16', "status")].find("error")
    assert error is not None
    assert error.get("message") == 'fp16 failed with seed 0: boom </failure><injected/> [31mred[0m & ]]> "quoted"'
    assert error.text is not None and error.text.endswith("second line")
    suite = root.find("testsuite")
    assert suite is not None and suite.get("failures") == "2" and suite.get("errors") == "1"


def test_comparison_regressions_are_failures() -> None:
    base = result(arm("fp32", accuracy=0.9), arm("bf16", accuracy=0.9))
    new = result(arm("fp32", accuracy=0.9), arm("bf16", accuracy=0.8))
    c = compare(base, new, {"accuracy": 0.01})
    root = ET.fromstring(junit_xml_for_comparison(c))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "mpaudit.compare.model"
    assert int(suite.get("failures", -1)) == len(c.regressions) == 1
    failure = cases(root)[("mpaudit.model.bf16", "gap accuracy")].find("failure")
    assert failure is not None and failure.get("message") == c.regressions[0]
    out = suite.find("system-out")
    assert out is not None and out.text is not None and "Speed not compared" in out.text

    apart = compare(result(arm("bf16", accuracy=0.9)), result(arm("fp16", accuracy=0.9)))
    root = ET.fromstring(junit_xml_for_comparison(apart))
    assert [e.get("type") for e in root.iter("error")] == ["not_comparable"]
