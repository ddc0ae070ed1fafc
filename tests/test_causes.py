"""Causes and consequences: one root per failure, consequences folded under it with no advice of their own;
noise told from harm; identical advice over many layers as one model-level flag."""

from __future__ import annotations

from factories import make_arm
from mpaudit.numerics.causes import FOLD_AT_LAYERS, group_by_cause, link, settle
from mpaudit.results.model import ArmResult, Flag, LossScale, Site


def _flag(layer: str, kind: str, severity: str = "error", rec: str = "do something", **evidence: object) -> Flag:
    return Flag(layer=layer, arm="fp16", kind=kind, severity=severity, evidence=dict(evidence),  # type: ignore[arg-type]
                recommendation=rec)


def _site(module: str, phase: str = "forward") -> Site:
    return Site(phase=phase, module=module, module_class="X", op="aten.bmm.default", source="m.py:3", code="q @ k",
                step=0, dtype="float16", detail="inf in 1 of 4 values")  # type: ignore[arg-type]


def _fp16(skipped: list[int], steps: int = 100, scale: float = 2.0**10) -> dict[str, ArmResult]:
    arm = make_arm("fp16", steps=steps)
    arm = ArmResult(**{**arm.__dict__, "loss_scale": LossScale(history=[scale] * steps, skipped_steps=skipped)})
    return {"fp16": arm}


def test_a_forward_origin_is_the_root_of_everything_else_in_its_arm() -> None:
    root = Flag(layer="attn", arm="fp16", kind="forward_overflow", severity="error", evidence={},
                recommendation="keep attn in fp32", site=_site("attn"))
    later = [_flag("attn.out", "nonfinite", rule_hint=1), _flag("(model)", "loss_scale", skip_fraction=1.0),
             _flag("fc", "gradient_underflow", "warning", recommended=13)]
    linked = link([*later[:1], root, *later[1:]], _fp16(list(range(25))))
    roots = [f for f in linked if f.caused_by is None]
    assert roots == [root]
    for f in linked:
        if f is not root:
            assert f.caused_by is not None and (f.caused_by.layer, f.caused_by.kind) == ("attn", "forward_overflow")
            assert f.recommendation == "" and f.evidence["follows_from"] == "forward_overflow at attn"
    ((cause, rest),) = group_by_cause(linked)
    assert cause is root and len(rest) == 3


def test_an_overflow_fp32_itself_predicts_elsewhere_stays_a_root() -> None:
    origin = _flag("input", "forward_overflow", first_inf_step=0)
    elsewhere = _flag("late", "forward_overflow", fp32_max_abs=1e6)
    linked = link([origin, elsewhere], _fp16([0, 1]))
    assert [f.caused_by for f in linked] == [None, None]


def test_without_a_forward_origin_skips_cause_the_gradient_flags_of_a_lowered_scale() -> None:
    skips = _flag("(model)", "loss_scale", "warning", skip_fraction=0.1)
    underflow = _flag("fc", "gradient_underflow", "error", role="grad:weight")
    activation = _flag("fc", "activation_underflow", "warning")
    linked = link([skips, underflow, activation], _fp16([0, 1, 50, 60, 70]))
    by_kind = {f.kind: f for f in linked}
    assert by_kind["gradient_underflow"].caused_by is not None  # the scale fell after overflows
    assert by_kind["activation_underflow"].caused_by is None  # forward numbers do not follow from the scale
    assert by_kind["loss_scale"].caused_by is None and by_kind["loss_scale"].severity == "error"  # as bad as its worst


def test_at_the_default_scale_gradient_underflow_is_its_own_root() -> None:
    skips = _flag("(model)", "loss_scale", "warning", skip_fraction=0.1)
    underflow = _flag("fc", "gradient_underflow", "error", role="grad:weight")
    linked = link([skips, underflow], _fp16([0, 1, 50], scale=2.0**16))
    assert all(f.caused_by is None for f in linked)


def test_precision_loss_on_a_matching_arm_is_information_and_advice_is_folded() -> None:
    flags = [_flag(f"layer{i}", "gradient_underflow", "warning", rec="raise init_scale to 2^20") for i in range(5)]
    flags.append(_flag("head", "precision_loss", "warning", rec="keep `head` in fp32"))
    settled = settle(flags, matching={"fp16"}, layer_order={"fp16": ["layer0", "head"]}, arm_order=["fp16"])
    folded = [f for f in settled if f.kind == "gradient_underflow"]
    assert len(folded) == 1 and folded[0].layer == "(model)" and folded[0].evidence["count"] == 5 >= FOLD_AT_LAYERS
    assert folded[0].evidence["layers"] == [f"layer{i}" for i in range(5)]
    assert next(f for f in settled if f.kind == "precision_loss").severity == "info"
    assert settle(flags[-1:], matching=set(), layer_order={}, arm_order=["fp16"])[0].severity == "warning"


def test_lost_updates_are_their_own_root_and_a_warning_on_an_arm_that_matches_fp32() -> None:
    lost = [Flag(layer=f"fc{i}", arm="bf16-pure", kind="update_underflow", severity="error",
                 evidence={"measured_lost_fraction": 0.9}, recommendation=f"`fc{i}` loses 9{i}% of its updates")
            for i in range(3)]
    linked = link(lost, {"bf16-pure": make_arm("bf16-pure")})
    assert all(f.caused_by is None and f.severity == "error" for f in linked)
    order = {"bf16-pure": ["fc0", "fc1", "fc2"]}
    failing = settle(linked, matching=set(), layer_order=order, arm_order=["bf16-pure"])
    assert [(f.layer, f.severity) for f in failing] == [("fc0", "error"), ("fc1", "error"), ("fc2", "error")]
    matching = settle(linked, matching={"bf16-pure"}, layer_order=order, arm_order=["bf16-pure"])
    assert {f.severity for f in matching} == {"warning"}


def test_flags_sort_by_severity_roots_first_then_forward_order() -> None:
    flags = [_flag("b", "gradient_underflow", "warning"), _flag("a", "nonfinite", "error"),
             _flag("container", "forward_overflow", "error", ), _flag("b", "precision_loss", "info")]
    settled = settle(flags, matching=set(), layer_order={"fp16": ["a", "container.inner", "b"]}, arm_order=["fp16"])
    assert [(f.severity, f.layer) for f in settled] == [("error", "a"), ("error", "container"), ("warning", "b"),
                                                        ("info", "b")]
