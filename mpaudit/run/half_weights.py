"""Optimizer steps for weights stored in bf16 that do not lose small updates: the fixes of a ``bf16-pure`` recipe.

A model trained with its weights, gradients and optimizer state in bf16 (``model.to(torch.bfloat16)``, the
optimizer built on those parameters) loses every update smaller than half a bf16 ulp of its weight (2^-9 of the
weight's binade): the optimizer's ``w + Δw`` rounds back to ``w``. :func:`bf16_optimizer` (public as
``mpaudit.bf16_optimizer``) attaches a step pre-hook and a step post-hook to the task's own optimizer, so any
optimizer works unchanged and the training loop keeps calling ``optimizer.step()``. For each affected bf16
parameter the pre-hook swaps an fp32 tensor in as the parameter's data (and its gradient widened to fp32), so the
optimizer computes the whole update in fp32; the post-hook writes the result back into the bf16 weight and swaps the
bf16 tensors back in:

* ``fp32_master=[module paths]`` — those modules' parameters keep a persistent fp32 master copy (made from the bf16
  weight once, never refreshed from it) that the optimizer steps; the bf16 weight is the master rounded to nearest
  after every step. Their optimizer state is created and kept in fp32, as in any fp32-master recipe. Memory per
  parameter: +4 bytes for the master, and fp32 state.
* ``rounding="stochastic"`` — every other bf16 parameter: the fp32 value is the bf16 weight (exactly widened), the
  new value is rounded to bf16 *stochastically* (up with probability equal to the dropped fraction of an ulp), so an
  update of a tenth of an ulp moves the weight by one ulp one step in ten: exact in expectation. The optimizer state
  is stored in bf16 between steps (rounded to nearest) and widened for the step, as torchao's
  ``_AdamW(bf16_stochastic_round=True)`` does. Memory: nothing persistent beyond pure bf16.
* ``rounding="kahan"`` — every other bf16 parameter carries a compensation buffer ``c`` (bf16 by default): the fp32
  value is ``w + c``, the new value ``v`` is rounded to nearest into ``w`` and ``c = v - w`` keeps what rounding
  dropped, so small updates accumulate in ``c`` until they move ``w``. State is stored in bf16 as for
  ``stochastic``. Memory: +2 bytes per parameter. A bf16 buffer holds ``c`` to 8 significant bits, so ``w + c``
  carries about 16: measured on ``suites/digits_finetune`` (AdamW, lr 2e-5), as good as fp32 compensation (see the
  README).

During the step the affected parameters' weights, gradients and optimizer state are held in fp32 all at once (the
optimizer steps them together, whatever it is), so the step's transient peak is an fp32 optimizer step's; between
steps only the bf16 tensors, the masters and the compensations remain.

Parameters that are not bf16 (a module kept in fp32 by the user) are left alone. Random numbers for stochastic
rounding come from a private generator seeded with ``seed``, so a run is reproducible and the user's random
state (dropout, data order) is untouched. The post-hook restores the bf16 weight before anything after
``optimizer.step()`` runs, so mpaudit's update statistics see the real change of the bf16 weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpaudit.arms import UPDATE_ROUNDINGS, Arm
from mpaudit.errors import UsageError

SR_SEED = 0
"""Default seed of the stochastic-rounding generator."""

_LOW_BITS = 1 << 16
"""bf16 keeps the top 16 bits of an fp32 pattern: stochastic rounding adds a uniform draw below this and truncates."""
_HIGH_MASK = -_LOW_BITS
"""0xFFFF0000 as an int32: clears the 16 bits bf16 drops."""


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically: up to the next bf16 value with probability equal to the dropped
    fraction of an ulp, down otherwise, so ``E[result] = x`` for every finite ``x`` in bf16's range.

    Done on the bit pattern: add a uniform integer in [0, 2^16) to the fp32 bits and clear the low 16 bits (a carry
    into the exponent is the correct round-up across a binade). Infinities and NaN keep their exponent and top
    mantissa bits, so they stay what they are; no host sync.
    """
    x = x.detach().to(torch.float32).contiguous()
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise).bitwise_and_(_HIGH_MASK)
    return bits.view(torch.float32).to(torch.bfloat16)


@dataclass
class _Entry:
    """One bf16 parameter the hooks manage: how its update is rounded, and the tensors kept between steps."""

    param: nn.Parameter
    mode: str  # "master", "stochastic" or "kahan"
    master: torch.Tensor | None = None
    compensation: torch.Tensor | None = None
    half: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    widened: dict[str, torch.dtype] = field(default_factory=dict)
    active: bool = False


class Bf16Updates:
    """The step hooks :func:`bf16_optimizer` attaches to an optimizer; :meth:`remove` takes them off again.

    ``modes`` maps each managed parameter to ``master``, ``stochastic`` or ``kahan`` (see the module docstring).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, rounding: str | None = None,
        fp32_master: Sequence[str] = (), *, compensation_dtype: torch.dtype = torch.bfloat16, seed: int = SR_SEED,
    ) -> None:
        if rounding is not None and rounding not in UPDATE_ROUNDINGS:
            raise UsageError(f"Unknown update rounding {rounding!r}; pick from {', '.join(UPDATE_ROUNDINGS)}.")
        self.optimizer = optimizer
        self.rounding = rounding
        self.compensation_dtype = compensation_dtype
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        master_ids = {id(p) for p in _module_params(model, fp32_master)}
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.entries: list[_Entry] = []
        seen: set[int] = set()
        for param in model.parameters():
            if id(param) in seen or id(param) not in optimized or param.dtype not in (torch.bfloat16, torch.float16):
                continue
            seen.add(id(param))
            mode = "master" if id(param) in master_ids else rounding
            if mode is None:
                continue
            if mode == "stochastic" and param.dtype != torch.bfloat16:
                raise UsageError("Stochastic rounding of updates is implemented for bf16 weights only.")
            entry = _Entry(param=param, mode=mode)
            with torch.no_grad():
                if mode == "master":
                    entry.master = param.detach().to(torch.float32).clone()
                elif mode == "kahan":
                    entry.compensation = torch.zeros_like(param, dtype=compensation_dtype)
            self.entries.append(entry)
        if fp32_master and not any(e.mode == "master" for e in self.entries):
            raise UsageError("None of the modules named in fp32_master holds a bf16 parameter the optimizer steps: "
                             "cast the model to bf16 (model.to(torch.bfloat16)) before building the optimizer.")
        if not self.entries and (rounding is not None or fp32_master):
            raise UsageError("The optimizer steps no bf16 parameter: cast the model to bf16 "
                             "(model.to(torch.bfloat16)) before building the optimizer.")
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    @property
    def modes(self) -> dict[nn.Parameter, str]:
        return {e.param: e.mode for e in self.entries}

    def remove(self) -> None:
        """Take the hooks off; later steps round to nearest again (fp32 masters and compensations are dropped)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Swap in fp32 weights, gradients and (for stochastic / kahan) optimizer state for the step."""
        with torch.no_grad():
            for e in self.entries:
                p = e.param
                if p.grad is None or p.grad.is_sparse:
                    e.active = False
                    continue
                e.active, e.half, e.grad = True, p.data, p.grad
                if e.mode == "master":
                    assert e.master is not None
                    wide = e.master
                elif e.mode == "kahan":
                    assert e.compensation is not None
                    wide = e.half.to(torch.float32) + e.compensation.to(torch.float32)
                else:
                    wide = e.half.to(torch.float32)
                p.data = wide
                p.grad = e.grad.to(torch.float32)
                e.widened = {}
                state = optimizer.state.get(p)
                if state and e.mode != "master":
                    for key, value in state.items():
                        if _is_state_tensor(value, p) and value.dtype != torch.float32:
                            e.widened[key] = value.dtype
                            state[key] = value.to(torch.float32)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Write each fp32 result back into its bf16 weight (rounded per mode) and swap the bf16 tensors back."""
        with torch.no_grad():
            for e in self.entries:
                if not e.active:
                    continue
                p, half = e.param, e.half
                assert half is not None
                wide = p.data
                if e.mode == "master":
                    assert e.master is not None
                    if wide.data_ptr() != e.master.data_ptr():  # an optimizer that replaced the tensor
                        e.master.copy_(wide)
                    half.copy_(e.master)
                elif e.mode == "stochastic":
                    half.copy_(stochastic_round_bf16(wide, self._generator(wide.device)))
                else:
                    assert e.compensation is not None
                    half.copy_(wide)
                    e.compensation.copy_(wide - half.to(torch.float32))
                p.data = half
                p.grad = e.grad
                state = optimizer.state.get(p)
                if state and e.mode != "master":
                    for key, value in state.items():
                        if _is_state_tensor(value, p) and value.dtype == torch.float32:
                            state[key] = value.to(e.widened.get(key, half.dtype))
                e.half = e.grad = None
                e.active = False


def _is_state_tensor(value: Any, param: torch.Tensor) -> bool:
    """A floating per-element state tensor of ``param`` (Adam's moments, a momentum buffer), not a step counter."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0


def _module_params(model: nn.Module, paths: Iterable[str]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise UsageError(f"The model has no module {path!r} to keep an fp32 master copy of; use a path from "
                             "model.named_modules().") from None
        out += list(module.parameters())
    return out


def bf16_optimizer(
    model: nn.Module,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | torch.optim.Optimizer,
    *,
    rounding: str | None = None,
    fp32_master: Sequence[str] = (),
    compensation_dtype: torch.dtype = torch.bfloat16,
    seed: int = SR_SEED,
) -> torch.optim.Optimizer:
    """The optimizer of a bf16 model (``model.to(torch.bfloat16)``) with its small updates kept.

    ``build_optimizer(model)`` builds your optimizer on the bf16 parameters (or pass one already built, before its
    first step); ``fp32_master`` names modules whose parameters keep a persistent fp32 master copy, ``rounding``
    (``"stochastic"`` or ``"kahan"``) says how every other bf16 parameter's update is rounded (None: to nearest,
    as without this helper). Returns the optimizer itself, with step hooks attached: the training loop is
    unchanged. See the module docstring for what each choice keeps in memory.
    """
    optimizer = build_optimizer if isinstance(build_optimizer, torch.optim.Optimizer) else build_optimizer(model)
    Bf16Updates(optimizer, model, rounding, fp32_master, compensation_dtype=compensation_dtype, seed=seed)
    return optimizer


def attach_for_arm(optimizer: torch.optim.Optimizer, model: nn.Module, arm: Arm) -> Bf16Updates | None:
    """The hooks an arm's recipe asks for (``fp32_master`` / ``update_rounding``), or None for plain rounding."""
    if not arm.fp32_master and arm.update_rounding is None:
        return None
    return Bf16Updates(optimizer, model, arm.update_rounding, arm.fp32_master)


__all__ = ["Bf16Updates", "attach_for_arm", "bf16_optimizer", "stochastic_round_bf16"]
