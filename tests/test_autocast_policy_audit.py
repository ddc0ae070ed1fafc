"""Whole audits under CUDA's op policy (the default on a CPU) and under ``--autocast-policy cpu``.

A model with a hand-rolled, unscaled softmax (``suites/handrolled_softmax``) trains in fp16 on a GPU because CUDA
autocast runs ``exp`` in fp32; a CPU audit must say so, and with ``--autocast-policy cpu`` it shows CPU autocast's
failure instead. The fp16 showcases fail for reasons both policies share (a Linear's output past 65504, gradients
below 2^-24), so they keep their verdicts and flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mpaudit
from mpaudit.arms import ARMS
from mpaudit.ci.verdict import verdicts
from mpaudit.report import render_html
from mpaudit.report.markdown import summary_markdown
from mpaudit.results.model import AuditResult
from mpaudit.run.precision import autocast, step_context
from mpaudit.run.task import load_task

SUITES = Path(__file__).resolve().parent.parent / "suites"
HANDROLLED = SUITES / "handrolled_softmax" / "model.py"
MAX_ACCURACY_GAP = 0.03
"""The issue's bar: the fp16 arm trains within this much accuracy of fp32."""
TRAINED_SCORE = 20.0
"""An attention score as large as the workload's training makes them (~15-25): past ln(65504) = 11.09, where
fp16's ``exp`` overflows, and far below ln(fp32 max) = 88.7."""


def _audit(path: Path, policy: str, **overrides: Any) -> AuditResult:
    return mpaudit.audit(path, bench=False, arms=("fp32", "fp16"), autocast_policy=policy, **overrides)


def _errors(result: AuditResult, arm: str) -> set[tuple[str, str]]:
    return {(f.kind, f.layer) for f in result.flags if f.arm == arm and f.severity == "error"}


@pytest.fixture(scope="module")
def handrolled() -> dict[str, AuditResult]:
    """The hand-rolled softmax workload audited at its defaults (200 steps) under each policy."""
    return {policy: _audit(HANDROLLED, policy) for policy in ("cuda", "cpu")}


@pytest.mark.slow
def test_handrolled_softmax_trains_in_fp16_like_fp32_under_cudas_op_policy(handrolled: dict[str, AuditResult]) -> None:
    result = handrolled["cuda"]
    fp32, fp16 = result.arms["fp32"], result.arms["fp16"]
    assert fp32.status == fp16.status == "ok"
    assert fp16.autocast_policy == "cuda" and fp32.autocast_policy is None
    assert fp32.metrics["accuracy"] > 0.9
    assert abs(fp16.metrics["accuracy"] - fp32.metrics["accuracy"]) <= MAX_ACCURACY_GAP
    assert fp16.loss_scale is not None and fp16.loss_scale.skipped == 0
    assert not _errors(result, "fp16")
    assert verdicts(result)["fp16"].level == "safe"


@pytest.mark.slow
def test_handrolled_softmax_fails_in_fp16_under_cpu_autocasts_op_policy(handrolled: dict[str, AuditResult]) -> None:
    result = handrolled["cpu"]
    fp32, fp16 = result.arms["fp32"], result.arms["fp16"]
    assert fp16.autocast_policy == "cpu"
    assert fp32.metrics == handrolled["cuda"].arms["fp32"].metrics  # fp32 has no autocast: the same run
    assert fp16.status == "diverged"
    assert ("nonfinite", "attn.out") in _errors(result, "fp16")
    assert verdicts(result)["fp16"].level == "not safe"


@pytest.mark.slow
def test_the_reports_say_which_op_policy_each_arm_followed(handrolled: dict[str, AuditResult]) -> None:
    for policy, result in handrolled.items():
        again = AuditResult.from_json(result.to_json())
        assert again.arms["fp16"].autocast_policy == policy and again.arms["fp32"].autocast_policy is None
        html = render_html(again)
        assert f"({policy} op policy)" in html
        banner = "CUDA autocast&#39;s op policy on this CPU" if policy == "cuda" else "CPU autocast&#39;s op policy"
        assert banner in html or banner.replace("&#39;", "'") in html
        md = summary_markdown(again)
        assert f"`--autocast-policy {policy}`" in md
        assert "**Op policy:** fp16 followed" in md


def test_the_handrolled_softmax_overflows_fp16_only_where_exp_runs_in_fp16() -> None:
    """One forward with scores as large as training makes them: past 11.09 the CPU policy's fp16 ``exp`` is inf;
    CUDA's policy runs it in fp32, which holds them."""
    module = load_task(HANDROLLED).module
    torch.manual_seed(0)
    model = module.build_model()
    x, _ = next(iter(module.train_loader()))
    attn = model.attn
    with torch.no_grad():
        h = torch.relu(model.conv(x.view(-1, module.ROWS, module.PIXELS).transpose(1, 2))).transpose(1, 2)
        largest = float((attn.q(h) @ attn.k(h).mT).max())
        for p in (attn.q.weight, attn.q.bias):
            p.mul_(TRAINED_SCORE / largest)  # scale the queries: the largest score becomes TRAINED_SCORE
    arm = ARMS["fp16"]
    outputs = {}
    for policy in ("cuda", "cpu"):
        with step_context(arm, "cpu", "emulate", policy), autocast(arm, "cpu"), torch.no_grad():
            outputs[policy] = model(x)
    assert torch.isfinite(outputs["cuda"]).all()
    assert not torch.isfinite(outputs["cpu"]).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suite", "steps", "expected"),
    [
        ("fp16_overflow", 60, {("forward_overflow", "input_proj"), ("loss_scale", "(model)")}),
        # the same loss-scale advice on every layer is one model-level flag listing them (emb ... mlp.4)
        ("fp16_underflow", 50, {("gradient_underflow", "(model)"), ("loss_scale", "(model)")}),
    ],
)
def test_the_fp16_showcases_keep_their_verdicts_and_flags_under_either_policy(
    suite: str, steps: int, expected: set[tuple[str, str]]
) -> None:
    results = {policy: _audit(SUITES / suite / "model.py", policy, steps=steps) for policy in ("cuda", "cpu")}
    cuda, cpu = results["cuda"], results["cpu"]
    assert expected <= _errors(cuda, "fp16")
    assert _errors(cuda, "fp16") == _errors(cpu, "fp16")
    assert {n: a.status for n, a in cuda.arms.items()} == {n: a.status for n, a in cpu.arms.items()}
    assert verdicts(cuda)["fp16"].level == verdicts(cpu)["fp16"].level == "not safe"
    for result in (cuda, cpu):
        folded = [f for f in result.flags if f.layer == "(model)" and f.kind == "gradient_underflow"]
        assert all({"emb", "mlp.4"} <= set(f.evidence["layers"]) for f in folded)


def test_the_overflow_showcase_input_proj_is_inf_under_cudas_op_policy() -> None:
    """A Linear's output past 65504 is inf in fp16 whoever's op lists are followed (Linear is half on both)."""
    module = load_task(SUITES / "fp16_overflow" / "model.py").module
    torch.manual_seed(0)
    model = module.build_model()
    x, _ = next(iter(module.train_loader()))
    seen: dict[str, torch.Tensor] = {}
    model.input_proj.register_forward_hook(lambda mod, inp, out: seen.__setitem__("y", out))
    arm = ARMS["fp16"]
    with step_context(arm, "cpu", "emulate", "cuda"), autocast(arm, "cpu"), torch.no_grad():
        logits = model(x)
    assert seen["y"].dtype == torch.float16 and torch.isinf(seen["y"]).any()
    assert not torch.isfinite(logits).any()


def test_the_underflow_showcase_logit_gradients_flush_under_cudas_op_policy() -> None:
    """Gradients below fp16's subnormals flush to zero whoever's op lists are followed."""
    module = load_task(SUITES / "fp16_underflow" / "model.py").module
    torch.manual_seed(0)
    model = module.build_model()
    batch = next(iter(module.train_loader()))
    seen: dict[str, torch.Tensor] = {}
    model.mlp[-1].register_forward_hook(lambda mod, inp, out: seen.__setitem__("logits", out))
    arm = ARMS["fp16"]
    default_scale = torch.amp.GradScaler("cpu").get_scale()
    with step_context(arm, "cpu", "emulate", "cuda"):
        with autocast(arm, "cpu"):
            loss = module.loss_fn(model, batch)
        seen["logits"].retain_grad()
        (loss * default_scale).backward()
    grad = seen["logits"].grad
    assert grad is not None and grad.dtype == torch.float16
    assert float((grad == 0).float().mean()) > 0.25
