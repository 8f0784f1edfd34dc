"""Plain-torch specification of ``fastdiff::attention`` (forward and backward).

Non-causal scaled dot-product attention per (batch b, head h), q (B, H, Nq, D),
k and v (B, H, Nk, D), computed in the opmath dtype (fp32; fp64 for fp64):

    s   = scale * q kᵀ                              (Nq, Nk),  scale = D^-0.5 by default
    lse = logsumexp(s, dim=-1)                       (Nq,)      saved for the backward
    p   = exp(s - lse[:, None])                      row softmax
    o   = p v                                        (Nq, D),   cast to q's dtype

    backward, from the saved lse and do = dL/do:
    dv    = pᵀ do                                    (Nk, D)
    dp    = do vᵀ                                    (Nq, Nk)
    delta = rowsum(do * o)   (= rowsum(p * dp))      (Nq,)
    ds    = p * (dp - delta[:, None])
    dq    = scale * ds k,   dk = scale * dsᵀ q

This is ``F.scaled_dot_product_attention`` without mask, dropout or causality.
An empty key set (Nk = 0) gives o = 0 and lse = -inf, as SDPA does.

The score matrix is materialised a chunk of query rows at a time, at most
``ELEMS_PER_CHUNK`` scores over all (b, h), so memory stays bounded for long
sequences.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import opmath_dtype

# Scores materialised at once by the chunked reference (64 MiB in fp32).
ELEMS_PER_CHUNK = 1 << 24


def default_scale(head_dim: int) -> float:
    """D^-0.5, SDPA's default softmax scale."""
    return head_dim**-0.5


def _row_chunks(q: torch.Tensor, k: torch.Tensor, elems: int) -> tuple[range, int]:
    """(chunk starts, query rows per chunk): a chunk's B x H x rows x Nk
    scores number at most ``elems`` (or one row)."""
    b, h, nq, _ = q.shape
    rows = max(1, elems // max(b * h * k.shape[-2], 1))
    return range(0, nq, rows), rows


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    elems_per_chunk: int = ELEMS_PER_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o, lse): o (B, H, Nq, D) in q's dtype, lse (B, H, Nq) in opmath."""
    acc = opmath_dtype(q.dtype)
    k_t, v_ = k.to(acc).transpose(-1, -2), v.to(acc)  # (B, H, D, Nk), (B, H, Nk, D)
    o = q.new_empty(q.shape, dtype=acc)
    lse = q.new_empty(q.shape[:-1], dtype=acc)
    starts, rows = _row_chunks(q, k, elems_per_chunk)
    for m0 in starts:
        s = (q[..., m0:m0 + rows, :].to(acc) @ k_t) * scale  # (B, H, rows, Nk)
        lse_c = torch.logsumexp(s, dim=-1)  # -inf for Nk = 0
        p = torch.exp(s - lse_c[..., None])
        o[..., m0:m0 + rows, :] = p @ v_
        lse[..., m0:m0 + rows] = lse_c
    return o.to(q.dtype), lse


def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float,
                  elems_per_chunk: int = ELEMS_PER_CHUNK) -> torch.Tensor:
    """lse (B, H, Nq) in opmath alone (what a backend without one adds to SDPA's o)."""
    acc = opmath_dtype(q.dtype)
    k_t = k.to(acc).transpose(-1, -2)  # (B, H, D, Nk)
    starts, rows = _row_chunks(q, k, elems_per_chunk)
    lse = q.new_empty(q.shape[:-1], dtype=acc)
    for m0 in starts:
        lse[..., m0:m0 + rows] = torch.logsumexp((q[..., m0:m0 + rows, :].to(acc) @ k_t) * scale, dim=-1)
    return lse


def attention_backward(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    elems_per_chunk: int = ELEMS_PER_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes from the saved o and lse (module docstring).

    dk and dv are summed over the query chunks in order (deterministic).
    """
    acc = opmath_dtype(q.dtype)
    k_, v_ = k.to(acc), v.to(acc)  # (B, H, Nk, D)
    dq = q.new_empty(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    starts, rows = _row_chunks(q, k, elems_per_chunk)
    for m0 in starts:
        rs = slice(m0, m0 + rows)
        q_c, do_c = q[..., rs, :].to(acc), grad_o[..., rs, :].to(acc)  # (B, H, rows, D)
        p = torch.exp((q_c @ k_.transpose(-1, -2)) * scale - lse[..., rs, None])  # (B, H, rows, Nk)
        delta = (do_c * o[..., rs, :].to(acc)).sum(dim=-1, keepdim=True)  # (B, H, rows, 1)
        ds = p * (do_c @ v_.transpose(-1, -2) - delta)
        dv += p.transpose(-1, -2) @ do_c
        dk += ds.transpose(-1, -2) @ q_c
        dq[..., rs, :] = ds @ k_
    return (dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """o of :func:`attention_forward`, differentiable by torch autograd (tests' truth in fp64)."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    acc = opmath_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    return (torch.softmax(s, dim=-1) @ v.to(acc)).to(q.dtype)
