"""``mpaudit.watch``: a user's own loop observed, one arm named by its precision, the same report written."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import mpaudit
from conftest import Scale
from mpaudit.ci.compare import compare
from mpaudit.ci.gate import evaluate_gate
from mpaudit.cli import EXIT_USAGE, app
from mpaudit.errors import UsageError
from mpaudit.run.task import load_task

runner = CliRunner()


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _model(overflow: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if overflow:
        return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 32), amp=Scale(1e6), fc2=nn.Linear(32, 32),
                                         down=Scale(1e-6), act=nn.ReLU(), head=nn.Linear(32, 3)))
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, precision: str = "fp32",
          scaler: torch.amp.GradScaler | None = None, log: Callable[[torch.Tensor], None] | None = None,
          clip: float | None = None, accumulate: int = 1, batch: int = 32) -> None:
    """A plain PyTorch loop, as a user writes it."""
    x, y = _data()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for step in range(steps):
        for micro in range(accumulate):
            i = (step * accumulate + micro) * batch % len(x)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            (scaler.scale(loss / accumulate) if scaler else loss / accumulate).backward()
        if scaler is not None:
            if clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None:
            log(loss)


def test_watch_writes_the_report_of_one_observed_arm(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with mpaudit.watch(model, opt, out=tmp_path / "run", trace_every=5) as w:
        train(model, opt, 12, log=w.log)
    result = w.result
    assert result is not None and result.observed
    assert list(result.arms) == ["fp32"]
    arm = result.arms["fp32"]
    assert (arm.status, arm.steps, len(arm.loss), arm.observed) == ("ok", 12, 12, True)
    assert arm.trace is not None and arm.trace.steps == (0, 5, 10)
    assert arm.loss_scale is None and arm.train_step_s is not None
    assert result.config["observed"] is True and result.gate.given is False
    for name in ("report.json", "report.html", "summary.md", "layers.csv"):
        assert (tmp_path / "run" / name).is_file(), name
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["arms"]["fp32"]["observed"] is True
    jsonschema.validate(data, mpaudit.AuditResult.json_schema())
    assert mpaudit.AuditResult.from_json(result.to_json()).observed
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Observed run, not a matched comparison" in html
    assert "observed run" in (tmp_path / "run" / "summary.md").read_text().lower()
    # every hook is gone
    assert not model._forward_pre_hooks and not model[0]._forward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_watch_names_the_arm_by_the_autocast_it_saw() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with mpaudit.watch(model, opt, out=None, trace_every=0) as w:
        train(model, opt, 3, precision="bf16")
    assert w.result is not None and list(w.result.arms) == ["bf16"]
    assert w.result.arms["bf16"].autocast_policy == "cpu"


def test_watched_fp32_statistics_equal_those_of_mpaudit_run(tiny_task: Path) -> None:
    """The same weights, batch and optimizer step: the watched step's trace is mpaudit's traced step."""
    audited = mpaudit.audit(tiny_task, steps=1, arms=("fp32",), bench=False, trace_every=1).arms["fp32"].trace
    task = load_task(tiny_task)
    torch.manual_seed(0)
    model = task.module.build_model()
    opt = task.module.build_optimizer(model)
    x, y = task.module.train_loader()[0]
    with mpaudit.watch(model, opt, out=None, trace_every=1) as w:
        loss = task.module.loss_fn(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    watched = w.result.arms["fp32"].trace  # type: ignore[union-attr]
    assert audited is not None and watched is not None
    assert set(audited.stats) == set(watched.stats)
    for key, stats in audited.stats.items():
        assert watched.stats[key] == stats, key


def test_fp16_gradients_are_read_scaled_before_the_loop_unscales_and_clips(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    with mpaudit.watch(model, opt, scaler=scaler, out=None, trace_every=1) as w:
        train(model, opt, 4, "fp16", scaler=scaler, log=w.log, clip=0.01)
    arm = w.result.arms["fp16"]  # type: ignore[union-attr]
    assert arm.loss_scale is not None and arm.loss_scale.history == [65536.0] * 4
    assert arm.trace is not None and arm.trace.loss_scales == (65536.0,) * 4
    # the same loop watched in fp32 (clipping to 0.01 would shrink the gradients if read after it)
    model32 = _model()
    opt32 = torch.optim.AdamW(model32.parameters(), lr=1e-2)
    with mpaudit.watch(model32, opt32, out=None, trace_every=1) as w32:
        train(model32, opt32, 1)
    fp16_first = arm.trace.get("0", "grad:weight")
    fp32_first = w32.result.arms["fp32"].trace.get("0", "grad:weight")  # type: ignore[union-attr]
    assert fp16_first is not None and fp32_first is not None
    assert fp16_first.max_abs > 2**14 * fp32_first.max_abs  # multiplied by the loss scale, not clipped
    assert not {"unscale_", "step", "update"} & set(vars(scaler))  # the scaler's own methods are back


def test_one_step_of_accumulated_micro_batches_is_one_watched_step() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mpaudit.watch(model, opt, out=None, trace_every=1) as w:
        train(model, opt, 3, accumulate=4, batch=8, log=w.log)
    arm = w.result.arms["fp32"]  # type: ignore[union-attr]
    assert arm.steps == 3 and len(arm.loss) == 3
    assert arm.trace is not None and arm.trace.get("0", "activation").count == 3 * 4 * 8 * 32  # type: ignore[union-attr]


def test_fp16_overflow_is_localised_in_the_watched_loop_and_the_run_called_diverged(tmp_path: Path) -> None:
    model = _model(overflow=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    with mpaudit.watch(model, opt, scaler=scaler, out=tmp_path / "ovf", trace_every=5) as w:
        train(model, opt, 30, "fp16", scaler=scaler, log=w.log, batch=8)
    result = w.result
    assert result is not None
    arm = result.arms["fp16"]
    assert arm.status == "diverged" and arm.loss_scale is not None and arm.loss_scale.skipped == 30
    forward = [s for s in arm.sites if s.phase == "forward"]
    assert forward and forward[0].module == "amp" and forward[0].op == "aten.mul.Tensor"
    roots = [f for f in result.flags if f.caused_by is None and f.severity == "error"]
    assert roots[0].kind == "forward_overflow" and roots[0].layer == "amp"
    from mpaudit.ci.verdict import verdicts

    assert verdicts(result)["fp16"].level == "not safe"


def test_a_loop_that_raises_still_writes_its_report(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = []

    def log(loss: torch.Tensor) -> None:
        w.log(loss)
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("out of data")

    with pytest.raises(RuntimeError, match="out of data"), mpaudit.watch(model, opt, out=tmp_path / "r") as w:
        train(model, opt, 10, log=log)
    saved = mpaudit.AuditResult.from_json((tmp_path / "r" / "report.json").read_text())
    arm = saved.arms["fp32"]
    assert arm.status == "failed" and "out of data" in (arm.error or "")
    assert arm.steps == 3 and any("raised" in n for n in arm.notes)


def test_observed_results_cannot_be_gated_or_compared(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with mpaudit.watch(model, opt, out=tmp_path / "w", trace_every=0) as w:
        train(model, opt, 2, log=w.log)
    saved = tmp_path / "w" / "report.json"
    gated = runner.invoke(app, ["gate", str(saved), "--max-drop", "final_loss=0.1"])
    assert gated.exit_code == EXIT_USAGE and "observed run" in gated.output
    with pytest.raises(UsageError, match="observed run"):
        evaluate_gate(w.result.arms, {"accuracy": 0.1}, None)  # type: ignore[union-attr]
    compared = runner.invoke(app, ["compare", str(saved), str(saved)])
    assert compared.exit_code == 2 and "observed run" in compared.output
    assert not compare(w.result, w.result).comparable  # type: ignore[arg-type]


def test_watch_checks_what_it_is_given() -> None:
    model = _model()
    with pytest.raises(UsageError, match=r"torch\.optim\.Optimizer"):
        mpaudit.watch(model, object())
    with pytest.raises(UsageError, match="GradScaler"):
        mpaudit.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler=object())
    with pytest.raises(UsageError, match="precision must be"):
        mpaudit.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp8")


def test_a_backward_overflow_is_localised_on_the_next_skipped_step() -> None:
    """Inputs grow 30x at step 5: GradScaler skips steps whose weight gradients overflow fp16; the watch checks the
    next step op by op and finds the backward matmul of the last Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(1)
    with mpaudit.watch(model, opt, scaler=scaler, out=None, trace_every=50) as w:
        for i in range(10):
            x = torch.randn(32, 64, generator=g) * (1.0 if i < 5 else 30.0)
            y = torch.randint(0, 3, (32,), generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            w.log(loss)
    arm = w.result.arms["fp16"]  # type: ignore[union-attr]
    assert arm.loss_scale is not None and 5 in arm.loss_scale.skipped_steps
    (site,) = arm.sites
    assert (site.phase, site.module, site.step) == ("backward", "2", 6)
    assert "Backward" in site.op and "test_watch.py" in site.source and "model(x)" in site.code
    roots = [f for f in w.result.flags if f.caused_by is None]  # type: ignore[union-attr]
    assert roots[0].kind == "gradient_overflow" and roots[0].layer == "2"
