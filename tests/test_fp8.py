"""The float8 arms (torchao): the usage error without torchao, ``mxfp8`` skipped where no MX training path runs, the
conversion after the fingerprint, the cast statistics against a direct computation, the flags, the
``exclude_from_fp8`` search verified by training, and the plans ready to paste."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mpaudit
from conftest import TINY_TASK
from factories import make_arm, make_result
from mpaudit.arms import ARMS, FP8_ARMS, fp8_recipe_of, parse_arms
from mpaudit.ci.gate import evaluate_gate
from mpaudit.ci.verdict import verdict
from mpaudit.errors import UsageError
from mpaudit.report.html import render_html
from mpaudit.report.markdown import summary_markdown
from mpaudit.report.snippets import fp8_filter_snippets, snippet
from mpaudit.report.terminal import summary_lines
from mpaudit.results.model import AuditResult, Recommendation
from mpaudit.run.fp8 import MX_SKIP_REASON, check_exclusions, linear_paths, torchao_available
from mpaudit.run.prepare import RunContext, prepare_arm
from mpaudit.run.seeding import fingerprint_model
from mpaudit.run.task import load_task
from mpaudit.run.train import TrainSpec, train_arm
from mpaudit.vocab import ERROR, FAILED, SAFE_WITH_CHANGES, SKIPPED, SKIPPED_LEVEL

needs_torchao = pytest.mark.skipif(not torchao_available(),
                                   reason="the float8 arms need torchao: pip install 'mpaudit[fp8]'")

OUTLIER_TASK = TINY_TASK.replace(
    "def build_model():\n    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
    "def build_model():\n    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))",
).replace("def train_loader():\n    return _data(1)", '''def train_loader():
    g = torch.Generator().manual_seed(3)
    batches = _data(1)
    for x, y in batches:  # one row in eight is a corrupt record: every feature 1e6 to 3e6, a random label
        size = x[3::8].shape
        x[3::8] = 2e6 * (0.5 + torch.rand(size, generator=g)) * torch.sign(torch.randn(size, generator=g))
        y[3::8] = torch.randint(0, 3, y[3::8].shape, generator=g)
    return batches''')
"""A tabular classifier whose LayerNorm after the input layer makes fp32 and bf16 immune to corrupt rows of ~1e6:
under tensorwise float8 they set the input layer's scale, and every clean input flushes to zero."""

# ---------------------------------------------------------------------------------------------- the arms as data


def test_the_float8_arms_are_asked_for_by_name_and_a_filter_is_their_variant() -> None:
    assert FP8_ARMS == ("fp8", "fp8-rowwise", "mxfp8")
    assert [a.fp8 for a in parse_arms("fp8,fp8-rowwise,mxfp8")] == ["tensorwise", "rowwise", "mxfp8"]
    filtered = ARMS["fp8"].with_changes(exclude_from_fp8=["encoder.0"])
    assert filtered.name == "fp8+filter" and filtered.exclude_from_fp8 == ("encoder.0",)
    assert "keeps encoder.0 out of float8" in filtered.description and fp8_recipe_of("fp8+filter") == "tensorwise"
    with pytest.raises(UsageError, match="no float8 layers to exclude"):
        ARMS["bf16"].with_changes(exclude_from_fp8=["0"])


def test_asking_for_a_float8_arm_without_torchao_is_a_one_sentence_usage_error(tiny_task: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torchao"] = None  # as if torchao were not installed
        sys.argv = ["mpaudit", "run", {str(tiny_task)!r}, "--arms", "fp32,fp8", "--steps", "2", "--no-bench",
                    "--out", {str(tiny_task.parent / "out")!r}]
        from mpaudit.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'fp8'" in lines[0] and "pip install 'mpaudit[fp8]'" in lines[0]
    assert not (tiny_task.parent / "out" / "report.json").exists()  # refused before any arm trained


# ---------------------------------------------------------------------------------------------- conversion


@needs_torchao
def test_the_conversion_comes_after_the_fingerprint_and_evaluation_is_fp32(tiny_task: Path) -> None:
    run = RunContext(task=load_task(tiny_task), device=torch.device("cpu"))
    fp32 = prepare_arm(run, ARMS["fp32"], 0)
    fp8 = prepare_arm(run, ARMS["fp8"], 0)
    assert fp8.weights_fingerprint == fp32.weights_fingerprint == fingerprint_model(fp32.model)
    assert fp8.fp8 is not None and fp8.fp8.converted == ["0", "2"] and fp8.fp8.excluded == []
    assert [type(m).__name__ for m in fp8.model] == ["Float8Linear", "ReLU", "Float8Linear"]
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    with fp8.context():
        assert torch.isfinite(fp8.step((x, y)))
    assert all(p.dtype == torch.float32 for p in fp8.model.parameters())  # fp32 master weights
    weights = [p.detach().clone() for p in fp8.model.parameters()]
    fp8.for_evaluation()
    assert all(torch.equal(p, w) for p, w in zip(fp8.model.parameters(), weights, strict=True))
    plain = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    plain.load_state_dict(fp8.model.state_dict())
    assert torch.equal(fp8.model(x), plain(x))  # the trained weights in fp32, no float8 cast left
    kept = prepare_arm(run, ARMS["fp8"].with_changes(exclude_from_fp8=["0"]), 0)
    assert kept.fp8 is not None and kept.fp8.converted == ["2"] and kept.fp8.excluded == ["0"]
    assert type(kept.model[0]) is nn.Linear and kept.weights_fingerprint == fp32.weights_fingerprint


@needs_torchao
@pytest.mark.parametrize("path", ["encoder", "1"])  # no such module; a module that is not a Linear layer (ReLU)
def test_a_filter_that_matches_no_linear_layer_is_an_error_not_a_no_op(tiny_task: Path, path: str) -> None:
    run = RunContext(task=load_task(tiny_task), device=torch.device("cpu"))
    arm = ARMS["fp8"].with_changes(exclude_from_fp8=[path])
    with pytest.raises(UsageError, match=f"excludes {path!r}, which names no Linear layer"):
        prepare_arm(run, arm, 0)
    result = train_arm(run, arm, TrainSpec(seed=0, steps=2, epochs=None, trace_every=0)).result
    assert result.status == FAILED and "names no Linear layer" in (result.error or "")
    check_exclusions(nn.Sequential(nn.Linear(2, 2)), ["0"])  # a real Linear layer passes


ATTENTION_TASK = TINY_TASK.replace(
    "def build_model():\n    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
    """class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        tokens = self.embed(x).view(-1, 4, 8)
        return self.head(self.attn(tokens, tokens, tokens)[0].flatten(1))

def build_model():
    return Net()""")
"""A model with ``nn.MultiheadAttention``, which multiplies by ``out_proj.weight`` itself, never calling it."""


@needs_torchao
def test_a_converted_layer_that_never_runs_is_not_reported_as_float8(tmp_path: Path) -> None:
    task = tmp_path / "model.py"
    task.write_text(ATTENTION_TASK)
    run = RunContext(task=load_task(task), device=torch.device("cpu"))
    result = train_arm(run, ARMS["fp8"], TrainSpec(seed=0, steps=2, epochs=None, trace_every=0)).result
    assert result.status == "ok"
    assert result.fp8_layers == ["embed", "head"]  # torchao converted attn.out_proj too; nothing ever called it
    [note] = result.notes
    assert "never called as a module" in note and note.endswith(": attn.out_proj.")
    audit = make_result(make_arm("fp32"), result)
    assert f"note: fp8: {note}" in summary_lines(audit)
    assert r"never called as a module in training" in summary_markdown(audit)
    assert "never called as a module in training" in render_html(audit)


# ---------------------------------------------------------------------------------------------- cast statistics


def _direct(x: torch.Tensor, dtype: torch.dtype, dim: int | None, pow2: bool) -> dict[str, float]:
    """What casting ``x`` to ``dtype`` with a dynamic scale per tensor (``dim`` None) or per slice reduced along
    ``dim`` does, computed from the definition: scale = max / amax (rounded down to a power of two for rowwise)."""
    x = x.double()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (torch.finfo(dtype).max / amax).float().double()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    top = torch.finfo(dtype).max
    q = (x * scale).float().clamp(-top, top).to(dtype).double()
    nonzero = x != 0
    return {"nonzero": int(nonzero.sum()), "flushed": int((nonzero & (q == 0)).sum()), "amax": float(x.abs().max())}


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cast_statistics_match_a_direct_computation(recipe: str) -> None:
    from mpaudit.trace.fp8_probe import Fp8Probe

    g = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(64, 16, generator=g)
    x[5] = 1e5  # one outlier row sets the scale of the whole tensor (tensorwise) and of every column (rowwise)
    upstream = torch.randn(64, 8, generator=g)
    upstream[7] *= 1e4  # the output gradient, exactly: d(sum(y * upstream)) / dy
    probe = Fp8Probe(layer, ["0"], [recipe])
    with probe:
        probe.start_step(0)
        (layer(x) * upstream).sum().backward()
        trace = probe.finish_step()
    assert trace is not None and trace.steps == (0,) and trace.layers == ("0",)
    w = layer[0].weight.detach()
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    rowwise = recipe == "rowwise"
    grad_format = e4m3 if rowwise else e5m2

    def per(dim: int) -> int | None:  # scales reduced along ``dim`` (rowwise) or one for the whole tensor
        return dim if rowwise else None

    expected = {  # each GEMM's operands, scaled along the GEMM's contraction dimension
        ("forward", "input"): _direct(x, e4m3, per(-1), rowwise),
        ("forward", "weight"): _direct(w, e4m3, per(-1), rowwise),
        ("grad_input", "grad_output"): _direct(upstream, grad_format, per(-1), rowwise),
        ("grad_input", "weight"): _direct(w, e4m3, per(0), rowwise),
        ("grad_weight", "grad_output"): _direct(upstream, grad_format, per(0), rowwise),
        ("grad_weight", "input"): _direct(x, e4m3, per(0), rowwise),
    }
    for (gemm, operand), want in expected.items():
        got = trace.get("0", recipe, gemm, operand)
        assert got is not None, (gemm, operand)
        assert (got.nonzero, got.flushed) == (want["nonzero"], want["flushed"]), (gemm, operand)
        assert got.amax == pytest.approx(want["amax"]) and got.saturated == 0
        assert got.format == ("e5m2" if grad_format == e5m2 and operand == "grad_output" else "e4m3")
        assert int(got.hist.sum()) == got.nonzero  # every nonzero value lands in one binade bin
    forward = trace.gemm_loss("0", recipe, "forward")
    assert forward is not None and forward.flush == max(s.flush_fraction for s in forward.operands.values())
    outlier_flushes = expected[("grad_weight", "input")]["flushed"]
    assert outlier_flushes > 100  # the outlier row sets every column's scale: the clean rows flush
    if rowwise:
        assert expected[("forward", "input")]["flushed"] < outlier_flushes / 10  # each row its own scale


# ---------------------------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def outlier_result(tmp_path_factory: pytest.TempPathFactory) -> AuditResult:
    if not torchao_available():
        pytest.skip("the float8 arms need torchao: pip install 'mpaudit[fp8]'")
    path = tmp_path_factory.mktemp("fp8") / "outliers.py"
    path.write_text(textwrap.dedent(OUTLIER_TASK))
    return mpaudit.audit(path, arms=("fp32", "bf16", "fp8"), steps=16, trace_every=8, bench=False, verify=True)


def test_fp8_flushes_the_input_layer_where_fp32_and_bf16_do_not_notice(outlier_result: AuditResult) -> None:
    r = outlier_result
    fp32, bf16, fp8 = (r.arms[n] for n in ("fp32", "bf16", "fp8"))
    assert fp8.fingerprints == fp32.fingerprints  # the same initial weights, fingerprinted before the conversion
    assert fp8.fp8_recipe == "tensorwise" and fp8.fp8_mode == "emulated" and fp8.fp8_layers == ["0", "3"]
    assert bf16.metrics["accuracy"] == pytest.approx(fp32.metrics["accuracy"], abs=0.02)
    assert fp8.metrics["accuracy"] < fp32.metrics["accuracy"] - 0.1
    assert fp32.fp8_casts is not None and fp32.fp8_casts.recipes == ["tensorwise", "rowwise"]  # and the alternative
    assert fp8.fp8_casts is not None and bf16.fp8_casts is None


def test_an_fp8_underflow_error_names_the_input_layer_recipe_and_gemm(outlier_result: AuditResult) -> None:
    r = outlier_result
    errors = [f for f in r.flags if f.kind == "fp8_underflow" and f.severity == ERROR]
    assert [(f.arm, f.layer) for f in errors] == [("fp8", "0")]
    flag = errors[0]
    assert flag.caused_by is None
    ev = flag.evidence
    assert ev["recipe"] == "tensorwise" and ev["gemm"] in ("forward", "grad_weight") and ev["operand"] == "input"
    assert ev["predicted_flush_fraction"] > 0.5 and ev["measured_flush_fraction"] > 0.5
    assert "keep `0` out of float8" in flag.recommendation
    assert ev["other_recipes"]["rowwise"]["grad_weight"] > 0.5  # rowwise still flushes in the weight gradient
    assert not [f for f in r.flags if f.kind.startswith("fp8_") and f.arm != "fp8"]


def test_keeping_the_input_layer_out_of_float8_is_verified_by_training(outlier_result: AuditResult) -> None:
    r = outlier_result
    fix = next(rec for rec in r.recommendations if rec.exclude_from_fp8)
    assert fix.arm == "fp8" and fix.exclude_from_fp8 == ["0"] and fix.passed and fix.verified_arm == "fp8+filter"
    after = r.verification["fp8+filter"]
    assert after.exclude_from_fp8 == ["0"] and after.fp8_layers == ["3"]
    assert after.fingerprints == r.arms["fp32"].fingerprints
    assert abs(fix.metrics["accuracy"] - r.arms["fp32"].metrics["accuracy"]) <= 0.03
    assert "minimal" in fix.reason
    other = next(rec for rec in r.recommendations if rec.fp8_recipe is not None)
    assert other.fp8_recipe == "rowwise" and other.verified_arm == "fp8-rowwise"
    assert r.verification["fp8-rowwise"].fp8_recipe == "rowwise"
    assert verdict(r, "fp8").level == SAFE_WITH_CHANGES


def test_the_report_says_emulated_and_gives_the_plan_ready_to_paste(outlier_result: AuditResult) -> None:
    r = outlier_result
    html = render_html(r, plotlyjs="cdn")
    assert "fp8: float8 GEMMs emulated on this CPU" in html and 'id="fp8-casts"' in html
    casts = html[html.index('id="fp8-casts"'):html.index("</section>", html.index('id="fp8-casts"'))]
    assert "87.50%" in casts  # the input layer's flushed inputs: 7 clean rows in 8, predicted and measured
    assert "not listed." in casts  # the GEMMs that lose nothing are counted, not listed
    assert "module_filter_fn" in html and "filter_fqns" in html and "module_filter_func" in html
    summary = summary_markdown(r)
    assert "out of float8 (exclude" in summary and "emulated float8, tensorwise" in summary
    back = AuditResult.from_json(r.to_json())
    assert back.to_json() == r.to_json() and back.recommendations == r.recommendations
    assert back.arms["fp32"].fp8_casts == r.arms["fp32"].fp8_casts


def test_the_result_validates_against_mpaudit_schema(outlier_result: AuditResult, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    proc = subprocess.run([sys.executable, "-m", "mpaudit", "schema"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(outlier_result.to_json()), json.loads(proc.stdout))


@needs_torchao
def test_clean_model_fp8_gets_no_error_and_mxfp8_is_skipped_with_its_reason(tiny_task: Path) -> None:
    r = mpaudit.audit(tiny_task, arms=("fp32", "bf16", "fp8", "mxfp8"), steps=8, trace_every=4, bench=False)
    fp8, mx = r.arms["fp8"], r.arms["mxfp8"]
    assert fp8.status == "ok" and fp8.fingerprints == r.arms["fp32"].fingerprints
    assert not [f for f in r.flags if f.severity == ERROR]
    assert mx.status == SKIPPED and mx.error == MX_SKIP_REASON and "\n" not in MX_SKIP_REASON
    assert verdict(r, "mxfp8").level == SKIPPED_LEVEL
    assert all(c.arm != "mxfp8" for c in evaluate_gate(r.arms, {"accuracy": 0.5}, None).checks)
    assert r.arms["fp32"].fp8_casts is not None and "mxfp8" in r.arms["fp32"].fp8_casts.recipes  # still predicted
    assert "mxfp8: not run on this machine." in render_html(r, plotlyjs="cdn")


# ---------------------------------------------------------------------------------------------- the snippets


def _plan(*excluded: str, recipe: str | None = None) -> Recommendation:
    return Recommendation(arm="fp8", exclude_from_fp8=list(excluded), fp8_recipe=recipe, verified_arm="fp8+filter",
                          passed=True)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _converted(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if type(m).__name__ == "Float8Linear"]


@needs_torchao
def test_the_torchao_snippet_runs_and_keeps_exactly_the_plan_out_of_float8() -> None:
    code = fp8_filter_snippets(_plan("0", "4"))["torchao"]
    assert snippet(_plan("0", "4")) == code
    model = _model()
    exec(compile(code, "<snippet>", "exec"), {"model": model})
    assert _converted(model) == ["2"] and linear_paths(model) == ["0", "2", "4"]
    with pytest.raises(AssertionError, match="the filter would match nothing"):
        exec(compile(fp8_filter_snippets(_plan("encoder"))["torchao"], "<snippet>", "exec"), {"model": _model()})
    rowwise = fp8_filter_snippets(_plan(recipe="rowwise"))["torchao"]
    model = _model()
    exec(compile(rowwise, "<snippet>", "exec"), {"model": model})
    assert _converted(model) == ["0", "2", "4"] and model[0].config.round_scales_to_power_of_2


@needs_torchao
def test_the_accelerate_snippet_filters_through_accelerates_own_conversion() -> None:
    pytest.importorskip("accelerate", reason="the Accelerate snippet needs accelerate (the suites extra)")
    from accelerate.utils.ao import convert_model_to_fp8_ao

    namespace: dict[str, Any] = {}
    exec(compile(fp8_filter_snippets(_plan("2"))["accelerate"], "<snippet>", "exec"), namespace)
    assert namespace["accelerator"].mixed_precision == "fp8"
    model = _model()
    convert_model_to_fp8_ao(model, module_filter_func=namespace["module_filter_func"])
    assert _converted(model) == ["0", "4"]


def test_the_torchtitan_snippet_is_toml_and_warns_where_substrings_match_more() -> None:
    tomllib = pytest.importorskip("tomllib", reason="reading TOML needs Python 3.11")
    text = fp8_filter_snippets(_plan("layers.1", recipe="rowwise"), ["layers.1", "layers.10", "output"])["torchtitan"]
    config = tomllib.loads(text)
    assert config["model"]["converters"] == ["quantize.linear.float8"]
    assert config["quantize"]["linear"]["float8"] == {"recipe_name": "rowwise", "filter_fqns": ["layers.1"]}
    assert "also keeps 'layers.10' out of float8" in text
