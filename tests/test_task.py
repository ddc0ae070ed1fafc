"""The task contract: every breach gets one sentence and exit 2, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_TASK
from mpaudit.cli import EXIT_USAGE, app
from mpaudit.errors import TaskError
from mpaudit.run.task import load_task, preflight

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", "--no-bench", *args, "--steps", "2", "-q"])
    return result.exit_code, result.output


def assert_contract_error(path: Path, *fragments: str) -> None:
    code, output = run_cli(str(path), "--out", str(path.parent / "out"))
    assert code == EXIT_USAGE, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output
    assert not (path.parent / "out" / "report.json").exists()


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert_contract_error(tmp_path / "nope.py", "does not exist")


def test_not_a_python_file(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("hello")
    assert_contract_error(path, "not a Python file")


def test_syntax_error_names_the_line(write_task: Callable[..., Path]) -> None:
    path = write_task("import torch\ndef build_model(:\n    pass\n")
    assert_contract_error(path, "not valid Python", "line 2")


def test_import_failure_shows_the_users_exception_line(write_task: Callable[..., Path]) -> None:
    path = write_task("import torch\nx = 1\nundefined_name + 1\n")
    assert_contract_error(path, "failed to import", "NameError", "line 3", "undefined_name + 1")


@pytest.mark.parametrize("name", ["build_model", "train_loader", "loss_fn"])
def test_missing_required_function(write_task: Callable[..., Path], name: str) -> None:
    path = write_task(TINY_TASK.replace(f"def {name}(", f"def renamed_{name}("))
    assert_contract_error(path, f"no {name}() function")


def test_build_model_must_return_a_module(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace(
        "return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))", "return 'a model'"))
    assert_contract_error(path, "build_model()", "torch.nn.Module", "str")


def test_loss_fn_must_return_a_scalar(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("return nn.functional.cross_entropy(model(x), y)",
                                        "return nn.functional.cross_entropy(model(x), y, reduction='none')"))
    assert_contract_error(path, "loss_fn", "scalar tensor", "(32,)")


def test_loss_fn_returning_a_float(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("return nn.functional.cross_entropy(model(x), y)", "return 1.0"))
    assert_contract_error(path, "loss_fn", "scalar tensor", "float")


def test_empty_loader(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("def train_loader():\n    return _data(1)",
                                        "def train_loader():\n    return []"))
    assert_contract_error(path, "train_loader()", "empty")


def test_evaluate_must_return_a_dict(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace('return {"accuracy": correct / total}', "return correct / total"))
    assert_contract_error(path, "evaluate", "dict of numbers", "float")


def test_evaluate_values_must_be_numbers(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace('return {"accuracy": correct / total}', 'return {"accuracy": "high"}'))
    assert_contract_error(path, "evaluate", "'accuracy'", "str")


def test_user_exception_in_build_model(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))",
                                        "raise ValueError('bad config')"))
    assert_contract_error(path, "build_model() in model.py raised ValueError: bad config")


def test_debug_shows_the_traceback(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("def loss_fn(", "def renamed("))
    result = runner.invoke(app, ["run", "--no-bench", str(path), "--steps", "2", "-q", "--debug"])
    assert isinstance(result.exception, TaskError)


def test_valid_task_loads_and_passes_preflight(tiny_task: Path) -> None:
    import torch

    task = load_task(tiny_task)
    assert task.name == tiny_task.parent.name  # a model.py is named after its folder
    assert len(task.sha256) == 64
    assert preflight(task, torch.device("cpu")) == ["accuracy"]


def test_loss_without_grad_is_caught(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("return nn.functional.cross_entropy(model(x), y)",
                                        "return nn.functional.cross_entropy(model(x), y).detach()"))
    assert_contract_error(path, "does not require grad")


@pytest.mark.parametrize("metrics, fragment", [
    ('["mae"]', "METRICS in model.py must be a dict"),
    ('{"mae": "lower"}', "'mae' maps to 'lower'"),
    ('{1: "min"}', "1 maps to 'min'"),
])
def test_metrics_declaration_must_map_names_to_min_or_max(write_task: Callable[..., Path], metrics: str,
                                                          fragment: str) -> None:
    path = write_task(TINY_TASK + f"\nMETRICS = {metrics}\n")
    assert_contract_error(path, fragment)


def test_torchaos_load_time_notices_stay_out_of_the_output(write_task: Callable[..., Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # transformers imports torchao when it is installed, and torchao warns about every GPU kernel library it cannot
    # load; the task's own warnings on other loggers still show
    path = write_task(TINY_TASK.replace("import torch\n", "import logging\nimport torch\n"
                                        "logging.getLogger('torchao').warning('Failed to load _C_mxfp8.so')\n"
                                        "logging.getLogger('task').warning('the task speaks')\n", 1))
    load_task(path)
    assert [r.getMessage() for r in caplog.records] == ["the task speaks"]
    assert logging.getLogger("torchao").level == logging.NOTSET  # as it was
