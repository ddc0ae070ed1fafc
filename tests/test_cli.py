"""The command line end to end: outputs, exit codes, gate lines, re-rendering and re-gating saved results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mpaudit.cli import EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE, app

runner = CliRunner()


def test_run_writes_json_and_html(tiny_task: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tiny_task), "--steps", "5", "--out", str(out), "--bench-seconds", "1",
                                 "--memory-budget", "64MiB"])
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads((out / "report.json").read_text())
    assert set(data["arms"]) == {"fp32", "bf16", "fp16"}
    assert all(a["status"] == "ok" for a in data["arms"].values())
    for arm in data["arms"].values():  # the measurement phase lands in the result
        assert arm["speed"]["step_s_median"] > 0 and arm["speed"]["steps_timed"] >= 3
        assert arm["memory"]["peak_bytes"] > 0 and arm["memory"]["breakdown"]["parameters"] > 0
    assert set(data["speedups"]) == {"bf16", "fp16"}
    bf16 = data["speedups"]["bf16"]  # the verdict is the one its interval gives
    assert bf16["verdict"] == ("faster" if bf16["ci_low"] > 1 else "slower" if bf16["ci_high"] < 1 else "same")
    assert data["max_batch"]["fp32"] > 32
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert "fp16" in result.output and "report.html" in result.output
    assert data["env"]["command"][:2] == ["mpaudit", "run"] or data["env"]["command"][0] == "mpaudit"


def test_default_out_dir_is_reports_task_name(tiny_task: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--steps", "2", "--arms", "fp32", "-q"])
    assert result.exit_code == EXIT_OK, result.output
    assert (tmp_path / "reports" / tiny_task.parent.name / "report.json").is_file()


def test_gate_passes_exit_0(tiny_task: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--steps", "20", "--out", str(tmp_path / "o"),
                                 "--max-drop", "accuracy=0.05", "--max-loss-gap", "0.1", "-q"])
    assert result.exit_code == EXIT_OK, result.output


def test_fp16_overflow_fails_the_gate_exit_1(overflow_task: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--no-bench", str(overflow_task), "--steps", "30", "--out", str(tmp_path / "o"),
                                 "--max-drop", "accuracy=0.05", "-q"])
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    failing = [line for line in result.output.splitlines() if line.startswith("GATE FAILED")]
    assert len(failing) == 1  # bf16 passes, fp16 fails
    assert "fp16" in failing[0] and "accuracy" in failing[0] and "0.05" in failing[0]
    data = json.loads((tmp_path / "o" / "report.json").read_text())  # results are still written
    assert data["gate"]["passed"] is False


def test_gate_and_report_commands_reuse_a_saved_result(overflow_task: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert runner.invoke(app, ["run", "--no-bench", str(overflow_task), "--steps", "30", "--out", str(out), "-q"]).exit_code == 0
    saved = out / "report.json"
    regate = runner.invoke(app, ["gate", str(saved), "--max-drop", "accuracy=0.05"])
    assert regate.exit_code == EXIT_GATE_FAILED
    assert "FAIL fp16 accuracy" in regate.output and "PASS bf16 accuracy" in regate.output
    loose = runner.invoke(app, ["gate", str(saved), "--max-drop", "accuracy=1"])
    assert loose.exit_code == EXIT_GATE_FAILED and "the arm diverged" in loose.output  # a diverged arm never passes
    (out / "report.html").unlink()
    rerender = runner.invoke(app, ["report", str(saved)])
    assert rerender.exit_code == EXIT_OK, rerender.output
    assert "fp16" in (out / "report.html").read_text()


def test_unreadable_result_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "report.json"
    bad.write_text("not json")
    result = runner.invoke(app, ["gate", str(bad), "--max-drop", "accuracy=0.1"])
    assert result.exit_code == EXIT_USAGE and "not valid JSON" in result.output


def test_usage_errors_exit_2(tiny_task: Path) -> None:
    for args in (["--arms", "fp64"], ["--max-drop", "accuracy"], ["--steps", "1", "--epochs", "1"],
                 ["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--arms", ""]):
        result = runner.invoke(app, ["run", "--no-bench", str(tiny_task), "-q", *args])
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert "error:" in result.output


def test_console_script_help_lists_every_option() -> None:
    proc = subprocess.run([sys.executable, "-m", "mpaudit", "run", "--help"], capture_output=True, text=True,
                          check=True, env={"COLUMNS": "200", "PATH": ""})
    for option in ("--arms", "--steps", "--epochs", "--seed", "--device", "--out", "--max-drop", "--max-loss-gap",
                   "--quiet", "--debug"):
        assert option in proc.stdout


def test_seed_noise_floor_gate_passes_clean_and_fails_overflow(tiny_task: Path, overflow_task: Path,
                                                               tmp_path: Path) -> None:
    clean = runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--steps", "25", "--seeds", "3", "--arms", "fp32,bf16,fp16",
                                "--max-drop", "accuracy=auto", "--out", str(tmp_path / "c"), "-q"])
    assert clean.exit_code == EXIT_OK, clean.output
    data = json.loads((tmp_path / "c" / "report.json").read_text())
    assert data["gate"]["noise_floor"]["accuracy"]["n"] == 3
    assert data["config"]["seeds"] == [0, 1, 2]
    assert len(data["replicates"]["fp16"]) == 2
    assert data["fingerprints_match"] is True and data["warnings"] == []
    # replicates have other initial weights but the same batches
    assert data["replicates"]["fp32"][0]["fingerprints"]["weights"] != data["arms"]["fp32"]["fingerprints"]["weights"]
    assert data["replicates"]["fp32"][0]["fingerprints"]["batches"] == data["arms"]["fp32"]["fingerprints"]["batches"]

    bad = runner.invoke(app, ["run", "--no-bench", str(overflow_task), "--steps", "30", "--seeds", "2", "--arms", "fp32,fp16",
                              "--max-drop", "accuracy=auto", "--out", str(tmp_path / "b"), "-q"])
    assert bad.exit_code == EXIT_GATE_FAILED, bad.output
    assert "GATE FAILED: fp16 accuracy" in bad.output
    assert "seed noise" in bad.output and "over 2 seeds" in bad.output  # the noise floor is in the message


def test_auto_gate_without_seeds_is_a_usage_error(tiny_task: Path) -> None:
    result = runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--max-drop", "accuracy=auto", "-q"])
    assert result.exit_code == EXIT_USAGE and "--seeds 2 or more" in result.output


def test_compare_exit_codes_and_outputs(tiny_task: Path, write_task, tmp_path: Path) -> None:
    from conftest import OVERFLOW_TASK

    args = ["--steps", "30", "--arms", "fp32,fp16", "-q"]
    assert runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--out", str(tmp_path / "a"), *args]).exit_code == 0
    assert runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--out", str(tmp_path / "b"), *args]).exit_code == 0
    broken = write_task(OVERFLOW_TASK, name="model.py")  # the same task file, now overflowing in fp16
    assert runner.invoke(app, ["run", "--no-bench", str(broken), "--out", str(tmp_path / "c"), *args]).exit_code == 0
    a, b, c = (str(tmp_path / x / "report.json") for x in "abc")

    same = runner.invoke(app, ["compare", a, b, "--tolerance", "accuracy=0.02"])
    assert same.exit_code == EXIT_OK, same.output
    worse = runner.invoke(app, ["compare", a, c, "--tolerance", "accuracy=0.02", "--markdown",
                                "--junit", str(tmp_path / "cmp.xml")])
    assert worse.exit_code == EXIT_GATE_FAILED, worse.output
    assert "fp16" in worse.output and "|" in worse.output
    import xml.etree.ElementTree as ET

    assert ET.parse(tmp_path / "cmp.xml").getroot() is not None
    as_json = runner.invoke(app, ["compare", a, c, "--tolerance", "accuracy=0.02", "--json"])
    assert json.loads(as_json.output)["exit_code"] == EXIT_GATE_FAILED


def test_compare_not_comparable_is_exit_2(tiny_task: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["run", "--no-bench", str(tiny_task), "--out", str(tmp_path / "a"), "--steps", "2", "--arms",
                               "fp32", "-q"]).exit_code == 0
    data = json.loads((tmp_path / "a" / "report.json").read_text())
    data["arms"] = {"bf16": {**data["arms"]["fp32"], "name": "bf16"}}
    (tmp_path / "other.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "other.json")])
    assert result.exit_code == EXIT_USAGE, result.output
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope.json"), str(tmp_path / "other.json")])
    assert missing.exit_code == EXIT_USAGE


def test_run_writes_junit_summary_and_step_summary(overflow_task: Path, tmp_path: Path, monkeypatch) -> None:
    import xml.etree.ElementTree as ET

    step_summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    result = runner.invoke(app, ["run", "--no-bench", str(overflow_task), "--steps", "30", "--out", str(tmp_path / "o"), "-q",
                                 "--max-drop", "accuracy=0.05", "--junit", str(tmp_path / "junit.xml")])
    assert result.exit_code == EXIT_GATE_FAILED
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    failures = suite.iter("failure")
    assert any("fp16" in (f.get("message") or "") for f in failures)
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "fp16" in summary and step_summary.read_text() == summary
