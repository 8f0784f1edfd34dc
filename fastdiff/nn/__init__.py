"""Drop-in modules: same constructor signatures and state_dict keys as what they replace."""

from .group_norm import GroupNorm

__all__ = ["GroupNorm"]
