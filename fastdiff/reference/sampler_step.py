"""Plain-torch specification of the fused sampler update ``fastdiff::sampler_step``.

Every sampler update of DDPM, DDIM, Euler / Euler-ancestral / Heun (EDM,
k-diffusion), DPM-Solver++(2M) and the forward process ``add_noise`` is linear
in at most five same-shaped tensors once the (per-sample) schedule
coefficients are known.  One elementwise pass therefore serves all of them:

    m   = model_output                                 (B, *S)
        | m_u + w (m_c - m_u)     with guidance_scale w and model_output = cat(m_u, m_c), (2B, *S)
    x0  = a_x x + a_m m + a_n n                         predicted clean sample
    x0  = clamp(x0, clip_min, clip_max)                 when a clip range is given
    out = c_x x + c_m m + c_0 x0 + c_p prev + c_q prev2 + c_n n

with x the current sample (B, *S), n the noise (a tensor, or Philox normals
from ``seed``; see :mod:`fastdiff.reference.philox`) and the nine
coefficients of sample b read from row ``index[b]`` of ``coefs`` (R, 9) (row
b when ``index`` is None).  Absent tensors contribute nothing.  Arithmetic is
in fp32 (fp64 for fp64 inputs); ``out`` and ``x0`` have x's dtype and shape.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import opmath_dtype
from .philox import philox_normal

# Column order of the coefficient table; the Triton, C++ and CUDA kernels use
# the same order (csrc/sampler_step.h).
A_X, A_M, A_N, C_X, C_M, C_0, C_P, C_Q, C_N = range(9)
NUM_COEFS = 9


def noise_from_seed(seed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """fp32 noise shaped like ``like`` (dense, in like's memory order, as the
    kernels write it): the element at memory position i is philox_normal(seed)[i]."""
    out = torch.empty_like(like, dtype=torch.float32)
    out.as_strided((out.numel(),), (1,)).copy_(
        philox_normal(seed, out.numel(), device=like.device)
    )
    return out


class _CoefColumns:
    """c(col) -> column ``col`` of each sample's coefficient row, shaped (B, 1, ...)."""

    def __init__(self, x: torch.Tensor, coefs: torch.Tensor, index: Optional[torch.Tensor]):
        self.acc = opmath_dtype(x.dtype)
        rows = coefs if index is None else coefs[index.long()]
        self.rows = rows.expand(x.shape[0], -1).to(self.acc)
        self.bshape = (x.shape[0],) + (1,) * (x.dim() - 1)

    def __call__(self, col: int) -> torch.Tensor:
        return self.rows[:, col].reshape(self.bshape)


def _guided(model_output, guidance_scale, batch: int, acc: torch.dtype):
    """The model output after classifier-free guidance (halves: uncond, cond)."""
    if model_output is None:
        return None
    m = model_output.to(acc)
    if guidance_scale is not None:
        m_u, m_c = m[:batch], m[batch:]
        m = m_u + guidance_scale * (m_c - m_u)
    return m


def _predict_x0(c: _CoefColumns, xf, m, noise) -> torch.Tensor:
    """x0 before clipping, in opmath precision."""
    x0 = c(A_X) * xf
    if m is not None:
        x0 = x0 + c(A_M) * m
    if noise is not None:
        x0 = x0 + c(A_N) * noise.to(c.acc)
    return x0


def _clip(x0: torch.Tensor, lo: Optional[float], hi: Optional[float]) -> torch.Tensor:
    if lo is None and hi is None:
        return x0
    return x0.clamp(lo, hi)


def sampler_step(
    x: torch.Tensor,
    model_output: Optional[torch.Tensor],
    coefs: torch.Tensor,
    index: Optional[torch.Tensor] = None,
    prev: Optional[torch.Tensor] = None,
    prev2: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    guidance_scale: Optional[float] = None,
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, x0)``; see the module docstring."""
    c = _CoefColumns(x, coefs, index)
    xf = x.to(c.acc)
    if noise is None and seed is not None:
        noise = noise_from_seed(seed, x)
    m = _guided(model_output, guidance_scale, x.shape[0], c.acc)
    x0 = _clip(_predict_x0(c, xf, m, noise), clip_min, clip_max)

    out = c(C_X) * xf + c(C_0) * x0
    for col, t in ((C_M, m), (C_P, prev), (C_Q, prev2), (C_N, noise)):
        if t is not None:
            out = out + c(col) * t.to(c.acc)
    return out.to(x.dtype), x0.to(x.dtype)


def sampler_step_backward(
    grad_out: Optional[torch.Tensor],
    grad_x0: Optional[torch.Tensor],
    x: torch.Tensor,
    model_output: Optional[torch.Tensor],
    coefs: torch.Tensor,
    index: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    guidance_scale: Optional[float],
    clip_min: Optional[float],
    clip_max: Optional[float],
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients of (out, x0) w.r.t. (x, model_output, prev, prev2, noise).

    ``needs`` says which of the five are wanted (others come back None).  The
    update is linear, so this is the transpose of the forward map; the clamp
    passes gradient where lo <= x0 <= hi (torch.clamp's rule).  Coefficients,
    index and seed get no gradient.
    """
    c = _CoefColumns(x, coefs, index)
    g_out = torch.zeros_like(x, dtype=c.acc) if grad_out is None else grad_out.to(c.acc)
    g0 = c(C_0) * g_out
    if grad_x0 is not None and grad_x0.numel() == x.numel():
        g0 = g0 + grad_x0.to(c.acc)
    noise_is_input = noise is not None
    if noise is None and seed is not None:
        noise = noise_from_seed(seed, x)
    if clip_min is not None or clip_max is not None:
        # The clamp passes gradient where lo <= x0 <= hi (torch.clamp's rule).
        m = _guided(model_output, guidance_scale, x.shape[0], c.acc)
        pre = _predict_x0(c, x.to(c.acc), m, noise)
        keep = torch.ones_like(pre, dtype=torch.bool)
        if clip_min is not None:
            keep &= pre >= clip_min
        if clip_max is not None:
            keep &= pre <= clip_max
        g0 = g0 * keep

    need_x, need_m, need_prev, need_prev2, need_noise = needs
    grad_x = (c(C_X) * g_out + c(A_X) * g0).to(x.dtype) if need_x else None
    grad_m = None
    if need_m and model_output is not None:
        g_m = c(C_M) * g_out + c(A_M) * g0
        if guidance_scale is not None:
            g_m = torch.cat([(1.0 - guidance_scale) * g_m, guidance_scale * g_m])
        grad_m = g_m.to(model_output.dtype)
    grad_prev = (c(C_P) * g_out).to(x.dtype) if need_prev else None
    grad_prev2 = (c(C_Q) * g_out).to(x.dtype) if need_prev2 else None
    grad_noise = None
    if need_noise and noise_is_input:
        grad_noise = (c(C_N) * g_out + c(A_N) * g0).to(x.dtype)
    return grad_x, grad_m, grad_prev, grad_prev2, grad_noise
