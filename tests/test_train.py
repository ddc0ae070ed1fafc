"""Matched arms: same weights, same batches, fp16 loss-scale history, failures isolated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import mpaudit
from conftest import TINY_TASK


def test_arms_start_identical_and_see_identical_batches(tiny_task: Path) -> None:
    result = mpaudit.audit(tiny_task, bench=False, steps=12)
    prints = {name: arm.fingerprints for name, arm in result.arms.items()}
    assert set(prints) == {"fp32", "bf16", "fp16"}
    assert len({(p.weights, p.batches) for p in prints.values() if p}) == 1
    assert result.fingerprints_match
    assert result.warnings == []
    for arm in result.arms.values():
        assert arm.status == "ok"
        assert len(arm.loss) == arm.steps == 12
        assert "accuracy" in arm.metrics


def test_nondeterministic_model_is_called_out(write_task: Callable[..., Path]) -> None:
    # build_model ignores the seed: the arms start from different weights and the result must say so.
    path = write_task(TINY_TASK.replace(
        "def build_model():\n",
        "import os\ndef build_model():\n    torch.manual_seed(int.from_bytes(os.urandom(4), 'little'))\n"))
    result = mpaudit.audit(path, bench=False, steps=3, arms=("fp32", "bf16"))
    assert not result.fingerprints_match
    assert any("same initial weights" in w and "meaningless" in w for w in result.warnings)
    assert result.to_dict()["fingerprints_match"] is False


def test_shuffled_dataloader_gives_same_batches_in_every_arm_and_epoch(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace(
        "def train_loader():\n    return _data(1)",
        "def train_loader():\n"
        "    from torch.utils.data import DataLoader, TensorDataset\n"
        "    x = torch.cat([b[0] for b in _data(1)]); y = torch.cat([b[1] for b in _data(1)])\n"
        "    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)"))
    result = mpaudit.audit(path, bench=False, epochs=2, arms=("fp32", "bf16"))
    assert result.fingerprints_match
    assert result.arms["fp32"].steps == 16  # 2 epochs x 8 batches


def test_generator_loader_is_restarted_each_epoch(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("def train_loader():\n    return _data(1)",
                                        "def train_loader():\n    return (b for b in _data(1))"))
    result = mpaudit.audit(path, bench=False, epochs=3, arms=("fp32",))
    assert result.arms["fp32"].steps == 24


def test_fp16_records_loss_scale_every_step(tiny_task: Path) -> None:
    arm = mpaudit.audit(tiny_task, bench=False, steps=10, arms=("fp16",)).arms["fp16"]
    assert arm.loss_scale is not None
    assert len(arm.loss_scale.history) == 10
    assert arm.loss_scale.history[0] == 65536.0  # GradScaler's default init_scale
    assert arm.loss_scale.skipped == 0
    assert arm.fp16_mode is not None


def test_fp16_overflow_skips_steps_then_diverges(overflow_task: Path) -> None:
    result = mpaudit.audit(overflow_task, bench=False, steps=40)
    assert result.arms["fp32"].status == "ok"
    assert result.arms["bf16"].status == "ok"
    fp16 = result.arms["fp16"]
    assert fp16.status == "diverged"
    assert fp16.loss_scale is not None and fp16.loss_scale.skipped >= 20
    # every skipped step halved the scale
    assert fp16.loss_scale.history[1] == fp16.loss_scale.history[0] / 2
    assert "nan" in (fp16.error or "").lower() or "inf" in (fp16.error or "").lower()


def test_exception_in_one_arm_does_not_sink_the_others(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace(
        "    x, y = batch\n    return nn.functional.cross_entropy(model(x), y)",
        "    x, y = batch\n"
        "    if torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16:\n"
        "        raise RuntimeError('no bf16 kernel for this op')\n"
        "    return nn.functional.cross_entropy(model(x), y)"))
    result = mpaudit.audit(path, bench=False, steps=5)
    assert result.arms["fp32"].status == "ok"
    assert result.arms["fp16"].status == "ok"
    bf16 = result.arms["bf16"]
    assert bf16.status == "failed"
    assert bf16.error == "RuntimeError: no bf16 kernel for this op"
    assert bf16.metrics == {}


def test_fp32_nonfinite_loss_is_diverged(write_task: Callable[..., Path]) -> None:
    path = write_task(TINY_TASK.replace("return nn.functional.cross_entropy(model(x), y)",
                                        "return nn.functional.cross_entropy(model(x), y) * float('inf')"))
    arm = mpaudit.audit(path, bench=False, steps=5, arms=("fp32",)).arms["fp32"]
    assert arm.status == "diverged"
    assert arm.steps == 1


def test_same_seed_same_losses(tiny_task: Path) -> None:
    a = mpaudit.audit(tiny_task, bench=False, steps=5, arms=("fp32", "bf16"))
    b = mpaudit.audit(tiny_task, bench=False, steps=5, arms=("fp32", "bf16"))
    assert a.arms["fp32"].loss == b.arms["fp32"].loss
    assert a.arms["bf16"].loss == b.arms["bf16"].loss


@pytest.mark.parametrize("kwargs, fragment", [
    ({"arms": ("fp32", "fp4")}, "Unknown arm"),
    ({"steps": 5, "epochs": 1}, "not both"),
    ({"steps": 0}, "at least 1"),
    ({"arms": ("bf16",), "max_drop": {"accuracy": 0.1}}, "must include fp32"),
    ({"max_drop": {"acc": 0.1}, "steps": 2}, "the metrics are: accuracy"),
    ({"device": "tpu"}, "Unknown device"),
])
def test_bad_options_are_usage_errors(tiny_task: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(mpaudit.UsageError, match=fragment):
        mpaudit.audit(tiny_task, **kwargs)
