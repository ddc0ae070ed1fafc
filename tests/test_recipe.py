"""The training recipe: scheduler, clipping after unscale_, gradient accumulation, and a custom step through ``amp``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mpaudit
from conftest import OVERFLOW_TASK, TINY_TASK
from mpaudit.arms import ARMS
from mpaudit.cli import EXIT_USAGE, app
from mpaudit.errors import UsageError
from mpaudit.run.prepare import RunContext, prepare_arm
from mpaudit.run.task import load_task

runner = CliRunner()
CPU = torch.device("cpu")

SCHEDULER = '''
CALLS = []

def build_scheduler(optimizer):
    def factor(step):
        CALLS.append(step)
        return 1.0 / (1 + step)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
'''

CUSTOM_STEP = '''
def custom_step(model, batch, optimizer, amp):
    x, y = batch
    with amp.autocast():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y) + 1e-3 * logits.float().pow(2).mean()
    amp.backward(loss)
    amp.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    amp.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss
'''

# The default step of the tiny task, written as a custom step: it must train exactly as mpaudit's own step does.
DEFAULT_AS_CUSTOM = '''
def custom_step(model, batch, optimizer, amp):
    with amp.autocast():
        loss = loss_fn(model, batch)
    amp.backward(loss)
    amp.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss
'''


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", "--no-bench", *args, "--steps", "2", "-q"])
    return result.exit_code, result.output


def assert_contract_error(path: Path, *fragments: str, args: tuple[str, ...] = ()) -> None:
    code, output = run_cli(str(path), "--out", str(path.parent / "out"), *args)
    assert code == EXIT_USAGE, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in " ".join(output.split()), output
    assert not (path.parent / "out" / "report.json").exists()


# ---------------------------------------------------------------- the contract's checks


@pytest.mark.parametrize(("line", "fragment"), [
    ("clip_grad_norm = 'one'", "clip_grad_norm in model.py must be a positive number"),
    ("clip_grad_norm = 0", "clip_grad_norm in model.py must be a positive number"),
    ("clip_grad_norm = -1.0", "must be a positive number"),
    ("clip_grad_norm = float('nan')", "must be a positive number"),
    ("clip_grad_norm = True", "must be a positive number"),
    ("grad_accumulation = 0", "grad_accumulation in model.py must be a positive whole number"),
    ("grad_accumulation = 2.5", "must be a positive whole number"),
    ("grad_accumulation = '4'", "must be a positive whole number"),
    ("build_scheduler = 3", "build_scheduler in model.py must be a function"),
    ("custom_step = None", "custom_step in model.py must be a function"),
])
def test_bad_recipe_values_are_one_sentence_and_exit_2(write_task: Callable[..., Path], line: str,
                                                       fragment: str) -> None:
    assert_contract_error(write_task(TINY_TASK + "\n" + line + "\n"), fragment)


@pytest.mark.parametrize(("body", "fragment"), [
    ("return 0.1", "must return a torch.optim.lr_scheduler.LRScheduler, but it returned a float"),
    ("return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)", "ReduceLROnPlateau, which needs a metric"),
    ("return torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 1)",
     "scheduler of another optimizer"),
    ("raise RuntimeError('no schedule')", "build_scheduler() in model.py raised RuntimeError: no schedule"),
])
def test_a_scheduler_that_is_not_one_is_a_contract_error(write_task: Callable[..., Path], body: str,
                                                         fragment: str) -> None:
    path = write_task(TINY_TASK + f"\ndef build_scheduler(optimizer):\n    {body}\n")
    assert_contract_error(path, fragment)


@pytest.mark.parametrize("extra", ["clip_grad_norm = 1.0", "grad_accumulation = 2",
                                   "def build_scheduler(optimizer):\n    return None"])
def test_custom_step_with_what_it_owns_is_a_contract_error(write_task: Callable[..., Path], extra: str) -> None:
    path = write_task(TINY_TASK + CUSTOM_STEP + "\n" + extra + "\n")
    assert_contract_error(path, "defines custom_step() and", "a custom step owns clipping")


@pytest.mark.parametrize("option", [("--clip-grad-norm", "1"), ("--grad-accumulation", "2")])
def test_recipe_options_on_a_custom_step_task_are_a_usage_error(write_task: Callable[..., Path],
                                                               option: tuple[str, str]) -> None:
    assert_contract_error(write_task(TINY_TASK + CUSTOM_STEP), f"{option[0]} cannot apply", args=option)


@pytest.mark.parametrize("args", [("--clip-grad-norm", "0"), ("--clip-grad-norm", "-2"),
                                  ("--grad-accumulation", "0")])
def test_bad_recipe_options_are_usage_errors(tiny_task: Path, args: tuple[str, str]) -> None:
    code, output = run_cli(str(tiny_task), *args)
    assert code == EXIT_USAGE and args[0] in output, output


@pytest.mark.parametrize(("body", "fragment"), [
    ("    loss = loss_fn(model, batch)\n    loss.backward()\n    amp.step(optimizer)\n    return loss",
     "without amp.backward(loss)"),
    ("    loss = loss_fn(model, batch)\n    amp.backward(loss)\n    optimizer.step()\n    return loss",
     "called optimizer.step() itself"),
    ("    loss = loss_fn(model, batch)\n    amp.backward(loss)\n    amp.step(optimizer)", "must return its loss"),
    ("    return torch.ones(3)", "must return its loss as a scalar"),
])
def test_custom_step_that_bypasses_amp_fails_preflight(write_task: Callable[..., Path], body: str,
                                                      fragment: str) -> None:
    path = write_task(TINY_TASK + "\ndef custom_step(model, batch, optimizer, amp):\n" + body + "\n")
    assert_contract_error(path, fragment)


# ---------------------------------------------------------------- what each piece does


def test_recipe_is_recorded_in_config_and_overrides_win(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK + SCHEDULER + "\nclip_grad_norm = 5.0\n")
    result = mpaudit.audit(path, steps=2, arms=("fp32",), bench=False, grad_accumulation=2)
    config = result.config
    assert (config["clip_grad_norm"], config["grad_accumulation"]) == (5.0, 2)
    assert (config["scheduler"], config["custom_step"]) == ("LambdaLR", False)
    overridden = mpaudit.audit(path, steps=2, arms=("fp32",), bench=False, clip_grad_norm=0.5).config
    assert (overridden["clip_grad_norm"], overridden["grad_accumulation"]) == (0.5, 1)
    plain = mpaudit.audit(load_task(write_task(TINY_TASK, name="plain.py")), steps=1, arms=("fp32",), bench=False)
    recorded = (plain.config["clip_grad_norm"], plain.config["scheduler"], plain.config["custom_step"])
    assert recorded == (None, None, False)


def test_accumulating_two_half_batches_equals_one_whole_batch(write_task: Callable[..., Path]) -> None:
    # The tiny task's batches are 32 rows; split each in two and accumulate: the same mean loss, the same steps.
    halves = write_task(TINY_TASK.replace(
        "return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]",
        "return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 256, 16)]",
    ) + "\ngrad_accumulation = 2\n", name="halves.py")
    whole = write_task(TINY_TASK, name="whole.py")
    a = mpaudit.audit(halves, steps=6, arms=("fp32",), bench=False, trace_every=0).arms["fp32"]
    b = mpaudit.audit(whole, steps=6, arms=("fp32",), bench=False, trace_every=0).arms["fp32"]
    assert a.steps == b.steps == 6
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.metrics == pytest.approx(b.metrics)


def test_accumulation_steps_the_scaler_once_per_optimizer_step(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK + "\ngrad_accumulation = 4\n")
    arm = mpaudit.audit(path, steps=2, arms=("fp16",), bench=False).arms["fp16"]
    assert arm.steps == 2 and arm.loss_scale is not None
    assert len(arm.loss_scale.history) == 2  # one GradScaler step (and update) per optimizer step


def test_epochs_with_accumulation_count_optimizer_steps(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK + "\ngrad_accumulation = 3\n")  # 8 batches an epoch: groups of 3, 3, 2
    arm = mpaudit.audit(path, epochs=1, arms=("fp32",), bench=False).arms["fp32"]
    assert arm.steps == 3


def test_scheduler_steps_after_each_real_optimizer_step_never_on_a_skipped_one(
    write_task: Callable[..., Path],
) -> None:
    path = write_task(OVERFLOW_TASK + SCHEDULER, name="overflow.py")
    task = load_task(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when a scheduler steps before its optimizer
        result = mpaudit.audit(task, steps=8, arms=("bf16", "fp16"), bench=False, trace_every=0)
    calls = task.module.CALLS
    # LambdaLR calls the factor once when built (in preflight and in each arm), then once per scheduler step
    fp16 = result.arms["fp16"]
    assert fp16.loss_scale is not None and fp16.loss_scale.skipped == 8  # every fp16 step overflows
    assert len(calls) == 1 + (1 + 8) + (1 + 0)  # bf16: 8 steps; fp16: none, since GradScaler skipped them all


def test_clipping_sees_unscaled_gradients_in_fp16(write_task: Callable[..., Path]) -> None:
    """With clip_grad_norm the fp16 step equals unscale-then-clip, not clipping the scaled gradients."""
    path = write_task(TINY_TASK + "\nclip_grad_norm = 0.1\n")
    run = RunContext(task=load_task(path), device=CPU)
    batch = run.task.train_loader()[0]

    def delta(step: Callable[..., None]) -> torch.Tensor:
        prepared = prepare_arm(run, ARMS["fp16"], seed=0)
        before = torch.cat([p.detach().flatten().clone() for p in prepared.model.parameters()])
        with prepared.context():
            step(prepared)
        return torch.cat([p.detach().flatten() for p in prepared.model.parameters()]) - before

    def manual(prepared: object, scaled: bool) -> None:
        model, opt, scaler = prepared.model, prepared.optimizer, prepared.scaler  # type: ignore[attr-defined]
        with prepared.autocast():  # type: ignore[attr-defined]
            loss = run.task.loss(model, batch)
        scaler.scale(loss).backward()
        if not scaled:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()

    ours = delta(lambda p: p.step(batch))
    right = delta(lambda p: manual(p, scaled=False))
    wrong = delta(lambda p: manual(p, scaled=True))
    assert torch.allclose(ours, right)
    # AdamW normalises its first steps, so compare how far each moved: clipping the scaled gradients differs
    assert not torch.allclose(ours, wrong)


def test_speed_counts_every_micro_batch_of_a_step(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK + "\ngrad_accumulation = 3\n")
    result = mpaudit.audit(path, steps=1, arms=("fp32",), bench_seconds=0.1)
    speed = result.arms["fp32"].speed
    assert speed is not None and speed.error is None and speed.batch_size == 32 * 3


# ---------------------------------------------------------------- the custom step


def test_custom_step_trains_every_arm_with_gradscaler_and_tracing(write_task: Callable[..., Path]) -> None:
    result = mpaudit.audit(write_task(TINY_TASK + CUSTOM_STEP), steps=6, trace_every=5, bench_seconds=0.1)
    assert result.config["custom_step"] is True
    for name, arm in result.arms.items():
        assert arm.status == "ok" and arm.steps == 6, (name, arm.error)
        assert arm.trace is not None and arm.trace.steps == (0, 5)
        assert any(role.startswith("grad:") for _, role, _ in arm.trace.items())
        assert arm.speed is not None and arm.speed.error is None
    fp16 = result.arms["fp16"]
    assert fp16.loss_scale is not None and len(fp16.loss_scale.history) == 6
    assert fp16.trace is not None and fp16.trace.loss_scales[0] == 65536.0
    # gradients are read before amp.unscale_: the fp16 arm's weight gradients are still multiplied by the scale
    grad = "grad:weight"
    fp32_max = result.arms["fp32"].trace.get("0", grad).max_abs  # type: ignore[union-attr]
    assert fp16.trace.get("0", grad).max_abs > 1000 * fp32_max


def test_custom_step_equal_to_the_default_step_trains_identically(write_task: Callable[..., Path]) -> None:
    custom = write_task(TINY_TASK + DEFAULT_AS_CUSTOM, name="custom.py")
    default = write_task(TINY_TASK, name="default.py")
    for arm in ("fp32", "fp16"):
        a = mpaudit.audit(custom, steps=5, arms=(arm,), bench=False).arms[arm]
        b = mpaudit.audit(default, steps=5, arms=(arm,), bench=False).arms[arm]
        assert a.loss == b.loss and a.metrics == b.metrics, arm


def test_custom_step_that_accumulates_across_calls_leaves_the_scaler_alone_between(
    write_task: Callable[..., Path],
) -> None:
    path = write_task(TINY_TASK + '''
CALLS = [0]

def custom_step(model, batch, optimizer, amp):
    CALLS[0] += 1
    with amp.autocast():
        loss = loss_fn(model, batch) / 2
    amp.backward(loss)
    if CALLS[0] % 2 == 0:
        amp.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return loss * 2
''')
    arm = mpaudit.audit(path, steps=6, arms=("fp16",), bench=False).arms["fp16"]
    assert arm.status == "ok" and arm.steps == 6


def test_amp_handle_reports_its_precision() -> None:
    from mpaudit.run.amp import Amp

    assert Amp(ARMS["fp32"], "cpu", None).precision == "fp32"
    handle = Amp(ARMS["fp16"], "cpu", torch.amp.GradScaler("cpu"))
    assert (handle.precision, handle.dtype, handle.loss_scale) == ("fp16", torch.float16, 65536.0)
    assert Amp(ARMS["bf16"], "cpu", None).dtype == torch.bfloat16


def test_usage_error_class_for_recipe_override() -> None:
    with pytest.raises(UsageError, match="--grad-accumulation"):
        mpaudit.AuditConfig(grad_accumulation=0).validated()


def test_the_report_shows_the_recipe(write_task: Callable[..., Path]) -> None:
    from mpaudit.report import render_html, summary_markdown

    path = write_task(TINY_TASK + SCHEDULER + "\nclip_grad_norm = 2.0\ngrad_accumulation = 2\n")
    result = mpaudit.audit(path, steps=1, arms=("fp32",), bench=False, trace_every=0)
    words = "LambdaLR scheduler, clip_grad_norm 2 (after unscale_), grad_accumulation 2"
    assert words in render_html(result, plotlyjs="cdn")
    assert words.replace("_", "\\_") in summary_markdown(result)
