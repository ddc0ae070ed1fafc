"""Thresholds from ``--threshold`` and ``[tool.mpaudit.thresholds]`` in the nearest pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpaudit.errors import UsageError
from mpaudit.numerics.rules import Thresholds
from mpaudit.run.settings import find_pyproject, parse_thresholds, pyproject_thresholds


def test_parse_thresholds() -> None:
    assert parse_thresholds(["gradient_underflow_error=0.05", " forward_headroom_binades = 4"]) == {
        "gradient_underflow_error": 0.05, "forward_headroom_binades": 4.0}
    for bad in ["gradient_underflow_error", "=1", "gradient_underflow_error=lots"]:
        with pytest.raises(UsageError):
            parse_thresholds([bad])


def test_the_nearest_pyproject_above_the_task_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.mpaudit.thresholds]\ngradient_underflow_error = 0.5\n")
    task = tmp_path / "project" / "models" / "model.py"
    task.parent.mkdir(parents=True)
    task.write_text("")
    assert find_pyproject(task) == tmp_path / "pyproject.toml"
    assert pyproject_thresholds(task) == {"gradient_underflow_error": 0.5}
    (tmp_path / "project" / "pyproject.toml").write_text("[tool.mpaudit.thresholds]\nskip_fraction_error = 0.5\n")
    assert pyproject_thresholds(task) == {"skip_fraction_error": 0.5}  # the nearer one wins
    assert Thresholds.from_mapping(pyproject_thresholds(task)).skip_fraction_error == 0.5


def test_a_pyproject_without_the_table_gives_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert pyproject_thresholds(tmp_path / "model.py") == {}


@pytest.mark.parametrize("text", ["[tool.mpaudit\n", "[tool.mpaudit]\nthresholds = 3\n"])
def test_a_broken_pyproject_is_a_usage_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(UsageError, match=r"pyproject\.toml"):
        pyproject_thresholds(tmp_path / "model.py")


def test_unknown_or_non_numeric_thresholds_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="Unknown threshold 'gradient_underflow'"):
        Thresholds.from_mapping({"gradient_underflow": 0.1})
    with pytest.raises(UsageError, match="must be a number"):
        Thresholds.from_mapping({"skip_fraction_error": "high"})
