"""Plain-torch specification of ``fastdiff::linear_attention`` (forward and backward).

The DDPM U-Net's ``LinearAttention`` (lucidrains' denoising-diffusion-pytorch) in its
(B, H, D, N) layout, per batch b and head h, with q (D, Nq), k (D, Nk), v (E, Nk):

    Q   = softmax(q, dim=-2) * scale         softmax over the D features of each position
    K   = softmax(k, dim=-1)                 softmax over the Nk positions of each feature
    V   = v / Nk
    ctx = K V^T                              (D, E)   einsum('bhdn,bhen->bhde', K, V)
    out = ctx^T Q                            (E, Nq)  einsum('bhde,bhdn->bhen', ctx, Q)

:func:`linear_attention_naive` is exactly that, with autograd; it is what the
gradients of every backend are checked against.  Nq may differ from Nk (the
U-Net's current release prepends learned memory keys/values to k and v); the
division is by Nk, the length the context averages over.

The op computes the same thing with the two scalars folded into one,
alpha = scale / Nk, and saves what the backward needs besides the inputs:

    lse = logsumexp(k, dim=-1)               (D,)      K = exp(k - lse)
    C   = K v^T                              (D, E)    the context without alpha
    out = alpha C^T softmax_D(q)

Backward, with P = softmax_D(q) and dO = grad_out (E, Nq):

    dC  = alpha P dO^T                       (D, E)    a reduction over Nq
    dP  = alpha C dO                         (D, Nq)
    dq  = P * (dP - sum_d P dP)              the softmax-over-D backward, per position
    dK  = dC v                               (D, Nk)
    r   = sum_n K dK = sum_e dC * C          (D,)      no extra pass over Nk
    dk  = K * (dK - r)                       the softmax-over-N backward, per feature
    dv  = dC^T K                             (E, Nk)

All math runs in the opmath dtype (fp32; fp64 for fp64 inputs); results are
returned in the inputs' dtype, the saved C and lse in the opmath dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import opmath_dtype


def default_scale(q: torch.Tensor) -> float:
    """D^-0.5 for q of shape (B, H, D, Nq)."""
    return q.shape[-2] ** -0.5


def linear_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: Optional[float] = None) -> torch.Tensor:
    """The literal formula (differentiable), in the opmath dtype; (B, H, E, Nq) in q's dtype."""
    dtype, acc = q.dtype, opmath_dtype(q.dtype)
    scale = default_scale(q) if scale is None else scale
    q = q.to(acc).softmax(dim=-2) * scale
    k = k.to(acc).softmax(dim=-1)
    v = v.to(acc) / v.shape[-1]
    context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, H, D, E)
    return torch.einsum("bhde,bhdn->bhen", context, q).to(dtype)


def softmaxes_and_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(P, K, C) in the opmath dtype: P = softmax_D(q) (B, H, D, Nq), K = softmax_N(k)
    (B, H, D, Nk) and C = K v^T (B, H, D, E), the context without alpha."""
    acc = opmath_dtype(q.dtype)
    kk = torch.softmax(k.to(acc), dim=-1)
    p = torch.softmax(q.to(acc), dim=-2)
    return p, kk, kk @ v.to(acc).transpose(-1, -2)


def output(p: torch.Tensor, context: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """out = alpha C^T P (B, H, E, Nq) in ``dtype``."""
    return ((context * alpha).transpose(-1, -2) @ p).to(dtype)


def linear_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, C, lse): out (B, H, E, Nq) in q's dtype; C = softmax(k) v^T (B, H, D, E)
    and lse = logsumexp(k) (B, H, D) in the opmath dtype."""
    p, kk, context = softmaxes_and_context(q, k, v)
    return output(p, context, scale / k.shape[-1], q.dtype), context, lse_from_softmax(k, kk)


def lse_from_softmax(k: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
    """logsumexp_N(k) (B, H, D) given K = softmax_N(k): max_n k - log max_n K.  The
    largest K is exp(0) / sum exp(k - max) >= 1 / Nk (no underflow); two max passes
    cost less than logsumexp + exp."""
    return k.to(kk.dtype).amax(dim=-1) - torch.log(kk.amax(dim=-1))


def linear_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[torch.Tensor], ...]:
    """(dq, dk, dv) in the inputs' dtype (None where ``output_mask`` is False) from the
    saved C and lse (module docstring).  K is recomputed as softmax(k): the values of
    exp(k - lse), and the bits of the forward's K, so a backward from kept softmaxes
    (:func:`backward_from_softmaxes`) gives exactly these gradients."""
    acc = context.dtype
    p = torch.softmax(q.to(acc), dim=-2)  # (B, H, D, Nq)
    kk = torch.softmax(k.to(acc), dim=-1) if output_mask[1] or output_mask[2] else None
    return backward_from_softmaxes(grad_out, p, kk, v, context, scale / k.shape[-1], output_mask)


def backward_from_softmaxes(
    grad_out: torch.Tensor,
    p: torch.Tensor,
    kk: torch.Tensor,
    v: torch.Tensor,
    context: torch.Tensor,
    alpha: float,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[torch.Tensor], ...]:
    """(dq, dk, dv) in v's dtype (None where ``output_mask`` is False) from P, K and C
    (:func:`softmaxes_and_context`)."""
    acc = context.dtype
    do = grad_out.to(acc)  # (B, H, E, Nq)
    dq = dk = dv = None
    if output_mask[0]:
        dp = (context * alpha) @ do  # (B, H, D, Nq)
        # ATen's fused softmax backward: dq = p * (dp - sum_d p dp)
        dq = torch._softmax_backward_data(dp, p, -2, acc).to(v.dtype)
    if output_mask[1] or output_mask[2]:
        dcontext = (p @ do.transpose(-1, -2)) * alpha  # (B, H, D, E)
        if output_mask[1]:
            # dk = K * (dK - r), r = sum_n K dK (the kernels form r as sum_e dC * C)
            dk = torch._softmax_backward_data(dcontext @ v.to(acc), kk, -1, acc).to(v.dtype)
        if output_mask[2]:
            dv = (dcontext.transpose(-1, -2) @ kk).to(v.dtype)  # (B, H, E, Nk)
    return dq, dk, dv
