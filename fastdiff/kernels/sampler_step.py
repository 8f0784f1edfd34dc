"""Triton backend of ``fastdiff::sampler_step``.

The math is specified by :mod:`fastdiff.reference.sampler_step` and, for the
seeded noise, :mod:`fastdiff.reference.philox`.  The op layer
(:mod:`fastdiff.ops.sampler_step`) hands over canonical inputs: every tensor
but ``coefs`` / ``index`` / ``seed`` has out's dtype and strides and out is
dense with the batch outermost, so all of them are walked as flat arrays in
which sample b is the slice ``[b*F, (b+1)*F)``.

One program handles a tile of ``BLOCK_B`` samples x ``BLOCK_F`` elements per
sample: its samples' coefficient rows are loaded once and broadcast over the
tile, so no element gathers anything.  Large samples (the usual case) get
``BLOCK_B == 1``; many tiny samples (e.g. 2-D toy data) share a tile instead of
each leaving a mostly masked program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_guard, next_power_of_2, opmath_scalar, round_to, scalar_arg
from ..reference import philox as ref_philox
from ..reference import sampler_step as ref

__all__ = [
    "box_muller", "noise_words", "philox4x32", "sampler_step_fwd_kernel", "sampler_step_triton",
]

# Columns of a coefficient row, in the reference's order.
A_X = tl.constexpr(ref.A_X)
A_M = tl.constexpr(ref.A_M)
A_N = tl.constexpr(ref.A_N)
C_X = tl.constexpr(ref.C_X)
C_M = tl.constexpr(ref.C_M)
C_0 = tl.constexpr(ref.C_0)
C_P = tl.constexpr(ref.C_P)
C_Q = tl.constexpr(ref.C_Q)
C_N = tl.constexpr(ref.C_N)
NUM_COEFS = tl.constexpr(ref.NUM_COEFS)

PHILOX_M0 = tl.constexpr(ref_philox.PHILOX_M0)
PHILOX_M1 = tl.constexpr(ref_philox.PHILOX_M1)
PHILOX_W0 = tl.constexpr(ref_philox.PHILOX_W0)
PHILOX_W1 = tl.constexpr(ref_philox.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(ref_philox.PHILOX_ROUNDS)
TWO_POW_M24 = tl.constexpr(2.0**-24)
TWO_PI = tl.constexpr(2.0 * math.pi)

# Elements per program: 16 per thread at 4 warps, i.e. four 128-bit fp32 loads
# per input tensor in flight per thread, enough to keep HBM busy.
BLOCK = 2048
NUM_WARPS = 4
# CUDA caps grid dimensions 1 and 2 at 65535 (dimension 0 at 2**31 - 1).
MAX_GRID_1 = 65535


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: ``reference.philox.philox4x32``.

    The wrapping uint32 products and key increments are the algorithm, so they
    opt out of the overflow sanitizer (active under TRITON_DEBUG).
    """
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def noise_words(o, seed):
    """The Philox words of noise elements ``o`` (int64 tensor) of stream ``seed``
    (int64 scalar, its 64 bits taken as unsigned).

    counter = (lo32(o), hi32(o), 0, 0), key = (lo32(seed), hi32(seed)); casting
    int64 to uint32 keeps the low 32 bits.
    """
    c0 = o.to(tl.uint32)
    c1 = (o >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    return philox4x32(c0, c1, zero, zero, seed.to(tl.uint32), (seed >> 32).to(tl.uint32))


@triton.jit
def box_muller(w0, w1):
    """fp32 standard normal from two Philox words, as the reference computes it.

    u1 and u2 are exact; sqrt_rn is IEEE-rounded like torch's sqrt (tl.sqrt is
    an approximation) and log / cos lower to libdevice's accurate logf / cosf on
    NVIDIA GPUs, so the noise stays within an ulp or two of the reference's.
    """
    u1 = ((w0 >> 8) + 1).to(tl.float32) * TWO_POW_M24  # (0, 1]: log(u1) is finite
    u2 = (w1 >> 8).to(tl.float32) * TWO_POW_M24  # [0, 1)
    return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(u2 * TWO_PI)


# The scalars are not specialized on: as fp64 bit patterns (ints) they would
# otherwise compile a variant per value class (== 1, divisible by 16).
@triton.jit(do_not_specialize=["guidance_scale", "clip_min", "clip_max"])
def sampler_step_fwd_kernel(
    x,
    model_output,
    coefs,
    index,
    prev,
    prev2,
    noise,
    seed,
    out,
    x0_out,
    guidance_scale,
    clip_min,
    clip_max,
    N,
    B,
    F,
    R,
    HAS_M: tl.constexpr,
    HAS_CFG: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_PREV2: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_SEED: tl.constexpr,
    HAS_CLIP_MIN: tl.constexpr,
    HAS_CLIP_MAX: tl.constexpr,
    STORE_X0: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One sampler update over a tile of (BLOCK_B samples, BLOCK_F elements).

    x, prev, prev2, noise, out, x0_out: flat (N,) = (B*F,); model_output: (N,),
    or (2N,) = cat(uncond, cond) with HAS_CFG; coefs: (R, NUM_COEFS) in opmath
    dtype (fp64 for fp64 x, else fp32); index: (B,) int64; seed: (1,) int64.
    Absent tensors are dummy pointers never read (their HAS_* flag is False).
    Grid: (cdiv(F, BLOCK_F), T1, T2) with T1 * T2 >= cdiv(B, BLOCK_B) sample
    tiles; T1 <= 65535 (CUDA's limit), so T2 > 1 only for huge batches, whose
    surplus tiles are fully masked.
    """
    i_f = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    acc = coefs.dtype.element_ty

    # [BLOCK_B] samples of this tile and their coefficient rows
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    if HAS_INDEX:
        # The op layer checks the range; the clamp only keeps a bad index from
        # reading outside coefs.
        o_r = tl.load(index + o_b, mask=m_b, other=0)
        o_r = tl.minimum(tl.maximum(o_r, 0), R - 1)
    else:  # row b, or row 0 for every sample when there is one row (a kept step's)
        o_r = tl.where(R == 1, 0, o_b)
    p_c = coefs + o_r * NUM_COEFS
    # [BLOCK_B, 1] coefficient columns, broadcast over the tile's elements
    b_ax = tl.load(p_c + A_X, mask=m_b, other=0)[:, None]
    b_cx = tl.load(p_c + C_X, mask=m_b, other=0)[:, None]
    b_c0 = tl.load(p_c + C_0, mask=m_b, other=0)[:, None]

    # [BLOCK_F] element offsets within a sample
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = o_f < F
    # [BLOCK_B, BLOCK_F] flat element offsets and mask
    o = o_b[:, None] * F + o_f[None, :]
    m = m_b[:, None] & m_f[None, :]

    b_x = tl.load(x + o, mask=m).to(acc)
    b_x0 = b_ax * b_x
    b_o = b_cx * b_x
    if HAS_M:
        b_m = tl.load(model_output + o, mask=m).to(acc)
        if HAS_CFG:
            b_mc = tl.load(model_output + N + o, mask=m).to(acc)
            b_m = b_m + opmath_scalar(guidance_scale, FP64) * (b_mc - b_m)
        b_x0 += tl.load(p_c + A_M, mask=m_b, other=0)[:, None] * b_m
    if HAS_NOISE:
        b_n = tl.load(noise + o, mask=m).to(acc)
    if HAS_SEED:
        w0, w1, _, _ = noise_words(o, tl.load(seed))
        b_n = box_muller(w0, w1).to(acc)
    if HAS_NOISE or HAS_SEED:
        b_x0 += tl.load(p_c + A_N, mask=m_b, other=0)[:, None] * b_n
    # torch.clamp: NaN stays NaN (comparisons with NaN are false)
    if HAS_CLIP_MIN:
        b_lo = opmath_scalar(clip_min, FP64)
        b_x0 = tl.where(b_x0 < b_lo, b_lo, b_x0)
    if HAS_CLIP_MAX:
        b_hi = opmath_scalar(clip_max, FP64)
        b_x0 = tl.where(b_x0 > b_hi, b_hi, b_x0)

    # out, in the reference's order of terms
    b_o += b_c0 * b_x0
    if HAS_M:
        b_o += tl.load(p_c + C_M, mask=m_b, other=0)[:, None] * b_m
    if HAS_PREV:
        b_o += tl.load(p_c + C_P, mask=m_b, other=0)[:, None] * tl.load(prev + o, mask=m).to(acc)
    if HAS_PREV2:
        b_o += tl.load(p_c + C_Q, mask=m_b, other=0)[:, None] * tl.load(prev2 + o, mask=m).to(acc)
    if HAS_NOISE or HAS_SEED:
        b_o += tl.load(p_c + C_N, mask=m_b, other=0)[:, None] * b_n
    tl.store(out + o, round_to(b_o, out.dtype.element_ty), mask=m)
    if STORE_X0:
        tl.store(x0_out + o, round_to(b_x0, x0_out.dtype.element_ty), mask=m)


def _tile(batch: int, per_sample: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_F, num_warps): BLOCK_F covers a sample up to BLOCK
    elements and BLOCK_B fills the rest of the tile with samples."""
    block_f = min(next_power_of_2(per_sample), BLOCK)
    block_b = min(BLOCK // block_f, next_power_of_2(batch))
    num_warps = max(1, min(NUM_WARPS, block_b * block_f // 512))
    return block_b, block_f, num_warps


def sampler_step_triton(*, out, x0_out, x, model_output, coefs, index, prev, prev2,
                        noise, seed, guidance_scale, clip_min, clip_max) -> None:
    """Writes the sampler update into ``out`` (and x0 into ``x0_out`` unless None).

    Takes the op layer's canonical inputs (see the module docstring); CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1.  Nothing is read back to
    the host, so the launch can be captured in a CUDA graph.
    """
    n = out.numel()
    batch = out.shape[0]
    per_sample = n // batch
    block_b, block_f, num_warps = _tile(batch, per_sample)
    tiles = cdiv(batch, block_b)
    grid = (cdiv(per_sample, block_f), min(tiles, MAX_GRID_1),
            cdiv(tiles, MAX_GRID_1))
    fp64 = coefs.dtype == torch.float64
    with device_guard(out):
        sampler_step_fwd_kernel[grid](
            x,
            out if model_output is None else model_output,
            coefs,
            out if index is None else index,
            out if prev is None else prev,
            out if prev2 is None else prev2,
            out if noise is None else noise,
            out if seed is None else seed,
            out,
            out if x0_out is None else x0_out,
            scalar_arg(guidance_scale, fp64),
            scalar_arg(clip_min, fp64),
            scalar_arg(clip_max, fp64),
            n,
            batch,
            per_sample,
            coefs.shape[0],
            HAS_M=model_output is not None,
            HAS_CFG=guidance_scale is not None,
            HAS_INDEX=index is not None,
            HAS_PREV=prev is not None,
            HAS_PREV2=prev2 is not None,
            HAS_NOISE=noise is not None,
            HAS_SEED=seed is not None,
            HAS_CLIP_MIN=clip_min is not None,
            HAS_CLIP_MAX=clip_max is not None,
            STORE_X0=x0_out is not None,
            FP64=fp64,
            BLOCK_B=block_b,
            BLOCK_F=block_f,
            num_warps=num_warps,
        )
