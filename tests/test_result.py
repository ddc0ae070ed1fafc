"""report.json: versioned, round-trips exactly (non-finite floats too), written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import mpaudit
from mpaudit.errors import ResultError
from mpaudit.results.atomic import atomic_write_text
from mpaudit.results.model import SCHEMA_VERSION, AuditResult


def test_json_round_trip_of_a_real_run(overflow_task: Path) -> None:
    result = mpaudit.audit(overflow_task, bench=False, steps=30, max_drop={"accuracy": 0.05})
    text = result.to_json()
    data = json.loads(text)  # strict JSON: no bare NaN/Infinity literals
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["arms"]["fp16"]["status"] == "diverged"
    assert "NaN" in data["arms"]["fp16"]["loss"] or "Infinity" in data["arms"]["fp16"]["loss"]
    assert data["arms"]["fp16"]["loss_scale"]["skipped"] == len(data["arms"]["fp16"]["loss_scale"]["skipped_steps"])
    assert data["gate"]["passed"] is False
    expected = {"layer": "amp", "arm": "fp16", "kind": "forward_overflow", "severity": "error"}
    assert expected.items() <= data["flags"][0].items()
    assert data["arms"]["fp16"]["trace"]["first_nonfinite_forward"]["layer"] == "amp"
    for key in ("torch_version", "device", "dtype_support", "threads", "tf32", "seed", "task_sha256"):
        assert key in data["env"]

    back = AuditResult.from_json(text)
    assert back == result or _equal_with_nan(back, result)
    assert back.to_json() == text


def _equal_with_nan(a: AuditResult, b: AuditResult) -> bool:
    for name in a.arms:
        la, lb = a.arms[name].loss, b.arms[name].loss
        same = len(la) == len(lb) and all(
            x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(la, lb, strict=True))
        if not same:
            return False
    return a.to_json() == b.to_json()


def test_unknown_schema_and_garbage_are_result_errors() -> None:
    with pytest.raises(ResultError, match="not valid JSON"):
        AuditResult.from_json("{nope")
    with pytest.raises(ResultError, match="no schema_version"):
        AuditResult.from_json('{"arms": {}}')
    with pytest.raises(ResultError, match="upgrade mpaudit"):
        AuditResult.from_json(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ResultError, match="malformed"):
        AuditResult.from_json(json.dumps({"schema_version": 1, "task": "x"}))


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["report.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    atomic_write_text(target, "old complete content")

    def boom(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # as if the user hit Ctrl-C between writing and renaming

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new content that never lands")
    assert target.read_text() == "old complete content"
    assert os.listdir(tmp_path) == ["report.json"]  # the temp file is cleaned up
