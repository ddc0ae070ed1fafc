"""Causes and consequences: which flags are where the trouble starts, and which only follow from them.

A forward pass that overflows makes every later output NaN and GradScaler skip every step; a scale that keeps
halving after overflows makes small gradients flush. Flagging each of those as its own error buries the finding
and advises fixes that fix nothing (a *lower* init_scale). :func:`link` names the root of each arm's trouble and
marks every flag that follows from it with ``caused_by`` (and no recommendation of its own):

* a **forward root** — the replayed site of the first non-finite op (:mod:`mpaudit.trace.sites`), else the first
  layer whose output went non-finite — is the cause of every other flag in its arm, except an overflow that fp32's
  own statistics predict at another layer (that layer would overflow on its own);
* without one, a **backward root** (the replayed site of the first non-finite gradient) or, failing that, the
  skipped-steps ``loss_scale`` flag causes the gradient flags of an arm whose GradScaler lowered its scale: its
  underflow, loss-scale advice and non-finite gradients. The root takes the severity of its worst consequence.

``update_underflow`` (updates lost to a half-precision weight) follows from nothing but the recipe: it is a root
cause of its own unless a forward root makes the whole arm's numbers its consequence.

:func:`settle` then tells harm from noise (``precision_loss`` on an arm that matches fp32 is information, lost updates
there a warning), folds
identical advice over many layers into one model-level flag, and orders flags by severity and forward order.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from mpaudit.numerics.formats import FP16
from mpaudit.numerics.layerstats import ROOT_LAYER
from mpaudit.results.model import ArmResult, Cause, Flag
from mpaudit.vocab import ERROR, FLAG_KINDS, INFO, SEVERITIES, WARNING, severity_rank

DEFAULT_LOSS_SCALE = 2.0**16
"""GradScaler's default initial scale: below it, the scale was lowered by skipped steps."""
FOLD_AT_LAYERS = 3
"""The same advice on at least this many layers of one arm becomes one model-level flag listing them."""
_FORWARD_KINDS = ("forward_overflow", "nonfinite")
_GRADIENT_KINDS = ("gradient_underflow", "gradient_overflow", "loss_scale", "precision_loss", "nonfinite")
_DEMOTED_WHEN_MATCHING = ("update_underflow", "fp8_underflow", "fp8_saturation")
"""Errors about what a recipe *loses* (updates, float8 values) that become warnings on an arm training as well as
fp32: the loss did not cost this run, but a longer run or another batch may pay for it."""


def _is_backward(flag: Flag) -> bool:
    if flag.site is not None:
        return flag.site.phase == "backward"
    role = str(flag.evidence.get("role", ""))
    return role.startswith("grad") or "backward" in flag.rule


def _forward_root(flags: Sequence[Flag]) -> Flag | None:
    replayed = [f for f in flags if f.site is not None and f.site.phase == "forward"]
    if replayed:
        return replayed[0]
    first = [f for f in flags if f.kind in _FORWARD_KINDS and not _is_backward(f)
             and ("first_inf_step" in f.evidence or "first non-finite output" in f.rule)]
    return first[0] if first else None


def _backward_root(flags: Sequence[Flag]) -> Flag | None:
    replayed = [f for f in flags if f.site is not None and f.site.phase == "backward"]
    if replayed:
        return replayed[0]
    first = [f for f in flags if f.kind == "nonfinite" and _is_backward(f)]
    return first[0] if first else None


def _independent_overflow(flag: Flag) -> bool:
    """An overflow fp32's own statistics predict: the layer overflows fp16 whatever came before it."""
    fp32_max = flag.evidence.get("fp32_max_abs")
    return flag.kind == "forward_overflow" and isinstance(fp32_max, (int, float)) and fp32_max > FP16.max


def _scale_lowered(arm: ArmResult | None) -> bool:
    """True when the arm's GradScaler ran below its default scale after skipping steps."""
    if arm is None or arm.loss_scale is None or not arm.loss_scale.skipped_steps:
        return False
    return any(s < DEFAULT_LOSS_SCALE for s in arm.loss_scale.history)


def _consequence(flag: Flag, root: Flag) -> Flag:
    evidence = {**flag.evidence, "follows_from": f"{root.kind} at {root.layer}"}
    return replace(flag, caused_by=Cause(layer=root.layer, kind=root.kind), recommendation="", evidence=evidence)


def link(flags: Sequence[Flag], arms: Mapping[str, ArmResult]) -> list[Flag]:
    """``flags`` with ``caused_by`` set on every consequence (see the module docstring), in the same order."""
    out: list[Flag] = []
    for arm in dict.fromkeys(f.arm for f in flags):
        mine = [f for f in flags if f.arm == arm]
        forward, backward = _forward_root(mine), _backward_root(mine)
        skips = next((f for f in mine if f.kind == "loss_scale" and "skip_fraction" in f.evidence), None)
        linked: dict[int, Flag] = {}
        for i, f in enumerate(mine):
            if forward is not None:
                if f is not forward and not _independent_overflow(f):
                    linked[i] = _consequence(f, forward)
                continue
            root = backward or skips
            if root is None or f is root or f.kind not in _GRADIENT_KINDS:
                continue
            if f is skips or (f.kind == "nonfinite" and _is_backward(f)) or (
                    _scale_lowered(arms.get(arm)) and (f.kind != "precision_loss" or _is_backward(f))):
                linked[i] = _consequence(f, root)
        worst = {f.caused_by: f.severity for f in sorted(linked.values(), key=lambda f: -severity_rank(f.severity))
                 if f.caused_by is not None}
        for i, f in enumerate(mine):
            f = linked.get(i, f)
            cause = Cause(layer=f.layer, kind=f.kind)
            if f.caused_by is None and cause in worst and severity_rank(worst[cause]) < severity_rank(f.severity):
                f = replace(f, severity=worst[cause])  # a root is as serious as what follows from it
            out.append(f)
    return out


def settle(flags: Sequence[Flag], matching: Collection[str], layer_order: Mapping[str, Sequence[str]],
           arm_order: Sequence[str]) -> list[Flag]:
    """Harm over noise and one flag per piece of advice, most severe first, then in forward order.

    ``matching`` names the arms that train as well as fp32 (the gate, or within 2% without one; a float8 arm also
    when it trains as well as bf16): their ``precision_loss`` warnings become information, and their
    ``update_underflow``, ``fp8_underflow`` and ``fp8_saturation`` errors warnings (the lost updates or values did not
    cost this run, but a lower learning rate or a longer run may stall). ``layer_order`` gives
    each arm's layers in forward order.
    """
    calmed = [replace(f, severity=INFO) if f.kind == "precision_loss" and f.arm in matching
              and f.severity == WARNING else f for f in flags]
    calmed = [replace(f, severity=WARNING) if f.kind in _DEMOTED_WHEN_MATCHING and f.arm in matching
              and f.severity == ERROR else f for f in calmed]
    folded = _fold(calmed)

    def where(f: Flag) -> int:
        """A layer's place in forward order; a container's is that of its first traced descendant."""
        layers = list(layer_order.get(f.arm, ()))
        if f.layer == ROOT_LAYER:
            return -1
        if f.layer in layers:
            return layers.index(f.layer)
        inside = [i for i, layer in enumerate(layers) if layer.startswith(f.layer + ".")]
        return inside[0] if inside else len(layers)

    def key(f: Flag) -> tuple[int, int, bool, int, int]:
        arm = arm_order.index(f.arm) if f.arm in arm_order else len(arm_order)
        return (severity_rank(f.severity), arm, f.caused_by is not None, where(f), FLAG_KINDS.index(f.kind))

    return sorted(folded, key=key)


def _fold(flags: Sequence[Flag]) -> list[Flag]:
    """The same advice (same arm, kind, severity, cause and recommendation) on many layers as one flag."""
    groups: dict[tuple[object, ...], list[Flag]] = {}
    for f in flags:
        groups.setdefault((f.arm, f.kind, f.severity, f.caused_by, f.recommendation, f.site is None), []).append(f)
    out: list[Flag] = []
    done: set[tuple[object, ...]] = set()
    for f in flags:
        key = (f.arm, f.kind, f.severity, f.caused_by, f.recommendation, f.site is None)
        group = groups[key]
        if len(group) < FOLD_AT_LAYERS or f.site is not None or f.layer == ROOT_LAYER:
            out.append(f)
            continue
        if key in done:
            continue
        done.add(key)
        layers = [g.layer for g in group]
        evidence = {"layers": layers, "count": len(layers), "first": group[0].evidence}
        out.append(replace(f, layer=ROOT_LAYER, evidence=evidence,
                           rule=f"{f.rule} (the same on {len(layers)} layers, listed in evidence.layers)"))
    return out


def group_by_cause(flags: Sequence[Flag]) -> list[tuple[Flag, list[Flag]]]:
    """Each root flag with the flags that follow from it, in the order of ``flags``; a consequence whose cause is
    not among ``flags`` stands on its own."""
    roots = [f for f in flags if f.caused_by is None]
    by_cause: dict[tuple[str, str, str], list[Flag]] = {}
    orphans: list[Flag] = []
    keys = {(f.arm, f.layer, f.kind) for f in roots}
    for f in flags:
        if f.caused_by is None:
            continue
        key = (f.arm, f.caused_by.layer, f.caused_by.kind)
        if key in keys:
            by_cause.setdefault(key, []).append(f)
        else:
            orphans.append(f)
    groups = [(f, by_cause.get((f.arm, f.layer, f.kind), [])) for f in roots]
    return groups + [(f, []) for f in orphans]


__all__ = ["DEFAULT_LOSS_SCALE", "FOLD_AT_LAYERS", "SEVERITIES", "group_by_cause", "link", "settle"]
