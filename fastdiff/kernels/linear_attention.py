"""Triton backend of ``fastdiff::linear_attention`` (forward and backward).

The math is specified by :mod:`fastdiff.reference.linear_attention`.  The op layer
(:mod:`fastdiff.ops.linear_attention`) hands over q (B, H, D, Nq), k (B, H, D, Nk),
v (B, H, E, Nk) with any strides (views of a fused qkv projection included) in
fp16/bf16/fp32, alpha = scale / Nk, and preallocated contiguous outputs.  Per head
(b, h) the kernels hold whole feature columns: D and E are padded to powers of two
BD, BE (>= 16, at most ``MAX_HEAD_DIM``); positions are walked in tiles of BN.

Forward (two passes, plus a combine when the first one is split):

* context pass, grid (B*H, K): each program streams its chunk of the Nk positions
  and keeps, per feature d, the running max m and sum l of the softmax over N,
  and the accumulator acc[d, e] = sum_n exp(k[d, n] - m[d]) v[e, n]; when a tile
  raises the max, l and acc are rescaled by exp(m_old - m_new) (online softmax).
  With one chunk (K == 1) it writes C = acc / l and lse = m + log l directly;
  otherwise the partial (m, l, acc) goes to a workspace and the combine kernel,
  grid (B*H,), merges the K partials in a fixed order.
* output pass, grid (B*H, cdiv(Nq, BN)): per tile of positions, the softmax of q
  over D (each column is in registers) and out = alpha C^T P.

Backward (same shape): a pass over Nq reduces dC = alpha P dO^T (split in K
chunks, combined in order; the combine also forms r = sum_e dC * C), then one pass,
grid (B*H, cdiv(max(Nq, Nk), BN)), writes per tile dq = P (dP - sum_d P dP) with
dP = alpha C dO, and dk = K (dC v - r), dv = dC^T K with K = exp(k - lse).  No
atomics: gradients are bit-reproducible.

Offsets.  A head's base offset is int64 (from the program id); offsets inside
a head are int32: the op layer sends heads spanning 2**31 elements or more to
the torch backend.

Precision.  Statistics and accumulators are fp32.  The matrix products run on
tf32 tensor cores with operands split as x = hi + lo (hi: x with its 13 low
mantissa bits cleared, exact in tf32): products of fp16/bf16 inputs, which are
exact in tf32, need two dots and fp32-only operands three, for ~2^-21 relative
error per product: fp32-class results at tensor-core speed (a plain bf16 or tf32
dot rounds the probabilities and the context to 8 or 10 mantissa bits; fp32 FMA
dots would make the op compute-bound at D = 32).  The Triton interpreter computes
every dot in fp32, so CPU tests check the split's algebra, not tf32 rounding.

K (the chunks of a reduction) is chosen so that B*H*K programs fill
``PROGRAMS_PER_SM`` programs per SM, with at least ``MIN_TILES_PER_CHUNK`` tiles
each: B*H is 16-32 for a DDPM U-Net at batch 4-8, far fewer than the SMs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_guard, next_power_of_2, round_to
from .._alloc import empty

__all__ = [
    "MAX_HEAD_DIM",
    "Plan",
    "linear_attention_bwd_kernel_combine",
    "linear_attention_bwd_kernel_dcontext",
    "linear_attention_bwd_kernel_dqkv",
    "linear_attention_bwd_triton",
    "linear_attention_fwd_kernel_combine",
    "linear_attention_fwd_kernel_context",
    "linear_attention_fwd_kernel_output",
    "linear_attention_fwd_triton",
    "plan_for",
]

# --------------------------------------------------------------------------
# Heuristics (module level: read at launch time, so tests may patch them)
# --------------------------------------------------------------------------

# Largest D or E: the [BD, BE] fp32 accumulator of a program (64 KiB at 128)
# stays in registers at 8 warps.
MAX_HEAD_DIM = 128
# Elements of the widest [BD or BE, BN] tile: sets BN (128 at D = 32, 64 at D = 128).
TILE = 8192
MAX_BLOCK_N = 128
# Bytes of one software-pipelining stage of the loops over positions (a [BD, BN]
# and a [BE, BN] input tile): Triton keeps ~3 stages plus the dot operands in
# shared memory, and 64 KiB stages (fp32 at D = E = 64, BN = 128) asked for
# 256 KiB, more than an H100 block may have (227 KiB).  32 KiB stages fit.
MAX_STAGE_BYTES = 32768
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
PROGRAMS_PER_SM = 2
MIN_TILES_PER_CHUNK = 4
# SM count assumed for CPU tensors (Triton interpreter).
INTERPRETER_SMS = 4


# --------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------


@triton.jit
def _split(b_x):
    """x = hi + lo (fp32), hi exact in tf32: x with its 13 low mantissa bits cleared."""
    b_hi = (b_x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return b_hi, b_x - b_hi


@triton.jit
def _dot(b_a, b_b, b_c, B_EXACT: tl.constexpr):
    """b_c + a @ b (b_c None: a @ b) of fp32 operands on tf32 tensor cores,
    ~2^-21 relative error per product: a is split in hi + lo, and so is b
    unless B_EXACT (b holds fp16 / bf16 values, exact in tf32)."""
    b_ah, b_al = _split(b_a)
    if B_EXACT:
        b_c = tl.dot(b_al, b_b, b_c, input_precision="tf32")
        b_c = tl.dot(b_ah, b_b, b_c, input_precision="tf32")
    else:
        b_bh, b_bl = _split(b_b)
        b_c = tl.dot(b_al, b_bh, b_c, input_precision="tf32")
        b_c = tl.dot(b_ah, b_bl, b_c, input_precision="tf32")
        b_c = tl.dot(b_ah, b_bh, b_c, input_precision="tf32")
    return b_c


@triton.jit
def _softmax_d(p_q, o_d, o_n, m_d, m_n, s_d, s_n):
    """[BD, BN] softmax over the D features of each position (column) of q.
    Padded features get probability 0; padded positions finite garbage."""
    b_q = tl.load(p_q + o_d[:, None] * s_d + o_n[None, :] * s_n,
                  mask=m_d[:, None] & m_n[None, :], other=0).to(tl.float32)
    b_q = tl.where(m_d[:, None], b_q, float("-inf"))
    b_e = tl.exp(b_q - tl.max(b_q, axis=0)[None, :])
    return b_e / tl.sum(b_e, axis=0)[None, :]


@triton.jit
def _head(i_bh, H, s_b, s_h):
    """Offset (int64) of head (b, h) = divmod(i_bh, H) in a strided (B, H, ., .) tensor."""
    return (i_bh // H) * s_b + (i_bh % H) * s_h


# --------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------


@triton.jit
def linear_attention_fwd_kernel_context(
    k,
    v,
    ws,
    context,
    lse,
    s_kb,
    s_kh,
    s_kd,
    s_kn,
    s_vb,
    s_vh,
    s_ve,
    s_vn,
    H,
    D,
    E,
    N,
    CN,
    EXACT: tl.constexpr,
    FINAL: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BN: tl.constexpr,
):
    """Online softmax statistics over positions [c*CN, min((c+1)*CN, N)) and the
    context accumulator of head i_bh.

    Grid: (B * H, K).  FINAL (K == 1): writes context[i_bh] = acc / l (D, E) and
    lse[i_bh] = m + log l (D,).  Otherwise writes the partial record
    (m [D], l [D], acc [D, E]) at ws[(i_bh * K + c) * (2 D + D E)].
    """
    i_bh, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    K = tl.num_programs(1)

    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    m_e = o_e < E
    n_base = i_c * CN
    n_end = tl.minimum(N - n_base, CN).to(tl.int32)  # valid positions in this chunk (>= 1)
    p_k = k + _head(i_bh, H, s_kb, s_kh) + n_base * s_kn
    p_v = v + _head(i_bh, H, s_vb, s_vh) + n_base * s_vn

    b_m = tl.full([BD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BD], dtype=tl.float32)
    b_acc = tl.zeros([BD, BE], dtype=tl.float32)
    for n0 in range(0, n_end, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_end
        # [BD, BN]: -inf at padded positions, 0 in padded feature rows
        b_k = tl.load(p_k + o_d[:, None] * s_kd + o_n[None, :] * s_kn,
                      mask=m_d[:, None] & m_n[None, :], other=float("-inf")).to(tl.float32)
        b_k = tl.where(m_d[:, None], b_k, 0)
        b_v = tl.load(p_v + o_e[:, None] * s_ve + o_n[None, :] * s_vn,
                      mask=m_e[:, None] & m_n[None, :], other=0).to(tl.float32)  # [BE, BN]
        b_mn = tl.maximum(b_m, tl.max(b_k, axis=1))  # [BD]
        # a feature whose keys are all -inf so far keeps m = -inf, l = 0, acc = 0
        b_ms = tl.where(b_mn == float("-inf"), 0, b_mn)
        b_p = tl.exp(b_k - b_ms[:, None])  # [BD, BN]
        b_r = tl.exp(b_m - b_ms)  # [BD] rescale of what was accumulated
        b_l = b_l * b_r + tl.sum(b_p, axis=1)
        b_acc = _dot(b_p, tl.trans(b_v), b_acc * b_r[:, None], EXACT)  # [BD, BE]
        b_m = b_mn

    o_de = o_d[:, None] * E + o_e[None, :]  # [BD, BE]
    m_de = m_d[:, None] & m_e[None, :]
    if FINAL:
        tl.store(lse + i_bh * D + o_d, b_m + tl.log(b_l), mask=m_d)
        tl.store(context + i_bh * D * E + o_de, b_acc / b_l[:, None], mask=m_de)
    else:
        p_ws = ws + (i_bh * K + i_c) * (2 * D + D * E)
        tl.store(p_ws + o_d, b_m, mask=m_d)
        tl.store(p_ws + D + o_d, b_l, mask=m_d)
        tl.store(p_ws + 2 * D + o_de, b_acc, mask=m_de)


@triton.jit
def linear_attention_fwd_kernel_combine(
    ws,
    context,
    lse,
    D,
    E,
    K,
    BD: tl.constexpr,
    BE: tl.constexpr,
):
    """Merges the K partial records of head i_bh, in order:
    M = max_c m_c, w_c = exp(m_c - M), l = sum_c w_c l_c, C = sum_c w_c acc_c / l.

    Grid: (B * H,).
    """
    i_bh = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    m_de = m_d[:, None] & (o_e < E)[None, :]
    o_de = o_d[:, None] * E + o_e[None, :]  # [BD, BE]
    rec = 2 * D + D * E
    p_ws = ws + i_bh * K * rec

    b_mx = tl.full([BD], float("-inf"), dtype=tl.float32)
    for c in range(0, K):
        b_mx = tl.maximum(b_mx, tl.load(p_ws + c * rec + o_d, mask=m_d, other=0))
    b_mx = tl.where(b_mx == float("-inf"), 0, b_mx)
    b_l = tl.zeros([BD], dtype=tl.float32)
    b_acc = tl.zeros([BD, BE], dtype=tl.float32)
    for c in range(0, K):
        b_w = tl.exp(tl.load(p_ws + c * rec + o_d, mask=m_d, other=0) - b_mx)  # [BD]
        b_l += b_w * tl.load(p_ws + c * rec + D + o_d, mask=m_d, other=1)  # padded rows: l > 0
        b_acc += b_w[:, None] * tl.load(p_ws + c * rec + 2 * D + o_de, mask=m_de, other=0)
    tl.store(lse + i_bh * D + o_d, b_mx + tl.log(b_l), mask=m_d)
    tl.store(context + i_bh * D * E + o_de, b_acc / b_l[:, None], mask=m_de)


@triton.jit(do_not_specialize=["alpha"])
def linear_attention_fwd_kernel_output(
    q,
    context,
    out,
    alpha,
    s_qb,
    s_qh,
    s_qd,
    s_qn,
    H,
    D,
    E,
    N,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BN: tl.constexpr,
):
    """out[i_bh][:, tile] = alpha C^T softmax_D(q[i_bh][:, tile]).

    Grid: (B * H, cdiv(Nq, BN)); out is contiguous (B, H, E, Nq).
    """
    i_bh, i_t = tl.program_id(0).to(tl.int64), tl.program_id(1)  # i_t: in-head, int32
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    o_n = i_t * BN + tl.arange(0, BN)
    m_d = o_d < D
    m_e = o_e < E
    m_n = o_n < N

    b_p = _softmax_d(q + _head(i_bh, H, s_qb, s_qh), o_d, o_n, m_d, m_n, s_qd, s_qn)  # [BD, BN]
    b_c = tl.load(context + i_bh * D * E + o_d[:, None] * E + o_e[None, :],
                  mask=m_d[:, None] & m_e[None, :], other=0)  # [BD, BE]
    b_o = _dot(tl.trans(b_c), b_p, None, False) * alpha  # [BE, BN]
    tl.store(out + i_bh * E * N + o_e[:, None] * N + o_n[None, :],
             round_to(b_o, out.dtype.element_ty), mask=m_e[:, None] & m_n[None, :])


# --------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["alpha"])
def linear_attention_bwd_kernel_dcontext(
    q,
    do,
    context,
    ws,
    dcontext,
    r,
    alpha,
    s_qb,
    s_qh,
    s_qd,
    s_qn,
    s_ob,
    s_oh,
    s_oe,
    s_on,
    H,
    D,
    E,
    N,
    CN,
    EXACT: tl.constexpr,
    FINAL: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BN: tl.constexpr,
):
    """acc = sum_n softmax_D(q)[:, n] dO[:, n]^T over positions [c*CN, min((c+1)*CN, N)).

    Grid: (B * H, K).  FINAL (K == 1): writes dC = alpha acc to dcontext[i_bh]
    (D, E) and r = sum_e dC * C to r[i_bh] (D,).  Otherwise writes acc to
    ws[(i_bh * K + c) * D * E].
    """
    i_bh, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    K = tl.num_programs(1)

    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    m_e = o_e < E
    n_base = i_c * CN
    n_end = tl.minimum(N - n_base, CN).to(tl.int32)
    p_q = q + _head(i_bh, H, s_qb, s_qh) + n_base * s_qn
    p_do = do + _head(i_bh, H, s_ob, s_oh) + n_base * s_on

    b_acc = tl.zeros([BD, BE], dtype=tl.float32)
    for n0 in range(0, n_end, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_end
        b_p = _softmax_d(p_q, o_d, o_n, m_d, m_n, s_qd, s_qn)  # [BD, BN]
        b_do = tl.load(p_do + o_e[:, None] * s_oe + o_n[None, :] * s_on,
                       mask=m_e[:, None] & m_n[None, :], other=0).to(tl.float32)  # [BE, BN]
        b_acc = _dot(b_p, tl.trans(b_do), b_acc, EXACT)  # [BD, BE]

    o_de = o_d[:, None] * E + o_e[None, :]
    m_de = m_d[:, None] & m_e[None, :]
    if FINAL:
        b_dc = b_acc * alpha
        b_c = tl.load(context + i_bh * D * E + o_de, mask=m_de, other=0)
        tl.store(dcontext + i_bh * D * E + o_de, b_dc, mask=m_de)
        tl.store(r + i_bh * D + o_d, tl.sum(b_dc * b_c, axis=1), mask=m_d)
    else:
        tl.store(ws + (i_bh * K + i_c) * D * E + o_de, b_acc, mask=m_de)


@triton.jit(do_not_specialize=["alpha"])
def linear_attention_bwd_kernel_combine(
    ws,
    context,
    dcontext,
    r,
    alpha,
    D,
    E,
    K,
    BD: tl.constexpr,
    BE: tl.constexpr,
):
    """dC = alpha sum_c acc_c (in order) and r = sum_e dC * C of head i_bh.

    Grid: (B * H,).
    """
    i_bh = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    m_de = m_d[:, None] & (o_e < E)[None, :]
    o_de = o_d[:, None] * E + o_e[None, :]  # [BD, BE]
    p_ws = ws + i_bh * K * D * E

    b_acc = tl.zeros([BD, BE], dtype=tl.float32)
    for c in range(0, K):
        b_acc += tl.load(p_ws + c * D * E + o_de, mask=m_de, other=0)
    b_dc = b_acc * alpha
    b_c = tl.load(context + i_bh * D * E + o_de, mask=m_de, other=0)
    tl.store(dcontext + i_bh * D * E + o_de, b_dc, mask=m_de)
    tl.store(r + i_bh * D + o_d, tl.sum(b_dc * b_c, axis=1), mask=m_d)


@triton.jit(do_not_specialize=["alpha"])
def linear_attention_bwd_kernel_dqkv(
    q,
    k,
    v,
    do,
    context,
    lse,
    dcontext,
    r,
    dq,
    dk,
    dv,
    alpha,
    s_qb,
    s_qh,
    s_qd,
    s_qn,
    s_kb,
    s_kh,
    s_kd,
    s_kn,
    s_vb,
    s_vh,
    s_ve,
    s_vn,
    s_ob,
    s_oh,
    s_oe,
    s_on,
    H,
    D,
    E,
    NQ,
    NK,
    EXACT: tl.constexpr,
    STORE_DQ: tl.constexpr,
    STORE_DK: tl.constexpr,
    STORE_DV: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BN: tl.constexpr,
):
    """dq over query tile i_t (if i_t * BN < Nq) and dk, dv over key tile i_t
    (if i_t * BN < Nk) of head i_bh.

    Grid: (B * H, cdiv(max(Nq, Nk), BN)); dq, dk, dv are contiguous.
    """
    i_bh, i_t = tl.program_id(0).to(tl.int64), tl.program_id(1)  # i_t: in-head, int32
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    o_n = i_t * BN + tl.arange(0, BN)
    m_d = o_d < D
    m_e = o_e < E
    o_de = o_d[:, None] * E + o_e[None, :]
    m_de = m_d[:, None] & m_e[None, :]

    if STORE_DQ:
        if i_t * BN < NQ:
            m_n = o_n < NQ
            b_p = _softmax_d(q + _head(i_bh, H, s_qb, s_qh), o_d, o_n, m_d, m_n, s_qd, s_qn)  # [BD, BN]
            b_do = tl.load(do + _head(i_bh, H, s_ob, s_oh) + o_e[:, None] * s_oe + o_n[None, :] * s_on,
                           mask=m_e[:, None] & m_n[None, :], other=0).to(tl.float32)  # [BE, BN]
            b_c = tl.load(context + i_bh * D * E + o_de, mask=m_de, other=0)  # [BD, BE]
            b_dp = _dot(b_c, b_do, None, EXACT) * alpha  # [BD, BN]
            b_dq = b_p * (b_dp - tl.sum(b_p * b_dp, axis=0)[None, :])
            tl.store(dq + i_bh * D * NQ + o_d[:, None] * NQ + o_n[None, :],
                     round_to(b_dq, dq.dtype.element_ty), mask=m_d[:, None] & m_n[None, :])

    if STORE_DK or STORE_DV:
        if i_t * BN < NK:
            m_n = o_n < NK
            b_k = tl.load(k + _head(i_bh, H, s_kb, s_kh) + o_d[:, None] * s_kd + o_n[None, :] * s_kn,
                          mask=m_d[:, None] & m_n[None, :], other=0).to(tl.float32)  # [BD, BN]
            b_lse = tl.load(lse + i_bh * D + o_d, mask=m_d, other=0)  # [BD]
            b_kk = tl.exp(b_k - b_lse[:, None])  # [BD, BN] softmax over N of k
            b_dc = tl.load(dcontext + i_bh * D * E + o_de, mask=m_de, other=0)  # [BD, BE]
            if STORE_DK:
                b_v = tl.load(v + _head(i_bh, H, s_vb, s_vh) + o_e[:, None] * s_ve + o_n[None, :] * s_vn,
                              mask=m_e[:, None] & m_n[None, :], other=0).to(tl.float32)  # [BE, BN]
                b_r = tl.load(r + i_bh * D + o_d, mask=m_d, other=0)  # [BD]
                b_dk = b_kk * (_dot(b_dc, b_v, None, EXACT) - b_r[:, None])  # [BD, BN]
                tl.store(dk + i_bh * D * NK + o_d[:, None] * NK + o_n[None, :],
                         round_to(b_dk, dk.dtype.element_ty), mask=m_d[:, None] & m_n[None, :])
            if STORE_DV:
                b_dv = _dot(tl.trans(b_dc), b_kk, None, False)  # [BE, BN]
                tl.store(dv + i_bh * E * NK + o_e[:, None] * NK + o_n[None, :],
                         round_to(b_dv, dv.dtype.element_ty), mask=m_e[:, None] & m_n[None, :])


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How a launch tiles the positions: tiles of ``block_n`` positions, each
    reduction over N (the context, the context's gradient) cut into at most
    ``chunks`` chunks of whole tiles (1: no workspace, no combine kernel)."""

    block_n: int
    chunks: int
    num_warps: int


def _block(n: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def plan_for(bh: int, d: int, e: int, n: int, num_sms: int, elem_size: int = 4) -> Plan:
    """The tiling for B*H = bh heads of D = d, E = e over n positions (the longer
    of Nq, Nk) of ``elem_size``-byte inputs on a device with ``num_sms`` SMs
    (see the module docstring)."""
    bd, be = _block(d), _block(e)
    block_n = max(MIN_BLOCK, min(MAX_BLOCK_N, TILE // max(bd, be), next_power_of_2(n)))
    while block_n > MIN_BLOCK and (bd + be) * block_n * elem_size > MAX_STAGE_BYTES:
        block_n //= 2
    tiles = cdiv(n, block_n)
    chunks = 1
    if bh < PROGRAMS_PER_SM * num_sms:
        chunks = min(cdiv(PROGRAMS_PER_SM * num_sms, bh), cdiv(tiles, MIN_TILES_PER_CHUNK))
    return Plan(block_n, max(1, chunks), 4 if bd * be <= 64 * 64 else 8)


def _chunking(n: int, plan: Plan) -> tuple[int, int]:
    """(CN, K): positions per chunk, a whole number of tiles, and chunk count."""
    cn = cdiv(cdiv(n, plan.chunks), plan.block_n) * plan.block_n
    return cn, cdiv(n, cn)


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Optional[Plan]) -> Plan:
    if plan is not None:
        return plan
    b, h, d, nq = q.shape
    return plan_for(b * h, d, v.shape[2], max(nq, k.shape[3]), _num_sms(q.device), q.element_size())


def _exact(q: torch.Tensor) -> bool:
    """fp16/bf16 inputs are exact tf32 operands; fp32 inputs must be split."""
    return q.dtype != torch.float32


def linear_attention_fwd_triton(q, k, v, alpha, out, context, lse, *,
                                plan: Optional[Plan] = None) -> None:
    """Writes out (B, H, E, Nq), context (B, H, D, E) and lse (B, H, D), all
    contiguous, the last two fp32.  ``plan`` forces a tiling."""
    b, h, d, nq = q.shape
    e, nk = v.shape[2], v.shape[3]
    plan = _plan(q, k, v, plan)
    bd, be, bn = _block(d), _block(e), plan.block_n
    cn, chunks = _chunking(nk, plan)
    kw = dict(BD=bd, BE=be, num_warps=plan.num_warps)
    with device_guard(q):
        ws = context
        if chunks > 1:
            ws = empty(b * h * chunks * (2 * d + d * e), dtype=torch.float32, device=q.device)
        linear_attention_fwd_kernel_context[(b * h, chunks)](
            k, v, ws, context, lse, *k.stride(), *v.stride(), h, d, e, nk, cn,
            EXACT=_exact(q), FINAL=chunks == 1, BN=bn, **kw,
        )
        if chunks > 1:
            linear_attention_fwd_kernel_combine[(b * h,)](ws, context, lse, d, e, chunks, **kw)
        linear_attention_fwd_kernel_output[(b * h, cdiv(nq, bn))](
            q, context, out, alpha, *q.stride(), h, d, e, nq, BN=bn, **kw,
        )


def linear_attention_bwd_triton(do, q, k, v, context, lse, alpha, dq, dk, dv, *,
                                plan: Optional[Plan] = None) -> None:
    """Writes every gradient that is not None (contiguous, in the inputs' dtype)."""
    b, h, d, nq = q.shape
    e, nk = v.shape[2], v.shape[3]
    plan = _plan(q, k, v, plan)
    bd, be, bn = _block(d), _block(e), plan.block_n
    kw = dict(BD=bd, BE=be, num_warps=plan.num_warps)
    dcontext = empty(b, h, d, e, dtype=torch.float32, device=q.device)
    r = empty(b, h, d, dtype=torch.float32, device=q.device)
    cn, chunks = _chunking(nq, plan)
    with device_guard(q):
        ws = dcontext
        if chunks > 1:
            ws = empty(b * h * chunks * d * e, dtype=torch.float32, device=q.device)
        linear_attention_bwd_kernel_dcontext[(b * h, chunks)](
            q, do, context, ws, dcontext, r, alpha, *q.stride(), *do.stride(), h, d, e, nq, cn,
            EXACT=_exact(q), FINAL=chunks == 1, BN=bn, **kw,
        )
        if chunks > 1:
            linear_attention_bwd_kernel_combine[(b * h,)](ws, context, dcontext, r, alpha, d, e, chunks, **kw)
        linear_attention_bwd_kernel_dqkv[(b * h, cdiv(max(nq, nk), bn))](
            q, k, v, do, context, lse, dcontext, r,
            q if dq is None else dq, k if dk is None else dk, v if dv is None else dv, alpha,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), h, d, e, nq, nk,
            EXACT=_exact(q), STORE_DQ=dq is not None, STORE_DK=dk is not None,
            STORE_DV=dv is not None, BN=bn, **kw,
        )
