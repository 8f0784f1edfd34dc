"""Plain-torch references: the specification of every fastdiff op."""

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op computes in: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32
