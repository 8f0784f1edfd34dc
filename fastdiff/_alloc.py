"""Output allocation for every op, in one place.

Tests switch on NaN poisoning (``fastdiff.testing.poisoned_outputs``) so that a
kernel that forgets to write an element of its output fails loudly instead of
passing on whatever the allocator left there.
"""

from __future__ import annotations

import contextvars

import torch

_poison: contextvars.ContextVar[bool] = contextvars.ContextVar("fastdiff_poison", default=False)


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch.empty_like(t, **kwargs)
    if _poison.get() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poison.get() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def poisoning() -> bool:
    """Whether outputs are to be NaN-poisoned (then ops allocate them here, in Python)."""
    return _poison.get()
