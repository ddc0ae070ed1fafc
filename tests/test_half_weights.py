"""The ``bf16-pure`` arm and its fixes: weights, gradients and optimizer state in bf16; the update roundings of
``mpaudit.bf16_optimizer`` (stochastic, Kahan, fp32 master); the audit's must-holds on a low-learning-rate model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mpaudit
from mpaudit.arms import ARMS, DEFAULT_ARMS, half_format_of, parse_arms, stores_half_weights
from mpaudit.ci.recommend import half_is_fp16, ungated_ok
from mpaudit.ci.verdict import verdict
from mpaudit.errors import UsageError
from mpaudit.numerics.formats import BF16
from mpaudit.numerics.rules import half_format
from mpaudit.report.html import render_html
from mpaudit.report.markdown import summary_markdown
from mpaudit.results.model import AuditResult
from mpaudit.run.half_weights import Bf16Updates, bf16_optimizer, stochastic_round_bf16
from mpaudit.run.prepare import RunContext, prepare_arm
from mpaudit.run.seeding import fingerprint_model
from mpaudit.run.task import load_task
from mpaudit.run.train import TrainSpec, train_arm
from mpaudit.vocab import SAFE

# ---------------------------------------------------------------------------------------------- the arm as data


def test_bf16_pure_is_an_arm_by_name_but_not_a_default() -> None:
    pure = ARMS["bf16-pure"]
    assert "bf16-pure" not in DEFAULT_ARMS and [a.name for a in parse_arms("fp32,bf16,bf16-pure")][-1] == "bf16-pure"
    assert pure.weights_dtype == "bfloat16" and pure.autocast_dtype is None and not pure.grad_scaler
    assert not pure.is_baseline and ARMS["fp32"].is_baseline
    assert pure.half_format == "bf16" and pure.half_weights and pure.rounds_updates_to_nearest
    assert not ARMS["bf16"].half_weights and not ARMS["bf16"].rounds_updates_to_nearest


def test_variants_are_named_after_their_change_and_go_the_bf16_way_by_name() -> None:
    pure = ARMS["bf16-pure"]
    sr = pure.with_changes(update_rounding="stochastic")
    kahan = pure.with_changes(update_rounding="kahan")
    master = pure.with_changes(fp32_master=["0", "2"])
    assert (sr.name, kahan.name, master.name) == ("bf16-pure+sr", "bf16-pure+kahan", "bf16-pure+master")
    assert master.fp32_master == ("0", "2") and "fp32 master weights for 0, 2" in master.description
    for arm in (sr, kahan, master):
        assert not arm.rounds_updates_to_nearest and arm.half_weights and not arm.is_baseline
        assert half_format_of(arm.name) == "bf16" and half_format(arm.name) is BF16
        assert not half_is_fp16(arm.name) and stores_half_weights(arm.name)
    assert half_format_of("bf16-pure") == "bf16" and not stores_half_weights("bf16+keep")
    with pytest.raises(UsageError, match="master weights already"):
        ARMS["bf16"].with_changes(update_rounding="stochastic")
    with pytest.raises(UsageError, match="Unknown update rounding"):
        pure.with_changes(update_rounding="nearest")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the roundings


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    ulp = 2.0**-7  # of a bf16 value in [1, 2)
    x = torch.full((200_000,), 1.0 + 0.3 * ulp)
    g = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16(x, g)
    assert r.dtype == torch.bfloat16
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + ulp}
    assert r.double().mean().item() == pytest.approx(1.0 + 0.3 * ulp, abs=4 * ulp * (0.21 / 200_000) ** 0.5)
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round_bf16(exact, g).float(), exact)  # representable values are kept
    assert stochastic_round_bf16(torch.tensor([float("nan")]), g).isnan().all()
    # a value just below a binade edge rounds up across it, as often as it should
    edge = torch.full((100_000,), 2.0 - 0.25 * 2.0**-8)
    assert stochastic_round_bf16(edge, g).float().mean().item() == pytest.approx(edge[0].item(), abs=2e-4)


STEPS, LR = 100, 1e-3
"""SGD steps of 1e-3 on weights at 1.0: an eighth of an ulp (2^-7), a quarter of what rounds to nearest up."""


def _bf16_sgd(rounding: str | None = None, master: bool = False, n: int = 4096) -> tuple[nn.Linear, torch.optim.SGD]:
    """Weights of 1.0 in bf16, a loss whose gradient is -1 for every weight: SGD adds LR to each, every step."""
    layer = nn.Linear(n, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    model = nn.Sequential(layer)
    optimizer = bf16_optimizer(model, lambda m: torch.optim.SGD(m.parameters(), lr=LR), rounding=rounding,
                               fp32_master=["0"] if master else ())
    for _ in range(STEPS):
        (-layer.weight.float().sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert layer.weight.dtype == torch.bfloat16  # between steps the model is bf16, as it trained
    return layer, optimizer  # type: ignore[return-value]


def test_round_to_nearest_loses_the_small_updates() -> None:
    layer = nn.Linear(8, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=LR)
    for _ in range(STEPS):
        (-layer.weight.float().sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.all(layer.weight == 1.0)  # 100 steps of +1e-3 and nothing moved


def test_stochastic_rounding_keeps_small_updates_in_expectation() -> None:
    layer, _ = _bf16_sgd("stochastic")
    mean = layer.weight.double().mean().item()
    assert mean == pytest.approx(1.0 + STEPS * LR, abs=2e-3)
    assert layer.weight.float().unique().numel() > 1  # each weight is a random walk with the right drift


def test_kahan_compensation_recovers_small_updates() -> None:
    layer, optimizer = _bf16_sgd("kahan")
    ulp = 2.0**-7
    assert torch.all((layer.weight.float() - (1.0 + STEPS * LR)).abs() <= ulp / 2)  # rounded to nearest of the sum
    (hooks,) = [h for h in _hooks(optimizer)]
    (entry,) = hooks.entries
    assert entry.mode == "kahan" and entry.compensation is not None and entry.compensation.dtype == torch.bfloat16
    total = layer.weight.double() + entry.compensation.double()  # w + c: the sum of the updates, to bf16's c
    assert torch.allclose(total, torch.full_like(total, 1.0 + STEPS * LR), atol=ulp / 16)


def test_an_fp32_master_copy_follows_fp32_training_exactly() -> None:
    layer, optimizer = _bf16_sgd(master=True, n=16)
    (hooks,) = _hooks(optimizer)
    (entry,) = hooks.entries
    reference = torch.ones(16)
    for _ in range(STEPS):
        reference += LR  # what SGD computes in fp32
    assert entry.mode == "master" and entry.master is not None and entry.master.dtype == torch.float32
    assert torch.equal(entry.master.view(-1), reference)
    assert torch.equal(layer.weight.detach().view(-1), reference.to(torch.bfloat16))  # the master rounded to nearest


def _hooks(optimizer: torch.optim.Optimizer) -> list[Bf16Updates]:
    """The Bf16Updates whose hooks sit on ``optimizer`` (found through its bound pre-hook)."""
    return [h.__self__ for h in optimizer._optimizer_step_pre_hooks.values()  # type: ignore[attr-defined]
            if isinstance(getattr(h, "__self__", None), Bf16Updates)]


def _adamw_model(rounding: str | None, master: tuple[str, ...] = ()) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)
    optimizer = bf16_optimizer(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), rounding=rounding,
                               fp32_master=master)
    for _ in range(3):
        model(torch.randn(5, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters()]
        optimizer.step()
        assert [p.grad for p in model.parameters()] == grads  # the bf16 gradients are back in place
        assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_optimizer_state_stays_bf16_with_rounding_and_is_fp32_under_a_master_copy() -> None:
    model, optimizer = _adamw_model("stochastic", master=("2",))
    first, head = model[0].weight, model[2].weight
    assert {k: v.dtype for k, v in optimizer.state[first].items() if k != "step"} == {
        "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
    assert {k: v.dtype for k, v in optimizer.state[head].items() if k != "step"} == {
        "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    (hooks,) = _hooks(optimizer)
    assert sorted(hooks.modes.values()) == ["master", "master", "stochastic", "stochastic"]
    hooks.remove()
    assert _hooks(optimizer) == []


def test_bf16_optimizer_refuses_what_it_cannot_help() -> None:
    fp32 = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(UsageError, match="cast the model to bf16"):
        bf16_optimizer(fp32, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), rounding="kahan")
    bf16 = nn.Sequential(nn.Linear(4, 2)).to(torch.bfloat16)
    with pytest.raises(UsageError, match="no module 'nope'"):
        bf16_optimizer(bf16, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), fp32_master=["nope"])
    with pytest.raises(UsageError, match="Unknown update rounding"):
        bf16_optimizer(bf16, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), rounding="up")
    built = torch.optim.SGD(bf16.parameters(), lr=0.1)  # an optimizer already built is taken as it is
    assert bf16_optimizer(bf16, built, rounding="stochastic") is built
    assert mpaudit.bf16_optimizer is bf16_optimizer


# ---------------------------------------------------------------------------------------------- the arm's set-up


def test_prepare_casts_after_the_fingerprint_and_evaluates_in_fp32(tiny_task: Path) -> None:
    run = RunContext(task=load_task(tiny_task), device=torch.device("cpu"))
    fp32 = prepare_arm(run, ARMS["fp32"], 0)
    pure = prepare_arm(run, ARMS["bf16-pure"], 0)
    assert pure.weights_fingerprint == fp32.weights_fingerprint == fingerprint_model(fp32.model)
    assert all(p.dtype == torch.bfloat16 for p in pure.model.parameters()) and pure.updates is None
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    cx, cy = pure.cast_batch((x, y))
    assert cx.dtype == torch.bfloat16 and cy.dtype == torch.long and fp32.cast_batch((x, y))[0] is x
    with pure.context():
        loss = pure.step((x, y))  # an fp32 batch, as the loader yields it
    assert torch.isfinite(loss)
    assert pure.model(x.float()).dtype == torch.bfloat16  # what loss_fn hands the model is cast too
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in pure.optimizer.state.values())
    weights = [p.detach().clone() for p in pure.model.parameters()]
    pure.for_evaluation()
    assert all(p.dtype == torch.float32 for p in pure.model.parameters())
    assert pure.model(x).dtype == torch.float32  # evaluated in fp32, like every arm
    assert all(torch.equal(p, w.float()) for p, w in zip(pure.model.parameters(), weights, strict=True))
    sr = prepare_arm(run, ARMS["bf16-pure"].with_changes(update_rounding="stochastic"), 0)
    assert sr.updates is not None and set(sr.updates.modes.values()) == {"stochastic"}


def test_every_fix_trains_as_an_arm_and_records_its_recipe(tiny_task: Path) -> None:
    run = RunContext(task=load_task(tiny_task), device=torch.device("cpu"))
    spec = TrainSpec(seed=0, steps=4, epochs=None, trace_every=1)
    pure = ARMS["bf16-pure"]
    for arm in (pure, pure.with_changes(update_rounding="kahan"), pure.with_changes(fp32_master=["0"])):
        result = train_arm(run, arm, spec).result
        assert result.status == "ok", result.error
        assert result.weights_dtype == "bfloat16" and result.fp32_master == list(arm.fp32_master)
        assert result.update_rounding == arm.update_rounding and result.metrics["accuracy"] > 0
        assert result.trace is not None and result.trace.get("0", "update:weight") is not None
        assert "bfloat16" in (result.trace.get("0", "activation") or result.trace.get("0", "grad:weight")).dtype


# ---------------------------------------------------------------------------------------------- the audit

LOW_LR_TASK = """
import torch
from torch import nn
from sklearn.datasets import load_digits

def _data(train):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    x, y = (x[:1400], y[:1400]) if train else (x[1400:], y[1400:])
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g) if train else torch.arange(len(x))
    return [(x[order[i:i + 64]], y[order[i:i + 64]]) for i in range(0, len(x) - 63, 64)]

def build_model():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.1)
    return model

def build_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR)

def train_loader():
    return _data(True)

def eval_loader():
    return _data(False)

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)

def evaluate(model, loader):
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return {"accuracy": correct / total}
"""
"""An MLP on digits with weights of order 0.1, fine-tuned by AdamW at a low learning rate (LR)."""


@pytest.fixture(scope="module")
def low_lr_result(tmp_path_factory: pytest.TempPathFactory) -> AuditResult:
    path = tmp_path_factory.mktemp("lowlr") / "low_lr.py"
    path.write_text(textwrap.dedent(LOW_LR_TASK).replace("lr=LR", "lr=2e-5"))
    return mpaudit.audit(path, arms=("fp32", "bf16", "bf16-pure"), steps=400, bench=False, verify=True)


def test_bf16_pure_stalls_where_bf16_with_master_weights_does_not(low_lr_result: AuditResult) -> None:
    r = low_lr_result
    fp32, bf16, pure = (r.arms[n] for n in ("fp32", "bf16", "bf16-pure"))
    assert pure.weights_dtype == "bfloat16" and bf16.weights_dtype is None
    assert pure.fingerprints == fp32.fingerprints  # the same initial weights and batches
    assert verdict(r, "bf16").level == SAFE
    assert not ungated_ok(pure, fp32) and verdict(r, "bf16-pure").level != SAFE
    assert pure.metrics["accuracy"] < fp32.metrics["accuracy"] - 0.1


def test_update_underflow_errors_name_the_linear_layers_of_bf16_pure_only(low_lr_result: AuditResult) -> None:
    r = low_lr_result
    under = [f for f in r.flags if f.kind == "update_underflow"]
    assert {f.arm for f in under} == {"bf16-pure"}  # never on an arm with fp32 master weights
    errors = [f for f in under if f.severity == "error"]
    assert {f.layer for f in errors} == {"0", "2", "4"}  # the Linear layers
    for f in errors:
        assert f.caused_by is None and f.evidence["measured_lost_fraction"] > 0.8
        assert f.evidence["predicted_lost_fraction"] == pytest.approx(f.evidence["measured_lost_fraction"], abs=0.1)


def test_a_verified_fix_brings_bf16_pure_back_to_fp32(low_lr_result: AuditResult) -> None:
    r = low_lr_result
    recs = [rec for rec in r.recommendations if rec.arm == "bf16-pure"]
    assert recs[0].update_rounding == "stochastic"  # the cheapest fix is tried first
    fix = next(rec for rec in recs if rec.passed)
    after = r.verification[fix.verified_arm or ""]
    assert after.weights_dtype == "bfloat16" and after.fingerprints == r.arms["fp32"].fingerprints
    assert abs(fix.metrics["accuracy"] - r.arms["fp32"].metrics["accuracy"]) <= 0.03
    assert "mpaudit.bf16_optimizer(model, build_optimizer, rounding=" in render_html(r, plotlyjs="cdn")
    assert "bf16 updates" in summary_markdown(r)
    back = AuditResult.from_json(r.to_json())
    assert back.recommendations == r.recommendations and back.to_json() == r.to_json()


def test_the_report_explains_the_recipe_and_shows_measured_beside_predicted(low_lr_result: AuditResult) -> None:
    html = render_html(low_lr_result, plotlyjs="cdn")
    assert "bf16-pure: weights, gradients and optimizer state in bf16." in html
    assert 'id="lost-updates"' in html and "predicted from fp32" in html
    frame = low_lr_result.layers()
    rows = frame[(frame.arm == "bf16-pure") & frame.role.str.startswith("update:")]
    assert (rows.zero_fraction > 0.8).all()  # layers.csv: the measured share of unchanged bf16 weights
    fp32_rows = frame[(frame.arm == "fp32") & frame.role.str.startswith("update:")]
    assert (fp32_rows.bf16_update_lost > 0.8).all()  # beside fp32's prediction
