"""``run_suite``: every workload in its own ``mpaudit run`` process, one index page, a documented exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import OVERFLOW_TASK, TINY_TASK
from mpaudit.ci.suite import discover, run_suite
from mpaudit.errors import UsageError

FAST = ("--steps", "3", "--arms", "fp32,bf16", "--no-bench")
"""Run arguments that keep each subprocess to a few seconds."""

BROKEN_TASK = '''
import torch

def build_model():
    raise ValueError("<script>alert(1)</script> weights missing")

def train_loader():
    return [torch.zeros(2, 2)]

def loss_fn(model, batch):
    return model(batch).sum()
'''


def _suite(root: Path, **workloads: str) -> Path:
    for name, source in workloads.items():
        (root / name).mkdir(parents=True)
        (root / name / "model.py").write_text(source)
    return root


def test_index_lists_every_workload_marks_the_broken_one_and_links_the_good_one(tmp_path: Path) -> None:
    suite_dir = _suite(tmp_path / "suite", good=TINY_TASK, broken=BROKEN_TASK)
    out = tmp_path / "out"
    stale = out / "broken" / "report.json"  # last run's report must not stand in for a failed run
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    done: list[str] = []

    suite = run_suite(suite_dir, out, jobs=2, run_args=FAST, on_done=lambda run: done.append(run.name))

    assert sorted(done) == ["broken", "good"]
    assert suite.exit_code == 2  # a workload errored
    index = json.loads((out / "index.json").read_text())
    assert index["exit_code"] == 2
    rows = {row["name"]: row for row in index["workloads"]}
    assert [row["name"] for row in index["workloads"]] == ["broken", "good"]

    broken = rows["broken"]
    assert broken["status"] == "error"
    assert broken["exit_code"] == 2
    assert "build_model() in model.py raised ValueError" in broken["error"]
    assert "weights missing" in broken["stderr_tail"]
    assert broken["report_html"] is None
    assert not stale.exists()

    good = rows["good"]
    assert good["status"] == "ok"
    assert good["exit_code"] == 0
    assert good["report_html"] == "good/report.html"
    assert (out / good["report_html"]).is_file()
    assert good["primary_metric"] == "accuracy"
    assert set(good["arms"]) == {"fp32", "bf16"}
    assert good["arms"]["bf16"]["verdict"] == "safe"  # the tiny task trains alike in bf16
    assert good["arms"]["bf16"]["delta"] is not None
    assert good["arms"]["bf16"]["step_time_source"] == "training loop"  # --no-bench
    assert set(good["flags"]) >= {"error", "warning", "info"}
    assert good["gate"] == {"given": False, "passed": True, "failures": []}

    html = (out / "index.html").read_text()
    assert '<a href="good/report.html">good</a>' in html
    assert "<script>" not in html  # the broken task's message is escaped, not executed
    assert "&lt;script&gt;alert(1)&lt;/script&gt; weights missing" in html
    assert "exit status 2" in html


def test_a_failed_gate_exits_1_and_the_index_shows_which_check(tmp_path: Path) -> None:
    # fp16 overflows at once in this task, so its final loss is NaN and any loss-gap gate fails
    suite_dir = _suite(tmp_path / "suite", overflow=OVERFLOW_TASK)
    args = ("--steps", "3", "--arms", "fp32,fp16", "--no-bench", "--max-loss-gap", "1.0")

    suite = run_suite(suite_dir, tmp_path / "out", run_args=args)

    assert suite.exit_code == 1
    (run,) = suite.runs
    assert run.status == "gate failed"
    assert run.exit_code == 1
    row = json.loads(suite.index_json.read_text())["workloads"][0]
    assert row["gate"]["given"] and not row["gate"]["passed"]
    assert any("fp16 final_loss" in message for message in row["gate"]["failures"])
    assert "failed" in suite.index_html.read_text()


def test_a_hanging_workload_is_stopped_at_the_timeout_and_listed_as_an_error(tmp_path: Path) -> None:
    suite_dir = _suite(tmp_path / "suite", hangs="import time\ntime.sleep(60)\n")

    suite = run_suite(suite_dir, tmp_path / "out", run_args=FAST, timeout_s=3)

    (run,) = suite.runs
    assert run.status == "error"
    assert run.exit_code is None
    assert "timed out after 3 s" in (run.error or "")
    assert suite.exit_code == 2
    assert "timed out after 3 s" in suite.index_html.read_text()


def test_discover_filters_by_substring_or_glob_and_refuses_an_empty_suite(tmp_path: Path) -> None:
    suite_dir = _suite(tmp_path / "suite", digits_mlp="", digits_cnn="", char_lm="")
    (suite_dir / "notes").mkdir()  # a folder without model.py is not a workload

    assert [p.parent.name for p in discover(suite_dir)] == ["char_lm", "digits_cnn", "digits_mlp"]
    assert [p.parent.name for p in discover(suite_dir, "digits")] == ["digits_cnn", "digits_mlp"]
    assert [p.parent.name for p in discover(suite_dir, "*_lm")] == ["char_lm"]
    with pytest.raises(UsageError, match="matches 'resnet'"):
        discover(suite_dir, "resnet")
    with pytest.raises(UsageError, match="holds no workload"):
        discover(tmp_path / "suite" / "notes")
    with pytest.raises(UsageError, match="does not exist"):
        discover(tmp_path / "missing")


def test_resume_keeps_complete_workloads_and_continues_partial_ones(tmp_path: Path) -> None:
    suite_dir = _suite(tmp_path / "suite", done=TINY_TASK, partial=TINY_TASK)
    out = tmp_path / "out"
    run_suite(suite_dir, out, run_args=FAST)
    before = (out / "done" / "report.json").read_text()
    partial = json.loads((out / "partial" / "report.json").read_text())
    partial["complete"] = False  # as if the run had been interrupted after its fp32 arm
    del partial["arms"]["bf16"]
    (out / "partial" / "report.json").write_text(json.dumps(partial))

    suite = run_suite(suite_dir, out, run_args=FAST, resume=True)
    runs = {run.name: run for run in suite.runs}
    assert runs["done"].seconds == 0.0 and (out / "done" / "report.json").read_text() == before  # not run again
    continued = json.loads((out / "partial" / "report.json").read_text())
    assert continued["complete"] is True
    assert continued["arms"]["fp32"]["resumed"] is True and continued["arms"]["bf16"]["resumed"] is False
    assert suite.exit_code == 0
