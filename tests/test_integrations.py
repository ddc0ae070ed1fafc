"""The Trainer and Lightning callbacks: a tiny real run on the CPU writes the observed report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mpaudit


def _check_report(out: Path, arm: str, steps: int) -> mpaudit.AuditResult:
    """report.json, report.html and layers.csv are there, with one layers.csv row set per traced layer."""
    for name in ("report.json", "report.html", "layers.csv", "summary.md"):
        assert (out / name).is_file(), name
    result = mpaudit.AuditResult.from_json((out / "report.json").read_text())
    assert list(result.arms) == [arm] and result.observed
    observed = result.arms[arm]
    assert observed.status == "ok", observed.error
    assert observed.steps == steps and len(observed.loss) == steps
    assert observed.trace is not None and observed.trace.steps[0] == 0
    with (out / "layers.csv").open() as f:
        rows = list(csv.DictReader(f))
    layers = {row["layer"] for row in rows if row["role"] == "activation"}
    assert layers == set(observed.trace.layers)  # a row per traced layer
    assert {row["arm"] for row in rows} == {arm}
    assert "Observed run, not a matched comparison" in (out / "report.html").read_text()
    return result


# ---------------------------------------------------------------- Hugging Face Trainer


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Random token sequences labelled by their first token: learnable, tiny, offline."""

    def __init__(self, n: int = 192, seq: int = 12, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _bert_trainer(tmp_path: Path, steps: int, callback: Any, accumulate: int = 1) -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), bf16=True, use_cpu=True, max_steps=steps,
        per_device_train_batch_size=16, gradient_accumulation_steps=accumulate, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])


def test_trainer_callback_writes_the_report_of_a_bf16_bert_run(tmp_path: Path) -> None:
    from mpaudit.integrations.transformers import MPAuditCallback

    callback = MPAuditCallback(out=tmp_path / "hf", trace_every=10)
    trainer = _bert_trainer(tmp_path, 24, callback)
    trainer.train()
    result = _check_report(tmp_path / "hf", "bf16", 24)
    arm = result.arms["bf16"]
    assert arm.trace is not None and arm.trace.steps == (0, 10, 20)
    assert any(layer.startswith("bert.encoder.layer.1") for layer in arm.trace.layers)
    assert "classifier" in arm.trace.layers
    # the losses are the model's own (mean over the micro-batches of each step), as the Trainer logged them
    assert abs(sum(arm.loss) / len(arm.loss) - trainer.state.log_history[-1]["train_loss"]) < 1e-3
    assert callback.result is not None and callback.paths["json"] == tmp_path / "hf" / "report.json"
    # nothing of the watch is left on the model
    assert not trainer.model._forward_hooks and not trainer.model._forward_pre_hooks


def test_trainer_callback_counts_optimizer_steps_with_gradient_accumulation(tmp_path: Path) -> None:
    from mpaudit.integrations.transformers import MPAuditCallback

    callback = MPAuditCallback(out=None, trace_every=2)
    _bert_trainer(tmp_path, 4, callback, accumulate=3).train()
    assert callback.result is not None
    arm = callback.result.arms["bf16"]
    assert arm.steps == 4 and len(arm.loss) == 4
    assert arm.trace is not None and arm.trace.steps == (0, 2)
    # each traced step saw its three micro-batches' forwards: 2 traced steps x 3 micro-batches x 16 rows x 2 logits
    assert arm.trace.get("classifier", "activation").count == 2 * 3 * 16 * 2  # type: ignore[union-attr]


# ---------------------------------------------------------------- Lightning


def _lightning() -> Any:
    return pytest.importorskip("lightning")


def _module(L: Any) -> Any:
    class Net(L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    net = Net()
    net.losses = []
    return net


def _loader() -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)


def _fit(L: Any, steps: int, callback: Any, accumulate: int = 1, **kwargs: Any) -> Any:
    net = _module(L)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        gradient_clip_val=1.0, accumulate_grad_batches=accumulate, **kwargs)
    trainer.fit(net, _loader())
    return net


def test_lightning_callback_writes_the_report_of_a_bf16_run(tmp_path: Path) -> None:
    L = _lightning()
    from mpaudit.integrations.lightning import MPAuditCallback

    callback = MPAuditCallback(out=tmp_path / "pl", trace_every=10)
    net = _fit(L, 24, callback, precision="bf16-mixed")
    result = _check_report(tmp_path / "pl", "bf16", 24)
    arm = result.arms["bf16"]
    assert arm.trace is not None and arm.trace.steps == (0, 10, 20) and arm.trace.layers == ("net.0", "net.1", "net.2")
    assert any(role.startswith("grad:") for _, role, _ in arm.trace.items())
    assert arm.loss == pytest.approx(net.losses, rel=1e-6)
    assert not net._forward_pre_hooks


def test_lightning_callback_reads_fp16_gradients_where_the_plugin_unscales(tmp_path: Path) -> None:
    """16-mixed (forced onto the CPU with the plugin): gradients are read inside the plugin's GradScaler.unscale_,
    before it divides them (and before on_before_optimizer_step and clipping), with the scale recorded."""
    L = _lightning()
    from lightning.pytorch.plugins import MixedPrecision

    from mpaudit.integrations.lightning import MPAuditCallback

    fp16 = MPAuditCallback(out=None, trace_every=3)
    _fit(L, 6, fp16, accumulate=2, plugins=[MixedPrecision("16-mixed", "cpu")])
    bf16 = MPAuditCallback(out=None, trace_every=3)
    _fit(L, 6, bf16, accumulate=2, precision="bf16-mixed")
    assert fp16.result is not None and bf16.result is not None
    arm = fp16.result.arms["fp16"]
    assert arm.steps == 6 and arm.loss_scale is not None and arm.loss_scale.history == [65536.0] * 6
    assert arm.trace is not None and arm.trace.loss_scales == (65536.0, 65536.0)
    scaled = arm.trace.get("net.0", "grad:weight")
    plain = bf16.result.arms["bf16"].trace.get("net.0", "grad:weight")  # type: ignore[union-attr]
    assert scaled is not None and plain is not None
    assert 2**14 < scaled.max_abs / plain.max_abs < 2**18  # multiplied by the loss scale 2^16, not clipped to 1


def test_lightning_callback_writes_a_failed_report_when_fit_raises(tmp_path: Path) -> None:
    L = _lightning()
    from mpaudit.integrations.lightning import MPAuditCallback

    class Boom(L.Callback):  # type: ignore[misc, name-defined]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("disk full")

    callback = MPAuditCallback(out=tmp_path / "boom", trace_every=0)
    net = _module(L)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Boom()])
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.fit(net, _loader())
    saved = json.loads((tmp_path / "boom" / "report.json").read_text())
    arm = saved["arms"]["fp32"]
    assert arm["status"] == "failed" and "disk full" in arm["error"] and arm["steps"] == 3
