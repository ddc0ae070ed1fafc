"""summary.md: what a reviewer reads in a PR comment or the job summary, and tables user text cannot break."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

import mpaudit
from factories import make_arm, make_result
from mpaudit.report.markdown import append_step_summary, md_escape, summary_markdown
from mpaudit.results.model import ArmResult, AuditResult, Cause, Flag, Recommendation
from mpaudit.results.perf import Speedup


def arm(name: str, status: str = "ok", error: str | None = None, skipped: int | None = None,
        **metrics: float) -> ArmResult:
    return make_arm(name, status, loss=1.0, steps=30, error=error, skipped=skipped, **metrics)


def result(*arms: ArmResult, flags: list[Flag] | None = None, task: str = "model", **max_drop: float) -> AuditResult:
    return make_result(*arms, task=task, flags=flags or [], max_drop=max_drop)


def table_rows(md: str) -> list[list[str]]:
    """Cells of every table row, split on unescaped pipes as GitHub does."""
    rows = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in rows]


def test_real_run_with_seeds_shows_interval_gate_and_noise_floor(tiny_task: Path) -> None:
    res = mpaudit.audit(tiny_task, bench=False, steps=15, arms=("fp32", "bf16"), seeds=2, max_drop={"accuracy": "auto"})
    md = summary_markdown(mpaudit.AuditResult.from_json(res.to_json()))
    assert md.startswith(f"### mpaudit: {md_escape(res.task)}: ✅ gate passed")
    rows = {r[0]: r for r in table_rows(md)}
    # every row shows the same aggregate: the seed mean ± sd, fp32 included
    assert "mean ± sd over 2 seeds" in md
    fp32_values = [res.arms["fp32"].metrics["accuracy"], res.replicates["fp32"][0].metrics["accuracy"]]
    assert rows["fp32"][3].startswith(f"{sum(fp32_values) / 2:.4g} ± ")
    assert rows["bf16"][1] == "safe" and rows["bf16"][2] == "ok"
    assert " ± " in rows["bf16"][3] and "95% CI" in rows["bf16"][3]
    assert md.splitlines()[2].startswith("- **bf16: safe**: accuracy ")
    assert "**Gate:** ✅ passed, 1 checks (accuracy=auto)." in md
    assert "**Noise floor:** fp32 accuracy σ = " in md and "over 2 seeds" in md
    assert "seeds 0, 1" in md


def test_failed_gate_lists_the_failing_check_and_says_there_is_no_noise_estimate() -> None:
    res = result(arm("fp32", accuracy=0.90), arm("bf16", accuracy=0.895), arm("fp16", accuracy=0.60, skipped=4),
                 accuracy=0.01)
    md = summary_markdown(res)
    assert md.startswith("### mpaudit: model: ❌ gate failed")
    assert "- **fp16: not safe**: accuracy 0.6 (-0.3, worse)" in md
    assert "- **bf16: safe**: accuracy 0.895 (-0.005, worse)" in md
    assert "**Gate:** ❌ failed, 1 of 2 checks (accuracy=0.01):" in md
    assert f"- {md_escape(res.gate.failures[0].message)}" in md
    assert "no noise estimate (run with `--seeds K`)" in md
    rows = {r[0]: r for r in table_rows(md)}
    assert rows["fp16"][1:4] == ["not safe", "ok", "0.6 (-0.3, worse)"]
    assert rows["bf16"][3] == "0.895 (-0.005, worse)"
    assert rows["fp16"][-1] == "4 of 30"


def test_a_diverged_arm_without_a_gate_is_in_the_headline_with_its_error() -> None:
    md = summary_markdown(result(arm("fp32", accuracy=0.9), arm("fp16", status="diverged", error="loss inf at step 3")))
    assert md.startswith("### mpaudit: model: ⚠️ fp16 diverged")
    assert "- **fp16: not safe**: diverged: loss inf at step 3; accuracy –" in md
    assert "**Gate:** none given" in md
    fp16 = next(r for r in table_rows(md) if r[0] == "fp16")
    assert fp16[2] == "diverged: loss inf at step 3"


def test_the_verified_fix_and_the_root_cause_lead_the_arm_line() -> None:
    cause = Flag(layer="block.attn", arm="fp16", kind="forward_overflow", severity="error", evidence={},
                 recommendation="keep `block.attn` in fp32")
    follows = Flag(layer="head", arm="fp16", kind="nonfinite", severity="error", evidence={},
                   caused_by=Cause(layer="block.attn", kind="forward_overflow"))
    fix = Recommendation(arm="fp16", keep_fp32=["block.attn"], verified_arm="fp16+keep", passed=True,
                         metrics={"accuracy": 0.89}, runs_used=1, reason="keeping `block.attn` in fp32: passes")
    res = replace(result(arm("fp32", accuracy=0.9), arm("fp16", status="diverged", error="nan"),
                         flags=[cause, follows]), recommendations=[fix])
    md = summary_markdown(res)
    line = next(x for x in md.splitlines() if x.startswith("- **fp16"))
    assert line.startswith("- **fp16: safe with changes**: diverged: nan")
    assert r"root cause: forward\_overflow at block.attn" in line
    assert line.endswith(r"**verified fix:** keep \`block.attn\` in fp32 (accuracy 0.89 in \`fp16+keep\`)")
    flag_rows = [r for r in table_rows(md) if r[0] == "error"]
    assert len(flag_rows) == 1 and flag_rows[0][-1] == "1"  # the consequence is counted under its cause


def test_a_half_weight_fix_is_named_in_the_arm_line() -> None:
    lost = Flag(layer="fc1", arm="bf16-pure", kind="update_underflow", severity="error",
                evidence={"measured_lost_fraction": 0.95}, recommendation="round its updates stochastically")
    fixes = [Recommendation(arm="bf16-pure", update_rounding="stochastic", verified_arm="bf16-pure+sr", passed=True,
                            metrics={"accuracy": 0.69}, runs_used=1),
             Recommendation(arm="bf16-pure", fp32_master=["fc1", "fc2"], update_rounding=None, passed=True,
                            verified_arm="bf16-pure+master", metrics={"accuracy": 0.7}, runs_used=2)]
    res = replace(result(arm("fp32", accuracy=0.7), arm("bf16-pure", accuracy=0.3), flags=[lost]),
                  recommendations=fixes[:1])
    line = next(x for x in summary_markdown(res).splitlines() if x.startswith("- **bf16-pure"))
    assert r"root cause: update\_underflow at fc1" in line
    assert line.endswith(r"**verified fix:** stochastic rounding of bf16 updates (accuracy 0.69 in \`bf16-pure+sr\`)")
    line = next(x for x in summary_markdown(replace(res, recommendations=fixes[1:])).splitlines()
                if x.startswith("- **bf16-pure"))
    assert r"**verified fix:** fp32 master weights for \`fc1\`, \`fc2\`" in line


def test_benchmark_speedup_is_shown_with_its_interval() -> None:
    base = result(arm("fp32", accuracy=0.9), arm("bf16", accuracy=0.9))
    speedup = Speedup(arm="bf16", baseline="fp32", ratio=1.8, ci_low=1.7, ci_high=1.9, rounds=10)
    md = summary_markdown(replace(base, speedups={"bf16": speedup}))
    bf16 = next(r for r in table_rows(md) if r[0] == "bf16")
    assert bf16[4] == "1.8× (95% CI 1.7–1.9) faster"


def test_root_flags_worst_first_capped_and_info_only_counted() -> None:
    flags = [Flag(layer=f"layer{i}", arm="fp16", kind="gradient_underflow", severity="warning", evidence={},
                  recommendation="raise the loss scale") for i in range(8)]
    flags.insert(5, Flag(layer="head", arm="fp16", kind="forward_overflow", severity="error", evidence={},
                         recommendation="keep head in fp32"))
    flags.append(Flag(layer="fc", arm="fp16", kind="precision_loss", severity="info", evidence={}))
    md = summary_markdown(result(arm("fp32", accuracy=0.9), arm("fp16", accuracy=0.9), flags=flags), max_flags=3)
    assert "**Flags:** 10; the 3 root causes at least warning-severe (and what follows from them); 7 more" in md
    flag_rows = [r for r in table_rows(md) if r[0] in ("error", "warning", "info")]
    assert [r[3] for r in flag_rows] == ["head", "layer0", "layer1"]
    assert flag_rows[0] == ["error", "fp16", r"forward\_overflow", "head", "keep head in fp32", ""]
    info = summary_markdown(result(arm("fp32", accuracy=0.9), arm("fp16", accuracy=0.9), flags=flags[-1:]))
    assert "**Flags:** 1, none at least warning-severe" in info
    everything = summary_markdown(result(arm("fp32", accuracy=0.9), arm("fp16", accuracy=0.9), flags=flags[-1:]),
                                  min_severity="info")
    assert any(r[0] == "info" for r in table_rows(everything))


def test_user_text_cannot_break_the_table_or_inject_html() -> None:
    hostile = "enc|oder`x`\n<script>alert(1)</script> @octocat"
    flag = Flag(layer=hostile, arm="fp16", kind="nonfinite", severity="error", evidence={},
                recommendation="fix | this\r\nnow")
    md = summary_markdown(result(arm("fp32", accuracy=0.9), arm("fp16", status="failed", error=hostile),
                                 flags=[flag], task="my|task"))
    assert "<script>" not in md and "@octocat" not in md
    assert md.startswith("### mpaudit: my\\|task:")
    for row in table_rows(md):
        assert len(row) in (4, 6), row  # the arm table has 4 columns, the flag table 6
    flag_row = next(r for r in table_rows(md) if r[0] == "error")
    assert flag_row[3] == "enc\\|oder\\`x\\`<br>&lt;script&gt;alert(1)&lt;/script&gt; &#64;octocat"
    assert flag_row[4] == "fix \\| this<br>now"
    assert md_escape("a_b*c[d]") == "a\\_b\\*c\\[d\\]"


def test_append_step_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_step_summary("# nothing") is None
    target = tmp_path / "step_summary.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert append_step_summary("### first") == target
    assert append_step_summary("### second\n") == target
    assert target.read_text() == "earlier step\n### first\n### second\n"
