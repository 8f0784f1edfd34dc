"""Plain-torch specification of ``fastdiff::rms_norm_silu`` (forward and backward).

The block of denoising-diffusion-pytorch 2.x's U-Net, ``F.normalize(x, dim=1)
* g * sqrt(C)`` (its RMSNorm), then the optional scale-shift and SiLU:

    norm  = ||x[n, :, s]||_2 per (sample n, position s), over the C channels,
            in fp32 (fp64 for fp64 input)
    rstd  = 1 / max(norm, eps)                         (F.normalize's clamp, not
                                                        rsqrt(mean(x²) + eps))
    x̂     = x * rstd
    z     = x̂ * sqrt(C) * weight[c] * (1 + scale[n, c]) + shift[n, c]
    y     = silu(z) if act == "silu" else z

weight is (C,), scale and shift are (N, C), each optional; x is (N, C,
*spatial) with any number of spatial dims.  The forward returns y (x's dtype)
and rstd of shape (N, *spatial) in the opmath dtype: what the backward needs
besides the inputs.

Per (n, c) the forward is y = act(x * rstd * g + shift) with the channel factor
g = sqrt(C) w (1 + scale), which is how the kernels apply it.

Clamped positions.  Where norm < eps, rstd is the constant 1 / eps and x̂ is x
scaled, so no gradient flows through the norm.  The backward tells such a
position from its saved rstd alone: rstd >= 1 / eps, with 1 / eps rounded in
the opmath dtype exactly as the forward rounds 1 / max(norm, eps) for
norm <= eps.  That agrees with autograd of F.normalize everywhere except when
norm lies within an ulp above eps, where rstd rounds to 1 / eps too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .group_norm import ACTIVATIONS, opmath_dtype

__all__ = ["ACTIVATIONS", "opmath_dtype", "rms_norm_silu_backward", "rms_norm_silu_forward"]


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor, acc) -> Optional[torch.Tensor]:
    """(N, C) or (C,) -> broadcastable against (N, C, *spatial), in acc."""
    if t is None:
        return None
    return t.to(acc).reshape(*t.shape, *([1] * (x.dim() - 2)))


def _channel_factor(x, weight, scale, acc) -> torch.Tensor:
    """g = sqrt(C) w (1 + scale), broadcastable against x (a scalar tensor when
    weight and scale are both absent)."""
    g = torch.tensor(math.sqrt(x.shape[1]), dtype=acc, device=x.device)
    if weight is not None:
        g = g * _per_channel(weight, x, acc)
    if scale is not None:
        g = g * (1 + _per_channel(scale, x, acc))
    return g


def rms_norm_silu_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    act: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd); rstd is (N, *spatial) in the opmath dtype."""
    acc = opmath_dtype(x.dtype)
    h = x.to(acc)
    norm = torch.linalg.vector_norm(h, dim=1)
    rstd = 1 / norm.clamp_min(eps)
    z = h * rstd.unsqueeze(1) * math.sqrt(x.shape[1])
    if weight is not None:
        z = z * _per_channel(weight, x, acc)
    if scale is not None:
        z = z * (1 + _per_channel(scale, x, acc))
    if shift is not None:
        z = z + _per_channel(shift, x, acc)
    if act == "silu":
        z = torch.nn.functional.silu(z)
    return z.to(x.dtype), rstd


def rms_norm_silu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    rstd: torch.Tensor,
    act: Optional[str],
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients (dx, dweight, dscale, dshift) from the saved rstd.

    With z = x̂ g + shift, g = sqrt(C) w (1 + scale) and dz = dy act'(z):
        dshift = Σ_s dz,  dscale = sqrt(C) w Σ_s dz x̂,
        dweight = Σ_{n,s} sqrt(C) (1 + scale) dz x̂,
        dx = rstd (dz g - x̂ Σ_c dz g x̂)    (unclamped positions)
        dx = rstd dz g                       (clamped: norm < eps)
    Sums over n run in a fixed order (deterministic).  Gradients of absent
    inputs are None.
    """
    acc = opmath_dtype(x.dtype)
    spatial_dims = tuple(range(2, x.dim()))
    r = rstd.unsqueeze(1)
    xh = x.to(acc) * r
    g = _channel_factor(x, weight, scale, acc)
    dz = grad_y.to(acc)
    if act == "silu":
        z = xh * g
        if shift is not None:
            z = z + _per_channel(shift, x, acc)
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))

    def sum_spatial(t):
        return t.sum(dim=spatial_dims) if spatial_dims else t

    root_c = math.sqrt(x.shape[1])
    dshift = sum_spatial(dz).to(shift.dtype) if shift is not None else None
    s2 = sum_spatial(dz * xh) if scale is not None or weight is not None else None
    dscale = None
    if scale is not None:
        w = root_c if weight is None else root_c * weight.to(acc)
        dscale = (s2 * w).to(scale.dtype)
    dweight = None
    if weight is not None:
        op = root_c if scale is None else root_c * (1 + scale.to(acc))
        dweight = (s2 * op).sum(0).to(weight.dtype)
    dxh = dz * g
    clamped = r >= 1 / torch.tensor(eps, dtype=acc)
    dot = (dxh * xh).sum(dim=1, keepdim=True)
    dx = r * (dxh - torch.where(clamped, 0, xh * dot))
    return dx.to(x.dtype), dweight, dscale, dshift
