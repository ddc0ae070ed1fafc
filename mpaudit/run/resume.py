"""Resuming an audit from the result it left on disk (``mpaudit run --resume``).

A run is kept when the task file is the same (sha256), the options that shape training are the same, and the
model still starts from the weights and batches the saved run started from (its initial fingerprints, recomputed
once per seed); it is then marked ``resumed`` and not trained again. Runs that were ``interrupted`` are trained
again. Speed is measured again when any arm lacks it (its rounds pair every arm with fp32); memory only for the
arms that lack it. Verification runs are kept by their recipe. A mismatch refuses to resume with one sentence
naming what changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mpaudit.arms import Arm
from mpaudit.errors import UsageError
from mpaudit.results.model import ArmResult, AuditResult, Fingerprints, LayerError
from mpaudit.run.prepare import RunContext
from mpaudit.run.task import Task
from mpaudit.run.train import TrainSpec, initial_fingerprints
from mpaudit.vocab import INTERRUPTED

SHAPING_OPTIONS = ("steps", "epochs", "seed", "device", "tf32", "fp16_cpu", "autocast_policy", "trace_every",
                   "trace", "trace_depth", "clip_grad_norm", "grad_accumulation", "scheduler", "custom_step",
                   "parallel")
"""Options (``config`` keys) that change what an arm trains: a saved run with other values cannot be kept."""
MEASURING_OPTIONS = ("bench_seconds", "compile", "memory_budget")
"""Options that change the speed and memory figures: saved figures with other values are measured again."""


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


@dataclass
class Resumable:
    """A saved result checked against this audit: what of it can be kept."""

    saved: AuditResult
    measuring_same: bool
    _checked: dict[int, Fingerprints] = field(default_factory=dict)

    @classmethod
    def check(cls, saved: AuditResult, task: Task, config: dict[str, Any]) -> Resumable:
        """The saved result, if it was made by this task file with these options; UsageError naming what changed."""
        before, now = saved.env.get("task_sha256"), task.sha256
        if before != now:
            raise UsageError(f"Cannot resume: the task file changed since the saved run (sha256 "
                             f"{str(before)[:12]} → {now[:12]}); run again without --resume.")
        for key in SHAPING_OPTIONS:
            if saved.config.get(key) != config.get(key):
                raise UsageError(f"Cannot resume: {_option(key)} was {saved.config.get(key)!r} in the saved run and "
                                 f"is {config.get(key)!r} now; give the same options, or run without --resume.")
        seeds_before, seeds_now = list(saved.config.get("seeds", [])), list(config.get("seeds", []))
        common = min(len(seeds_before), len(seeds_now))
        if seeds_before[:common] != seeds_now[:common]:
            raise UsageError(f"Cannot resume: the saved run used seeds {seeds_before} and this one {seeds_now}.")
        same = all(saved.config.get(k) == config.get(k) for k in MEASURING_OPTIONS)
        return cls(saved=saved, measuring_same=same)

    def _saved_run(self, arm: str, seed_index: int) -> ArmResult | None:
        if seed_index == 0:
            return self.saved.arms.get(arm)
        runs = self.saved.replicates.get(arm, [])
        return runs[seed_index - 1] if seed_index - 1 < len(runs) else None

    def run(self, arm: str, seed_index: int, run: RunContext, spec: TrainSpec) -> ArmResult | None:
        """The saved run of ``arm`` with this seed, marked resumed, when it finished and still starts alike."""
        saved = self._saved_run(arm, seed_index)
        if saved is None or saved.status == INTERRUPTED:
            return None
        if saved.fingerprints is None:
            return None
        now = self._checked.get(seed_index)
        if now is None:
            now = self._checked[seed_index] = initial_fingerprints(run, spec)
        if now.weights != saved.fingerprints.weights:
            raise UsageError(f"Cannot resume: {arm}'s initial weights differ from the saved run's (build_model() "
                             "changed, or is not deterministic under the seed); run again without --resume.")
        if now.batches != saved.fingerprints.batches:
            raise UsageError(f"Cannot resume: {arm}'s first batches differ from the saved run's (train_loader() "
                             "changed, or is not deterministic under the seed); run again without --resume.")
        return replace(saved, resumed=True)

    @property
    def layer_errors(self) -> dict[str, list[LayerError]]:
        return self.saved.layer_errors

    def speed(self, arms: list[Arm], compile: bool) -> bool:
        """True when every arm (and every compiled arm, with ``--compile``) has its saved speed to keep."""
        if not self.measuring_same:
            return False
        have = all(self.saved.arms.get(a.name) is not None and self.saved.arms[a.name].speed is not None
                   for a in arms)
        return have and (not compile or bool(self.saved.compiled))

    def memory(self, arm: str) -> Any:
        """The saved memory figure of ``arm`` when it can be kept, else None."""
        saved = self.saved.arms.get(arm)
        return saved.memory if self.measuring_same and saved is not None else None

    def verification_run(self, arm: Arm) -> ArmResult | None:
        """A saved verification run of exactly ``arm``'s recipe that finished, marked resumed."""
        for saved in self.saved.verification.values():
            if saved.recipe == arm.description and saved.name == arm.name and saved.status != INTERRUPTED:
                return replace(saved, resumed=True)
        return None
