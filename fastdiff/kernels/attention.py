"""Triton backend of ``fastdiff::attention``: FlashAttention-2, forward and backward.

The math is specified by :mod:`fastdiff.reference.attention`.  The op layer
(:mod:`fastdiff.ops.attention`) hands over q (B, H, Nq, D), k and v
(B, H, Nk, D) with any strides (views of a fused qkv projection are read in
place), fp16 / bf16 / fp32, 1 <= D <= 256 (the largest BD in
:data:`CONFIGS`), Nk >= 1, and preallocated outputs; lse and the backward's delta are contiguous (B, H, Nq)
fp32.

Kernels (one program per tile; the tiles of one (b, h) have adjacent program
ids so they run together and share k / v through L2):

* forward, grid (B * H * cdiv(Nq, BM),): a [BM, D] query tile stays in
  registers while the loop streams [BN, D] key / value tiles: scores in log2
  units (scale * log2(e) folded in, ``exp2``), running row max m and row sum
  l, unnormalised output rescaled by exp2(m_old - m_new) -- all fp32.  Writes
  o = acc / l and lse = ln(2) (m + log2 l), the natural-log logsumexp of the
  reference.
* backward (recompute from lse, no atomics, deterministic):
  ``delta`` kernel, grid (B * H * cdiv(Nq, BM),): delta = rowsum(do * o);
  ``dkdv`` kernel, grid (B * H * cdiv(Nk, BN),): a [BN, D] key / value tile
  stays resident while the loop streams query tiles, working on transposed
  scores pᵀ = exp2(k qᵀ - lse) so that dv += pᵀ do and dk += dsᵀ q need no
  transposes of the accumulators;
  ``dq`` kernel, grid (B * H * cdiv(Nq, BM),): a query tile streams the key
  tiles, dq += ds k.

Head dims: D is a constexpr; tiles are padded to BD = max(16, next_pow2(D))
columns (16 is tl.dot's minimum) and masked, so 40 -> 64, 72 / 80 -> 128,
160 -> 256.  Padded columns load as 0 and add nothing to any dot product.

Sequence tails: a partial key tile is handled by a separate, masked last
step of the forward and dq loops (scores -inf / probabilities 0 beyond Nk),
so full tiles pay no masking.  In the dkdv kernel a partial query tile needs
no mask: its padded rows load q = do = 0, delta = 0 and lse = +inf, hence
probability exp2(-inf) = 0.

Strides: batch, head and row strides are passed divided by ``A``, the largest
power of two <= 16 dividing all of them, and multiplied back by the constexpr
``A`` in the kernel: Triton then knows every row starts on an A-element
boundary (it only learns divisibility by 16 from int arguments), so rows of
D = 40 / 72 (row stride 40 / 72, not a multiple of 16) still load as 16-byte
vectors (sm_90 PTX: 16-byte cp.async with the hint, 2-byte scalar loads and
twice the registers without).  Offsets inside a (b, h) slice are int32 (the
op checks the extent); slice origins are int64.  The streamed tiles'
offsets are recomputed from the tile origin at every step rather than
carried as a pointer tensor (a [BN, BD] tensor of 64-bit pointers per
operand is what made the first version spill).

Dots accumulate in fp32.  fp32 inputs use IEEE fp32 products (no tf32), so
fp32 meets the 1e-4 relative bound.  Probabilities (and ds) are rounded to
the input dtype before their dot, as in FlashAttention.  Under the
interpreter bf16 operands are rounded by hand (``round_to``: it truncates
otherwise) and multiplied as fp32, because its dot would multiply the raw
bf16 bit patterns; on GPUs the native conversions and bf16 MMAs do the same
arithmetic.

Block sizes come from :data:`CONFIGS`, a fixed table keyed by BD and
"fp32 or 16-bit" (no autotuning: each config compiles once, and the
interpreter runs only one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_guard, next_power_of_2, round_to
from .._alloc import empty, empty_like
from .._backend import triton_interpret

__all__ = [
    "CONFIGS",
    "Config",
    "attention_bwd_kernel_delta",
    "attention_bwd_kernel_dkdv",
    "attention_bwd_kernel_dq",
    "attention_bwd_triton",
    "attention_fwd_kernel",
    "attention_fwd_triton",
    "block_d",
    "configs_for",
]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Stride alignment hint cap (elements): 16 fp16 / 32 bytes covers a vector load.
MAX_ALIGN = 16
# Query rows per program of the delta kernel.
DELTA_BLOCK_M = 64


@dataclass(frozen=True)
class Config:
    """Tile sizes of one kernel: ``block_m`` query rows, ``block_n`` key rows."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (BD, fp32 inputs) -> (forward, backward dkdv, backward dq).  Chosen without
# a GPU to time them: every candidate was compiled for sm_90 (Triton 3.9,
# ptxas, unit column strides as launches specialise them) and, per head dim,
# the largest tiles were kept that use wgmma, fit H100's shared memory with
# their pipeline stages and spill no registers (the noted exceptions spill
# least).  16-bit: forward 128 x 64, the backward's dkdv a 128-key resident
# tile streaming 32-query tiles (the Triton fused-attention tutorial's
# shapes).  fp32 dots are IEEE FMA loops (no tensor cores) whose operands
# take far more registers: 16 x 16 / 32 x 32 tiles.
_C = Config
CONFIGS: dict[tuple[int, bool], tuple[Config, Config, Config]] = {
    (16, False): (_C(128, 64, 4, 3), _C(32, 128, 4, 5), _C(128, 32, 4, 5)),
    (32, False): (_C(128, 64, 4, 3), _C(32, 128, 4, 5), _C(128, 32, 4, 5)),
    (64, False): (_C(128, 64, 8, 3), _C(32, 128, 8, 4), _C(128, 64, 8, 3)),
    (128, False): (_C(128, 64, 8, 3), _C(32, 128, 8, 4), _C(128, 64, 8, 3)),
    (256, False): (_C(64, 32, 8, 2), _C(32, 32, 8, 2), _C(64, 32, 8, 2)),
    (16, True): (_C(32, 32, 8, 2), _C(32, 32, 8, 2), _C(32, 32, 8, 2)),
    (32, True): (_C(32, 32, 8, 2), _C(32, 32, 8, 2), _C(32, 32, 8, 2)),
    (64, True): (_C(16, 16, 8, 2), _C(32, 32, 8, 2), _C(16, 16, 8, 2)),
    (128, True): (_C(16, 16, 8, 2), _C(16, 16, 8, 2), _C(16, 16, 8, 2)),  # dq spills 192 B
    (256, True): (_C(16, 16, 8, 2), _C(16, 16, 8, 2), _C(16, 16, 8, 2)),  # fwd 256 B, dq 2 KB
}
del _C


def block_d(head_dim: int) -> int:
    """Padded head dim BD: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


def configs_for(head_dim: int, dtype: torch.dtype) -> tuple[Config, Config, Config]:
    """(forward, dkdv, dq) configs for head dim D and the inputs' dtype."""
    return CONFIGS[(block_d(head_dim), dtype == torch.float32)]


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------


@triton.jit
def _dot(b_a, b_b, FP32: tl.constexpr):
    """b_a @ b_b in fp32.  FP32: operands as fp32 with IEEE products (fp32
    inputs, and bf16 ones under the interpreter)."""
    if FP32:
        b_c = tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision="ieee")
    else:
        b_c = tl.dot(b_a, b_b)
    return b_c


@triton.jit
def _operand(b_x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 block b_x rounded to nearest in ``dtype`` for a dot (by hand under
    the interpreter, which truncates bf16)."""
    if INTERPRET:
        b_x = round_to(b_x, dtype)
    else:
        b_x = b_x.to(dtype)
    return b_x


@triton.jit
def _slice(i_bh, H, s_b, s_h, A: tl.constexpr):
    """int64 offset of the (b, h) slice origin, i_bh = b * H + h."""
    return ((i_bh // H) * s_b + (i_bh % H) * s_h) * A


@triton.jit
def _tile(o_r, o_d, s_n, s_d, A: tl.constexpr):
    """[R, BD] int32 offsets of rows o_r, columns o_d inside a slice."""
    return o_r[:, None] * (s_n * A) + o_d[None, :] * s_d


@triton.jit
def _fwd_step(b_q, b_k, b_v, b_acc, b_l, b_m, qk_scale, m_n,
              MASK_N: tl.constexpr, FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """Online softmax over one key tile; returns the new (acc, l, m).

    b_q [BM, BD], b_k / b_v [BN, BD]; b_acc [BM, BD], b_l / b_m [BM] fp32;
    m_n [BN] valid keys (used when MASK_N).
    """
    b_s = _dot(b_q, tl.trans(b_k), FP32) * qk_scale  # [BM, BN] log2 units
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))  # [BM]
    b_alpha = tl.exp2(b_m - b_m_new)  # [BM], 0 on the first tile
    b_p = tl.exp2(b_s - b_m_new[:, None])  # [BM, BN]
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + _dot(_operand(b_p, b_v.dtype, INTERPRET), b_v, FP32)
    return b_acc, b_l, b_m_new


@triton.jit
def _dq_step(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, qk_scale, m_n,
             MASK_N: tl.constexpr, FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """dq (unscaled) += ds k over one key tile.

    b_q / b_do [BM, BD], b_k / b_v [BN, BD], b_lse (log2 units) / b_delta [BM].
    """
    b_p = tl.exp2(_dot(b_q, tl.trans(b_k), FP32) * qk_scale - b_lse[:, None])  # [BM, BN]
    if MASK_N:
        b_p = tl.where(m_n[None, :], b_p, 0)
    b_dp = _dot(b_do, tl.trans(b_v), FP32)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + _dot(_operand(b_ds, b_k.dtype, INTERPRET), b_k, FP32)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def attention_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    H,
    NQ,
    NK,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    A: tl.constexpr,
    FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """o and lse of query tile i_m of slice (b, h).  Grid: (B * H * cdiv(NQ, BM),)."""
    i = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(NQ, BM)
    i_bh, i_m = i // n_m, i % n_m
    qk_scale = scale * LOG2E

    o_r = tl.arange(0, BM)  # [BM] rows of the tile
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_m = i_m * BM + o_r < NQ
    m_d = o_d < D
    m_q = m_m[:, None] & m_d[None, :]  # [BM, BD]
    p_q = q + _slice(i_bh, H, s_qb, s_qh, A) + i_m * BM * s_qn * A + _tile(o_r, o_d, s_qn, s_qd, A)
    b_q = tl.load(p_q, mask=m_q, other=0)  # [BM, BD]
    p_k = k + _slice(i_bh, H, s_kb, s_kh, A)
    p_v = v + _slice(i_bh, H, s_vb, s_vh, A)

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    n_full = NK - NK % BN
    for n0 in range(0, n_full, BN):
        b_k = tl.load(p_k + _tile(n0 + o_n, o_d, s_kn, s_kd, A), mask=m_d[None, :], other=0)  # [BN, BD]
        b_v = tl.load(p_v + _tile(n0 + o_n, o_d, s_vn, s_vd, A), mask=m_d[None, :], other=0)
        b_acc, b_l, b_m = _fwd_step(b_q, b_k, b_v, b_acc, b_l, b_m, qk_scale, o_n,
                                    False, FP32, INTERPRET)  # full tile: o_n unused
    if n_full < NK:
        m_n = n_full + o_n < NK
        m_kv = m_n[:, None] & m_d[None, :]  # [BN, BD]
        b_k = tl.load(p_k + _tile(n_full + o_n, o_d, s_kn, s_kd, A), mask=m_kv, other=0)
        b_v = tl.load(p_v + _tile(n_full + o_n, o_d, s_vn, s_vd, A), mask=m_kv, other=0)
        b_acc, b_l, b_m = _fwd_step(b_q, b_k, b_v, b_acc, b_l, b_m, qk_scale, m_n,
                                    True, FP32, INTERPRET)

    b_o = b_acc / b_l[:, None]
    p_o = o + _slice(i_bh, H, s_ob, s_oh, A) + i_m * BM * s_on * A + _tile(o_r, o_d, s_on, s_od, A)
    tl.store(p_o, round_to(b_o, o.dtype.element_ty), mask=m_q)
    tl.store(lse + i_bh * NQ + i_m * BM + o_r, (b_m + tl.log2(b_l)) * LN2, mask=m_m)


@triton.jit
def attention_bwd_kernel_delta(
    o,
    do,
    delta,
    s_ob, s_oh, s_on, s_od,
    s_db, s_dh, s_dn, s_dd,
    H,
    NQ,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    A: tl.constexpr,
):
    """delta = rowsum(do * o) (fp32) of query tile i_m.  Grid: (B * H * cdiv(NQ, BM),)."""
    i = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(NQ, BM)
    i_bh, i_m = i // n_m, i % n_m
    o_r = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = i_m * BM + o_r < NQ
    m = m_m[:, None] & (o_d < D)[None, :]  # [BM, BD]
    p_o = o + _slice(i_bh, H, s_ob, s_oh, A) + i_m * BM * s_on * A + _tile(o_r, o_d, s_on, s_od, A)
    p_do = do + _slice(i_bh, H, s_db, s_dh, A) + i_m * BM * s_dn * A + _tile(o_r, o_d, s_dn, s_dd, A)
    b_o = tl.load(p_o, mask=m, other=0).to(tl.float32)
    b_do = tl.load(p_do, mask=m, other=0).to(tl.float32)
    tl.store(delta + i_bh * NQ + i_m * BM + o_r, tl.sum(b_o * b_do, axis=1), mask=m_m)


@triton.jit
def attention_bwd_kernel_dkdv(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dn, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    H,
    NQ,
    NK,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    A: tl.constexpr,
    FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dk, dv of key tile i_n of slice (b, h), streaming every query tile.

    Grid: (B * H * cdiv(NK, BN),).  Works on transposed scores [BN, BM].
    """
    i = tl.program_id(0).to(tl.int64)
    n_n = tl.cdiv(NK, BN)
    i_bh, i_n = i // n_n, i % n_n
    qk_scale = scale * LOG2E
    dtype = q.dtype.element_ty

    o_r = tl.arange(0, BN)  # [BN] key rows of the tile
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_kv = (i_n * BN + o_r < NK)[:, None] & m_d[None, :]  # [BN, BD]
    p_k = k + _slice(i_bh, H, s_kb, s_kh, A) + i_n * BN * s_kn * A + _tile(o_r, o_d, s_kn, s_kd, A)
    p_v = v + _slice(i_bh, H, s_vb, s_vh, A) + i_n * BN * s_vn * A + _tile(o_r, o_d, s_vn, s_vd, A)
    b_k = tl.load(p_k, mask=m_kv, other=0)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_kv, other=0)

    p_q = q + _slice(i_bh, H, s_qb, s_qh, A)
    p_do = do + _slice(i_bh, H, s_db, s_dh, A)
    p_lse = lse + i_bh * NQ
    p_delta = delta + i_bh * NQ
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for m0 in range(0, NQ, BM):
        m_m = m0 + o_m < NQ
        m_q = m_m[:, None] & m_d[None, :]  # [BM, BD]
        b_q = tl.load(p_q + _tile(m0 + o_m, o_d, s_qn, s_qd, A), mask=m_q, other=0)
        b_do = tl.load(p_do + _tile(m0 + o_m, o_d, s_dn, s_dd, A), mask=m_q, other=0)
        b_lse = tl.load(p_lse + m0 + o_m, mask=m_m, other=float("inf")) * LOG2E  # [BM]; +inf: p = 0
        b_delta = tl.load(p_delta + m0 + o_m, mask=m_m, other=0)
        b_pt = tl.exp2(_dot(b_k, tl.trans(b_q), FP32) * qk_scale - b_lse[None, :])  # [BN, BM]
        b_dv += _dot(_operand(b_pt, dtype, INTERPRET), b_do, FP32)
        b_dpt = _dot(b_v, tl.trans(b_do), FP32)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += _dot(_operand(b_dst, dtype, INTERPRET), b_q, FP32)

    p_dk = dk + _slice(i_bh, H, s_dkb, s_dkh, A) + i_n * BN * s_dkn * A + _tile(o_r, o_d, s_dkn, s_dkd, A)
    p_dv = dv + _slice(i_bh, H, s_dvb, s_dvh, A) + i_n * BN * s_dvn * A + _tile(o_r, o_d, s_dvn, s_dvd, A)
    tl.store(p_dk, round_to(b_dk * scale, dk.dtype.element_ty), mask=m_kv)
    tl.store(p_dv, round_to(b_dv, dv.dtype.element_ty), mask=m_kv)


@triton.jit
def attention_bwd_kernel_dq(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dn, s_dd,
    s_dqb, s_dqh, s_dqn, s_dqd,
    H,
    NQ,
    NK,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    A: tl.constexpr,
    FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dq of query tile i_m of slice (b, h), streaming every key tile.

    Grid: (B * H * cdiv(NQ, BM),).
    """
    i = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(NQ, BM)
    i_bh, i_m = i // n_m, i % n_m
    qk_scale = scale * LOG2E

    o_r = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_m = i_m * BM + o_r < NQ
    m_d = o_d < D
    m_q = m_m[:, None] & m_d[None, :]  # [BM, BD]
    p_q = q + _slice(i_bh, H, s_qb, s_qh, A) + i_m * BM * s_qn * A + _tile(o_r, o_d, s_qn, s_qd, A)
    p_do = do + _slice(i_bh, H, s_db, s_dh, A) + i_m * BM * s_dn * A + _tile(o_r, o_d, s_dn, s_dd, A)
    b_q = tl.load(p_q, mask=m_q, other=0)  # [BM, BD]
    b_do = tl.load(p_do, mask=m_q, other=0)
    b_lse = tl.load(lse + i_bh * NQ + i_m * BM + o_r, mask=m_m, other=0) * LOG2E  # [BM]
    b_delta = tl.load(delta + i_bh * NQ + i_m * BM + o_r, mask=m_m, other=0)
    p_k = k + _slice(i_bh, H, s_kb, s_kh, A)
    p_v = v + _slice(i_bh, H, s_vb, s_vh, A)

    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    n_full = NK - NK % BN
    for n0 in range(0, n_full, BN):
        b_k = tl.load(p_k + _tile(n0 + o_n, o_d, s_kn, s_kd, A), mask=m_d[None, :], other=0)  # [BN, BD]
        b_v = tl.load(p_v + _tile(n0 + o_n, o_d, s_vn, s_vd, A), mask=m_d[None, :], other=0)
        b_dq = _dq_step(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, qk_scale, o_n,
                        False, FP32, INTERPRET)  # full tile: o_n unused
    if n_full < NK:
        m_n = n_full + o_n < NK
        m_kv = m_n[:, None] & m_d[None, :]  # [BN, BD]
        b_k = tl.load(p_k + _tile(n_full + o_n, o_d, s_kn, s_kd, A), mask=m_kv, other=0)
        b_v = tl.load(p_v + _tile(n_full + o_n, o_d, s_vn, s_vd, A), mask=m_kv, other=0)
        b_dq = _dq_step(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, qk_scale, m_n,
                        True, FP32, INTERPRET)

    p_dq = dq + _slice(i_bh, H, s_dqb, s_dqh, A) + i_m * BM * s_dqn * A + _tile(o_r, o_d, s_dqn, s_dqd, A)
    tl.store(p_dq, round_to(b_dq * scale, dq.dtype.element_ty), mask=m_q)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _align(*tensors: torch.Tensor) -> int:
    """Largest power of two <= MAX_ALIGN dividing the batch, head and row
    strides of every tensor (the ``A`` of the kernels)."""
    g = 0
    for t in tensors:
        for s in t.stride()[:3]:
            g = math.gcd(g, s)
    a = MAX_ALIGN
    while g % a:
        a //= 2
    return a


def _strides(t: torch.Tensor, a: int) -> tuple[int, int, int, int]:
    """(batch, head, row) strides divided by ``a``, and the column stride."""
    s_b, s_h, s_n, s_d = t.stride()
    return s_b // a, s_h // a, s_n // a, s_d


def _fp32_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpret())


def attention_fwd_triton(q, k, v, scale: float, o, lse, *, config: Optional[Config] = None) -> None:
    """Writes o (B, H, Nq, D), any strides, and lse (B, H, Nq) fp32 contiguous.
    ``config`` overrides the table (tests use it to reach several tiles at
    small sizes)."""
    b, h, nq, d = q.shape
    cfg = config or configs_for(d, q.dtype)[0]
    a = _align(q, k, v, o)
    grid = (b * h * cdiv(nq, cfg.block_m),)
    with device_guard(q):
        attention_fwd_kernel[grid](
            q, k, v, o, lse, scale,
            *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(o, a),
            h, nq, k.shape[2],
            D=d, BD=block_d(d), BM=cfg.block_m, BN=cfg.block_n, A=a,
            FP32=_fp32_dots(q.dtype), INTERPRET=triton_interpret(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def attention_bwd_triton(do, q, k, v, o, lse, scale: float, dq, dk, dv, *,
                         configs: Optional[tuple[Config, Config]] = None) -> None:
    """Writes the gradients that are not None.  ``configs`` = (dkdv, dq)
    overrides the table."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    cfg_kv, cfg_q = configs or configs_for(d, q.dtype)[1:]
    delta = empty(b, h, nq, dtype=torch.float32, device=q.device)
    want_kv = dk is not None or dv is not None
    if want_kv:  # the dkdv kernel writes both; a gradient not asked for goes to scratch
        dk_ = dk if dk is not None else empty_like(k)
        dv_ = dv if dv is not None else empty_like(v)
    a = _align(q, k, v, do, o, *((dk_, dv_) if want_kv else ()), *((dq,) if dq is not None else ()))
    flags = dict(D=d, BD=block_d(d), A=a, FP32=_fp32_dots(q.dtype), INTERPRET=triton_interpret())
    with device_guard(q):
        attention_bwd_kernel_delta[(b * h * cdiv(nq, DELTA_BLOCK_M),)](
            o, do, delta, *_strides(o, a), *_strides(do, a), h, nq,
            D=d, BD=block_d(d), BM=DELTA_BLOCK_M, A=a,
        )
        if want_kv:
            attention_bwd_kernel_dkdv[(b * h * cdiv(nk, cfg_kv.block_n),)](
                q, k, v, do, lse, delta, dk_, dv_, scale,
                *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a),
                *_strides(dk_, a), *_strides(dv_, a),
                h, nq, nk, BM=cfg_kv.block_m, BN=cfg_kv.block_n, **flags,
                num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages,
            )
        if dq is not None:
            attention_bwd_kernel_dq[(b * h * cdiv(nq, cfg_q.block_m),)](
                q, k, v, do, lse, delta, dq, scale,
                *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a), *_strides(dq, a),
                h, nq, nk, BM=cfg_q.block_m, BN=cfg_q.block_n, **flags,
                num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages,
            )
