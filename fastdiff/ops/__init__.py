"""Functional ops: ``torch.ops.fastdiff.*`` underneath, validated and dispatched."""

from .sampler_step import NUM_COEFS, sampler_step

__all__ = ["NUM_COEFS", "sampler_step"]
