"""No audit loses its work: results on disk as arms finish, SIGINT/SIGTERM keep what finished, --resume continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import mpaudit
from mpaudit.errors import UsageError
from mpaudit.run.interrupt import Interrupted, interruptible, shielded

STEPS = "1000"
"""Long enough that the second arm is still training when the signal comes, short on 2 cores."""


def _report(out: Path) -> dict | None:
    try:
        return json.loads((out / "report.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _run(task: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mpaudit", "run", str(task), "--out", str(out), "--steps", STEPS, "--no-bench",
           "--trace-every", "0", "-q", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_after_fp32(task: Path, out: Path, signum: int) -> tuple[int, str]:
    proc = _run(task, out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        data = _report(out)
        if data and data["arms"].get("fp32", {}).get("status") == "ok":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the audit finished before it could be interrupted"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_the_finished_arms_and_resume_finishes_the_rest(
    write_task: Callable[..., Path], tmp_path: Path, signum: int, code: int
) -> None:
    task, out = write_task(), tmp_path / "out"
    returncode, err = _interrupt_after_fp32(task, out, signum)
    assert returncode == code, err
    assert "--resume" in err
    data = _report(out)
    assert data is not None and data["complete"] is False
    assert data["arms"]["fp32"]["status"] == "ok"
    in_flight = data["arms"].get("bf16")
    if in_flight is not None:  # the arm in flight is kept with its steps so far
        assert in_flight["status"] == "interrupted" and 0 < in_flight["steps"] < int(STEPS)
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()

    resumed = _run(task, out, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    data = _report(out)
    assert data is not None and data["complete"] is True
    assert data["arms"]["fp32"]["resumed"] is True and data["arms"]["fp32"]["steps"] == int(STEPS)
    assert all(a["status"] == "ok" for a in data["arms"].values())
    assert data["arms"]["bf16"]["resumed"] is False  # interrupted: trained again, from the start


def test_resume_refuses_a_changed_option_or_task(tiny_task: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = mpaudit.audit(tiny_task, steps=5, arms=("fp32", "bf16"), bench=False)
    mpaudit.write_report(first, out)
    saved = mpaudit.AuditResult.from_json((out / "report.json").read_text())
    with pytest.raises(UsageError, match="--steps was 5 in the saved run and is 6 now"):
        mpaudit.audit(tiny_task, steps=6, arms=("fp32", "bf16"), bench=False, resume=saved)
    again = mpaudit.audit(tiny_task, steps=5, arms=("fp32", "bf16", "fp16"), bench=False, resume=saved)
    assert [a.resumed for a in again.arms.values()] == [True, True, False] and again.complete
    tiny_task.write_text(tiny_task.read_text() + "\n# changed\n")
    with pytest.raises(UsageError, match="task file changed"):
        mpaudit.audit(tiny_task, steps=5, arms=("fp32",), bench=False, resume=saved)


def test_results_are_on_disk_as_each_arm_finishes(tiny_task: Path) -> None:
    seen: list[tuple[bool, list[str]]] = []
    result = mpaudit.audit(tiny_task, steps=5, arms=("fp32", "bf16"), bench=False,
                           on_update=lambda r: seen.append((r.complete, list(r.arms))))
    assert seen == [(False, ["fp32"]), (False, ["fp32", "bf16"])]
    assert result.complete
    older = json.loads(result.to_json())
    del older["complete"]
    assert mpaudit.AuditResult.from_dict(older).complete  # a result written before the key reads as complete


def test_only_the_first_signal_raises_and_writing_is_shielded() -> None:
    with pytest.raises(Interrupted) as caught, interruptible():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert caught.value.exit_code == 130
    with shielded():
        os.kill(os.getpid(), signal.SIGTERM)  # ignored while the partial result is written
        time.sleep(0.1)
