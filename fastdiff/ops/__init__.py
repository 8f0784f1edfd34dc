"""Functional ops: ``torch.ops.fastdiff.*`` underneath, validated and dispatched.

The sampler updates all run through one fused op, ``sampler_step``; the
``*_step`` functions compute their per-sample coefficients on the device and
call it, and the ``*_coefs`` builders let a scheduler precompute whole tables.
"""

from .attention import attention
from .group_norm import group_norm_silu
from .linear_attention import linear_attention
from .rms_norm import rms_norm_silu
from .sampler_step import NUM_COEFS, sampler_step
from .steps import (
    PREDICTION_TYPES,
    add_noise,
    churn,
    ddim_coefs,
    ddim_step,
    ddpm_coefs,
    ddpm_step,
    dpmpp_2m_coefs,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_coefs,
    euler_step,
    heun_coefs,
    heun_step,
    sigma_x0_coefs,
)

__all__ = [
    "NUM_COEFS",
    "PREDICTION_TYPES",
    "add_noise",
    "attention",
    "churn",
    "ddim_coefs",
    "ddim_step",
    "ddpm_coefs",
    "ddpm_step",
    "dpmpp_2m_coefs",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "euler_coefs",
    "euler_step",
    "group_norm_silu",
    "heun_coefs",
    "heun_step",
    "linear_attention",
    "rms_norm_silu",
    "sampler_step",
    "sigma_x0_coefs",
]
