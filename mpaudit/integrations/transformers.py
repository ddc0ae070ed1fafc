"""``MPAuditCallback`` for the Hugging Face ``Trainer``: the Trainer's own training, observed by :func:`mpaudit.watch`.

::

    from mpaudit.integrations.transformers import MPAuditCallback

    args = TrainingArguments(output_dir="out", bf16=True, max_steps=200, report_to="none")
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[MPAuditCallback(out="reports/hf")])
    trainer.train()          # reports/hf/report.json, report.html, summary.md, layers.csv at on_train_end

What it hooks, and where the Trainer does its precision work:

* ``on_train_begin``: starts a :class:`~mpaudit.run.watch.Watch` on the model and the optimizer the Trainer built.
  accelerate's ``AcceleratedOptimizer`` is unwrapped to the torch optimizer inside it, and under ``fp16=True`` its
  GradScaler is watched too.
* ``on_step_begin``: opens the optimizer step (all its ``gradient_accumulation_steps`` micro-batches).
* gradients: under ``fp16`` they are read inside the GradScaler's ``unscale_``, which the Trainer calls to clip —
  just before it divides them, so they are recorded as fp16 held them, with the scale in force, exactly as
  ``mpaudit run`` records them; under ``bf16`` and fp32 they are read just before ``optimizer.step()`` (after the
  Trainer's ``max_grad_norm`` clipping). A step GradScaler skipped (``optimizer_step_was_skipped``) is recorded as
  skipped.
* the loss: the ``loss`` of the model's output on every training forward (the mean over a step's micro-batches);
  a ``compute_loss`` that computes its loss outside the model leaves the training curve empty.
* ``on_train_end``: writes the report. A ``train()`` that raises never reaches it, so no report is written then.

Only the main process (``state.is_world_process_zero``) watches and writes. Options of :func:`mpaudit.watch`
(``trace_every``, ``trace``, ``trace_depth``, ``thresholds``, ``name``, ``precision``) pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "mpaudit.integrations.transformers needs the transformers package: pip install 'mpaudit[transformers]'"
    ) from exc

from mpaudit.results.model import AuditResult
from mpaudit.run.watch import Watch


class MPAuditCallback(TrainerCallback):
    """Audit the ``Trainer``'s own run: ``Trainer(..., callbacks=[MPAuditCallback(out="reports/hf")])``.

    After training, ``result`` holds the :class:`~mpaudit.results.model.AuditResult` and ``paths`` the files written.
    """

    def __init__(self, out: str | Path | None = "reports/trainer", **options: Any) -> None:
        self.out = out
        self.options = options
        self.watch: Watch | None = None
        self.result: AuditResult | None = None
        self.paths: dict[str, Path] = {}
        self._loss_hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None or optimizer is None:
            return
        options = dict(self.options)
        if "precision" not in options and (args.bf16 or args.fp16):
            options["precision"] = "bf16" if args.bf16 else "fp16"
        self.watch = Watch(model, optimizer, getattr(optimizer, "scaler", None), self.out, **options)
        self.watch.__enter__()
        self._loss_hook = model.register_forward_hook(self._capture_loss)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.begin_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is None:
            return
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        watch, self.watch = self.watch, None
        self.result = watch.close()
        self.paths = watch.paths

    def _capture_loss(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.watch is None or not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.watch.log(loss)


__all__ = ["MPAuditCallback"]
