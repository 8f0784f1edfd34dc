"""Plain-torch specification of ``fastdiff::group_norm_silu`` (forward and backward).

    h     = x + emb[:, :, None, ...]                    (emb optional, (N, C))
    mean, rstd per (sample n, group g) over the C/G channels x spatial elements of h,
          in fp32 (fp64 for fp64 input), two-pass: rstd = 1/sqrt(var + eps), biased var
    n̂     = (h - mean) * rstd
    a     = n̂ * weight[c] + bias[c]                     (GroupNorm's affine, optional)
    z     = a * (1 + scale[n, c]) + shift[n, c]          (AdaGN scale-shift, optional)
    y     = silu(z) if act == "silu" else z

x is (N, C, *spatial) with any number of spatial dims.  The forward returns
y (x's dtype) and mean, rstd of shape (N, G) in the opmath dtype; they are
what the backward needs besides the inputs.

Per (n, c) the forward is y = act(h * alpha + beta) with
alpha = rstd w (1 + scale) and beta = (b - mean rstd w)(1 + scale) + shift,
which is how the kernels apply it after the statistics pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import opmath_dtype

ACTIVATIONS = ("silu", None)


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor, acc) -> Optional[torch.Tensor]:
    """(N, C) or (C,) -> broadcastable against (N, C, *spatial), in acc."""
    if t is None:
        return None
    return t.to(acc).reshape(*t.shape, *([1] * (x.dim() - 2)))


def group_norm_silu_forward(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    emb: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    act: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean, rstd); mean/rstd are (N, G) in the opmath dtype."""
    acc = opmath_dtype(x.dtype)
    n, c = x.shape[:2]
    h = x.to(acc)
    if emb is not None:
        h = h + _per_channel(emb, x, acc)
    groups = h.reshape(n, num_groups, -1)
    mean = groups.mean(dim=-1)
    var = (groups - mean[..., None]).square().mean(dim=-1)  # two-pass, biased
    rstd = torch.rsqrt(var + eps)
    normed = ((groups - mean[..., None]) * rstd[..., None]).reshape(h.shape)
    z = normed
    if weight is not None:
        z = z * _per_channel(weight, x, acc)
    if bias is not None:
        z = z + _per_channel(bias, x, acc)
    if scale is not None:
        z = z * (1 + _per_channel(scale, x, acc))
    if shift is not None:
        z = z + _per_channel(shift, x, acc)
    if act == "silu":
        z = torch.nn.functional.silu(z)
    return z.to(x.dtype), mean, rstd


def group_norm_silu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    emb: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    act: Optional[str],
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients (dx, dweight, dbias, demb, dscale, dshift) from the saved statistics.

    With a = n̂ w + b, z = a (1 + scale) + shift and dz = dy act'(z):
        dshift = Σ_s dz,  dscale = Σ_s dz a,  da = dz (1 + scale)
        dw = Σ_{n,s} da n̂,  db = Σ_{n,s} da,  dn̂ = da w
        dh = rstd (dn̂ - mean_g(dn̂) - n̂ mean_g(dn̂ n̂)),  dx = dh,  demb = Σ_s dh
    Sums over n run in a fixed order (deterministic).  Gradients of absent
    inputs are None.
    """
    acc = opmath_dtype(x.dtype)
    n, c = x.shape[:2]
    spatial_dims = tuple(range(2, x.dim()))
    h = x.to(acc)
    if emb is not None:
        h = h + _per_channel(emb, x, acc)
    g_shape = (n, num_groups, -1)
    normed = ((h.reshape(g_shape) - mean[..., None]) * rstd[..., None]).reshape(h.shape)
    w = _per_channel(weight, x, acc)
    a = normed if w is None else normed * w
    if bias is not None:
        a = a + _per_channel(bias, x, acc)
    one_plus_scale = None if scale is None else 1 + _per_channel(scale, x, acc)
    dz = grad_y.to(acc)
    if act == "silu":
        z = a if one_plus_scale is None else a * one_plus_scale
        if shift is not None:
            z = z + _per_channel(shift, x, acc)
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))

    def sum_spatial(t):
        return t.sum(dim=spatial_dims) if spatial_dims else t

    dshift = sum_spatial(dz).to(shift.dtype) if shift is not None else None
    dscale = sum_spatial(dz * a).to(scale.dtype) if scale is not None else None
    da = dz if one_plus_scale is None else dz * one_plus_scale
    dweight = sum_spatial(da * normed).sum(0).to(weight.dtype) if weight is not None else None
    dbias = sum_spatial(da).sum(0).to(bias.dtype) if bias is not None else None
    dnormed = da if w is None else da * w
    dn_g = dnormed.reshape(g_shape)
    n_g = normed.reshape(g_shape)
    dh = rstd[..., None] * (
        dn_g - dn_g.mean(dim=-1, keepdim=True) - n_g * (dn_g * n_g).mean(dim=-1, keepdim=True)
    )
    dh = dh.reshape(h.shape)
    demb = sum_spatial(dh).to(emb.dtype) if emb is not None else None
    return dh.to(x.dtype), dweight, dbias, demb, dscale, dshift
