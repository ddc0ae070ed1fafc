"""Walking the batches a user's loader yields: tensors nested in tuples, lists, dicts, BatchEncodings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor in it moved to ``device``, keeping the container types."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]  # dict, OrderedDict, BatchEncoding, UserDict ...
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to) and not isinstance(batch, type):
        try:
            return batch.to(device)
        except Exception:
            return batch
    return batch


def cast_floating(batch: Any, dtype: torch.dtype) -> Any:
    """Return ``batch`` with every floating tensor in it cast to ``dtype`` (integer and boolean tensors, such as
    labels, token ids and masks, untouched), keeping the container types."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() and batch.dtype != dtype else batch
    if isinstance(batch, Mapping):
        cast = {k: cast_floating(v, dtype) for k, v in batch.items()}
        try:
            return type(batch)(cast)  # type: ignore[call-arg]
        except TypeError:
            return cast
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(cast_floating(v, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_floating(v, dtype) for v in batch)
    return batch


def casting_pre_hook(dtype: torch.dtype) -> Any:
    """A forward pre-hook (``register_forward_pre_hook(..., with_kwargs=True)``) that casts a module's floating
    inputs to ``dtype``: a bf16 model without autocast then takes what its caller hands it in fp32."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return cast_floating(args, dtype), cast_floating(kwargs, dtype)

    return hook


def iter_leaves(batch: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, leaf)`` for every leaf of a nested batch, in a stable order."""
    if isinstance(batch, Mapping):
        for k in sorted(batch.keys(), key=str):
            yield from iter_leaves(batch[k], f"{prefix}.{k}")
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            yield from iter_leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, batch


def batch_size(batch: Any) -> int | None:
    """The leading dimension of the first tensor in the batch, or None when it has no tensor."""
    for _, leaf in iter_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None
