"""Shared builders of results for tests that need no training: an arm, a whole result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mpaudit.ci.gate import Limit, evaluate_gate
from mpaudit.results.model import ArmResult, AuditResult, Flag, LossScale

ENV = {"device": "cpu", "device_name": "cpu0", "torch_version": "2.13.0", "task_sha256": "a" * 64}


def make_arm(name: str, status: str = "ok", *, loss: float = 0.5, steps: int = 2, error: str | None = None,
             skipped: int | None = None, train_s: float = 0.25, **metrics: float) -> ArmResult:
    """An arm that trained ``steps`` steps ending at ``loss`` (final_loss is ``loss`` for up to 10 steps), with
    ``skipped`` GradScaler skips when given."""
    scale = LossScale(history=[65536.0] * steps, skipped_steps=list(range(skipped))) if skipped is not None else None
    return ArmResult(name=name, status=status, loss=[1.0] * (steps - 1) + [loss], metrics=dict(metrics), steps=steps,
                     train_s=train_s, error=error, loss_scale=scale)  # type: ignore[arg-type]


def make_result(*arms: ArmResult, task: str = "model", replicates: dict[str, list[ArmResult]] | None = None,
                flags: Sequence[Flag] = (), max_drop: Mapping[str, Limit] | None = None,
                env: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                metric_directions: Mapping[str, str] | None = None) -> AuditResult:
    """A result of ``arms`` (the first seed) and their ``replicates``, gated by ``max_drop`` when given, recording
    ``metric_directions`` when given."""
    by_name = {a.name: a for a in arms}
    reps = replicates or {}
    seeds = list(range(1 + max((len(v) for v in reps.values()), default=0)))
    steps = max((a.steps for a in arms), default=0)
    return AuditResult(
        task=task, env={**ENV, **(env or {})}, config={"steps": steps, "seeds": seeds, **(config or {})},
        arms=by_name, gate=evaluate_gate(by_name, dict(max_drop or {}), None, reps, directions=metric_directions),
        flags=list(flags), replicates=reps, metric_directions=dict(metric_directions or {}),  # type: ignore[arg-type]
    )
