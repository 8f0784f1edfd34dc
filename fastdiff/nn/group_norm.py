"""``fastdiff.nn.GroupNorm``: torch.nn.GroupNorm with the fused activation and conditioning."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.group_norm import group_norm_silu
from ..reference.group_norm import ACTIVATIONS


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` plus an optional fused SiLU and AdaGN conditioning.

    Same constructor arguments (``act`` added last) and the same parameters and
    state_dict keys (``weight``, ``bias``), so it replaces ``nn.GroupNorm`` in
    any model and loads its checkpoints; it is an ``nn.GroupNorm`` instance.

    ``forward(x, emb=None, scale=None, shift=None)`` computes
    ``act(GN(x + emb) * (1 + scale) + shift)`` with emb/scale/shift of shape (N, C).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, act: Optional[str] = None, device=None, dtype=None):
        if act not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: act must be 'silu' or None, got {act!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps,
                               emb=emb, scale=scale, shift=shift, act=self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"
