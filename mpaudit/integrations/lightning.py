"""``MPAuditCallback`` for Lightning: a ``Trainer.fit`` observed by :func:`mpaudit.watch`.

::

    from mpaudit.integrations.lightning import MPAuditCallback

    trainer = lightning.Trainer(precision="bf16-mixed", max_steps=200, callbacks=[MPAuditCallback(out="reports/pl")])
    trainer.fit(module, train_loader)    # reports/pl/report.json, report.html, summary.md, layers.csv at on_train_end

Where Lightning does its precision work, and what the callback reads there:

* Lightning runs the training step (forward and backward) as a closure *inside* ``optimizer.step()``, so the
  optimizer's step hooks cannot tell when the gradients are ready. The step is opened at ``on_train_batch_start``
  and the gradients are read at ``on_before_optimizer_step`` — after the closure, before Lightning clips them
  (``gradient_clip_val``) and before the optimizer steps.
* Under ``precision="16-mixed"`` the precision plugin's GradScaler ``unscale_``s the gradients *before*
  ``on_before_optimizer_step``; the callback watches that scaler, so the gradients are read inside its
  ``unscale_``, just before they are divided: recorded as fp16 held them, with the scale in force, as
  ``mpaudit run`` records them. The step ends at the scaler's ``update()`` (a lowered scale: a skipped step).
* the loss: ``outputs["loss"]`` of ``on_train_batch_end``, times ``accumulate_grad_batches`` (Lightning divides it).
* ``on_train_end``: writes the report; ``on_exception`` writes it too, with the arm ``failed`` and the error.

Only global rank 0 watches and writes. Options of :func:`mpaudit.watch` (``trace_every``, ``trace``, ``trace_depth``,
``thresholds``, ``name``, ``precision``) pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("mpaudit.integrations.lightning needs the lightning package: pip install 'mpaudit[lightning]'") \
        from exc

from mpaudit.results.model import AuditResult
from mpaudit.run.watch import Watch

_PRECISIONS = {"bf16-mixed": "bf16", "16-mixed": "fp16", "bf16-true": "bf16", "16-true": "fp16", "32-true": "fp32",
               "32": "fp32"}


class MPAuditCallback(Callback):
    """Audit a Lightning ``fit``: ``Trainer(..., callbacks=[MPAuditCallback(out="reports/pl")])``.

    After training, ``result`` holds the :class:`~mpaudit.results.model.AuditResult` and ``paths`` the files written.
    """

    def __init__(self, out: str | Path | None = "reports/lightning", **options: Any) -> None:
        self.out = out
        self.options = options
        self.watch: Watch | None = None
        self.result: AuditResult | None = None
        self.paths: dict[str, Path] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank != 0 or not trainer.optimizers:
            return
        plugin = trainer.precision_plugin
        options = dict(self.options)
        precision = _PRECISIONS.get(str(getattr(plugin, "precision", "")))
        if "precision" not in options and precision is not None:
            options["precision"] = precision
        scaler = getattr(plugin, "scaler", None)
        self.watch = Watch(pl_module, trainer.optimizers[0], scaler, self.out, read_gradients=False, **options)
        self.watch.__enter__()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.watch is not None:
            self.watch.begin_step()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watch is not None:
            self.watch.gradients_ready()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.watch is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.watch.log(loss.detach() * trainer.accumulate_grad_batches)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.watch is not None:
            self.watch.fail(exception)
        self._finish()

    def _finish(self) -> None:
        if self.watch is None:
            return
        watch, self.watch = self.watch, None
        self.result = watch.close()
        self.paths = watch.paths


__all__ = ["MPAuditCallback"]
