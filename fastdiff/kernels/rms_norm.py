"""Triton backend of ``fastdiff::rms_norm_silu`` (forward and backward).

The math is specified by :mod:`fastdiff.reference.rms_norm`.  The op layer
(:mod:`fastdiff.ops.rms_norm`) hands over canonical inputs: x (and dy, y, dx)
is (N, C, *spatial), dense, contiguous or channels_last(_3d) -- all of them in
x's layout; weight / scale / shift are None or contiguous in the opmath dtype
(fp32; fp64 for fp64 x); rstd is (N, S) contiguous; outputs are preallocated.

Indexing.  With S = prod(spatial) and ``CHANNELS_LAST`` the layout flag,
element (n, c, s) lies at ``n*C*S + c*S + s`` (contiguous) or
``n*C*S + s*C + c`` (channels_last).  The norm reduces over c, so a program
owns a block of BP positions of one sample, grid (N, K = cdiv(S, BP)), and
walks its channels in [BC, BP] tiles (channels x positions); per-position
values (rstd, the backward's dot) are [BP] vectors broadcast down the tile's
columns, per-channel factors [BC] vectors broadcast along its rows.  Offsets
are int64.

Paths (chosen by :func:`plan_for`, overridable through the launchers' ``plan``
argument, which is how the tests reach each of them at small sizes):

* one tile: all C channels fit one register tile (C <= ``MAX_ONE_TILE_C``):
  x (and dy) are read once.
* C loop: two passes over [BC, BP] chunks of the channels -- the first
  accumulates the fp32 sum of squares (backward: the dot and the per-channel
  partials), the second normalises and writes y (dx), re-reading x from L2.

Backward, per position with dz = dy * act'(z), g = sqrt(C) w (1 + scale) and
x̂ = x * rstd:

    dot = Σ_c dz g x̂,   dx = rstd (dz g - x̂ dot)   (dot taken as 0 where the
    norm was clamped, i.e. rstd >= 1 / eps, see the reference)

and per channel the position sums S1 = Σ_s dz, S2 = Σ_s dz x̂ give
dshift = S1, dscale = sqrt(C) w S2 and the per-sample partial of dweight
sqrt(C) (1 + scale) S2.  Each program writes its block's S1 / S2 to a
(2, N, K, C) workspace; a combine kernel adds the K partials of a sample in
order, and ``torch.sum`` adds the dweight partials over n (a fixed-order
reduction), so gradients are bit-reproducible: no atomics.  Accumulation is
fp32 (fp64 for fp64 x) throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (cdiv, check_layout, device_guard, next_power_of_2, opmath_scalar, round_to,
                      scalar_arg)
from .group_norm import _act, _act_grad
from .._alloc import empty

__all__ = [
    "Plan",
    "plan_for",
    "rms_norm_bwd_kernel",
    "rms_norm_bwd_kernel_combine",
    "rms_norm_fwd_kernel",
    "rms_norm_silu_bwd_triton",
    "rms_norm_silu_fwd_triton",
]

# --------------------------------------------------------------------------
# Heuristics (module level: read at launch time, so tests may patch them)
# --------------------------------------------------------------------------

# Elements of a [BC, BP] tile: 16 per thread at 8 warps.  The backward keeps
# a few such tiles live at once (x̂, dz and their products).
TILE = 4096
# Widest channel count taken in one tile (the U-Net's 64..512 channels); wider
# x takes the C loop.
MAX_ONE_TILE_C = 512
# Fewest positions of a contiguous-layout tile: BP is the length of each
# row's contiguous run, which must span a few 32-byte sectors.
MIN_BLOCK_P = 16
# Positions of a C-loop tile: long rows for the contiguous layout; for
# channels_last the rows are channels, so BP only sets the tile's depth.
LOOP_BLOCK_P = 64
LOOP_BLOCK_P_CL = 16
# Channels per program of the combine kernel (its tile is [TILE // BC, BC]).
COMBINE_BLOCK_C = 128
MAX_WARPS = 16


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------


@triton.jit
def _inv_norm(b_ss, eps, FP64: tl.constexpr):
    """1 / max(sqrt(ss), eps), the square root IEEE-rounded (tl.sqrt is exact
    for fp64; sqrt_rn is fp32's exact one); a NaN norm stays NaN, so that a NaN
    poisons its whole position as in torch.  The backward calls it with ss = 0
    for the clamp threshold 1 / eps, rounded alike."""
    if FP64:
        b_norm, b_eps = tl.sqrt(b_ss), opmath_scalar(eps, FP64)
    else:
        b_norm, b_eps = tl.sqrt_rn(b_ss), eps
    return 1 / tl.maximum(b_norm, b_eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile_offsets(o_c, o_p, C, S, CHANNELS_LAST: tl.constexpr):
    """[BC, BP] int64 offsets of channels o_c x positions o_p (int64) from a
    sample's origin."""
    if CHANNELS_LAST:
        o = o_c[:, None] + o_p[None, :] * C
    else:
        o = o_c[:, None].to(tl.int64) * S + o_p[None, :]
    return o


@triton.jit
def _channel_params(weight, scale, shift, o_c, o_nc, m_c, b_root, BC: tl.constexpr,
                    acc: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_SHIFT: tl.constexpr):
    """[BC] each: g = sqrt(C) w (1 + scale) and shift (0 if absent) of channels o_c."""
    b_g = tl.zeros([BC], dtype=acc) + b_root
    b_sh = tl.zeros([BC], dtype=acc)
    if HAS_WEIGHT:
        b_g = b_g * tl.load(weight + o_c, mask=m_c, other=0)
    if HAS_SCALE:
        b_g = b_g * (1 + tl.load(scale + o_nc, mask=m_c, other=0))
    if HAS_SHIFT:
        b_sh = tl.load(shift + o_nc, mask=m_c, other=0)
    return b_g, b_sh


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["eps", "root_c"])
def rms_norm_fwd_kernel(
    x,
    weight,
    scale,
    shift,
    y,
    rstd,
    eps,
    root_c,
    C,
    S,
    HAS_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BC: tl.constexpr,
    BP: tl.constexpr,
):
    """rstd and y of positions [k*BP, (k+1)*BP) of sample n.

    Grid: (N, cdiv(S, BP)).  ONE_TILE: BC >= C.
    """
    i_n, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    acc = rstd.dtype.element_ty
    b_root = opmath_scalar(root_c, FP64)

    o_p = i_k * BP + tl.arange(0, BP)  # [BP] int64 positions
    m_p = o_p < S
    p_x, p_y = x + i_n * C * S, y + i_n * C * S
    if ONE_TILE:
        o_c = tl.arange(0, BC)
        m_c = o_c < C
        m = m_c[:, None] & m_p[None, :]  # [BC, BP]
        o = _tile_offsets(o_c, o_p, C, S, CHANNELS_LAST)
        b_x = tl.load(p_x + o, mask=m, other=0).to(acc)  # [BC, BP]
        b_r = _inv_norm(tl.sum(b_x * b_x, axis=0), eps, FP64)  # [BP]
        b_g, b_sh = _channel_params(weight, scale, shift, o_c, i_n * C + o_c, m_c, b_root, BC, acc,
                                    HAS_WEIGHT, HAS_SCALE, HAS_SHIFT)
        b_y = _act(b_x * b_r[None, :] * b_g[:, None] + b_sh[:, None], SILU)
        tl.store(p_y + o, round_to(b_y, y.dtype.element_ty), mask=m)
    else:
        # pass 1: sum of squares over the channels, BC at a time
        b_ss = tl.zeros([BP], dtype=acc)
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            m = (o_c < C)[:, None] & m_p[None, :]
            b_x = tl.load(p_x + _tile_offsets(o_c, o_p, C, S, CHANNELS_LAST), mask=m, other=0).to(acc)
            b_ss += tl.sum(b_x * b_x, axis=0)
        b_r = _inv_norm(b_ss, eps, FP64)
        # pass 2: normalise and write
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            m_c = o_c < C
            m = m_c[:, None] & m_p[None, :]
            o = _tile_offsets(o_c, o_p, C, S, CHANNELS_LAST)
            b_x = tl.load(p_x + o, mask=m, other=0).to(acc)
            b_g, b_sh = _channel_params(weight, scale, shift, o_c, i_n * C + o_c, m_c, b_root, BC,
                                        acc, HAS_WEIGHT, HAS_SCALE, HAS_SHIFT)
            b_y = _act(b_x * b_r[None, :] * b_g[:, None] + b_sh[:, None], SILU)
            tl.store(p_y + o, round_to(b_y, y.dtype.element_ty), mask=m)
    tl.store(rstd + i_n * S + o_p, b_r, mask=m_p)


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------


@triton.jit
def _bwd_tile(p_x, p_dy, weight, scale, shift, b_r, o_c, o_p, m_p, i_n, b_root, C, S,
              BC: tl.constexpr, acc: tl.constexpr, HAS_WEIGHT: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
              CHANNELS_LAST: tl.constexpr):
    """x̂, dz and g of channels o_c x positions o_p: [BC, BP], [BC, BP], [BC]
    (zeros outside the tile's masks), and the tile's offsets."""
    m_c = o_c < C
    m = m_c[:, None] & m_p[None, :]
    o = _tile_offsets(o_c, o_p, C, S, CHANNELS_LAST)
    b_xh = tl.load(p_x + o, mask=m, other=0).to(acc) * b_r[None, :]
    b_g, b_sh = _channel_params(weight, scale, shift, o_c, i_n * C + o_c, m_c, b_root, BC, acc,
                                HAS_WEIGHT, HAS_SCALE, HAS_SHIFT)
    b_dz = tl.load(p_dy + o, mask=m, other=0).to(acc)
    if SILU:
        b_dz = _act_grad(b_dz, b_xh * b_g[:, None] + b_sh[:, None], SILU)
    return b_xh, b_dz, b_g, o, m


@triton.jit(do_not_specialize=["eps", "root_c"])
def rms_norm_bwd_kernel(
    dy,
    x,
    weight,
    scale,
    shift,
    rstd,
    ws,
    dx,
    eps,
    root_c,
    C,
    S,
    WS_PLANE,
    HAS_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_SUMS: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BC: tl.constexpr,
    BP: tl.constexpr,
):
    """dx of positions [k*BP, (k+1)*BP) of sample n, and the block's channel
    sums S1 = Σ dz, S2 = Σ dz x̂ into ws[j, n, k, c] (j = 0, 1; plane stride
    WS_PLANE = N*K*C).

    Grid: (N, K).  ONE_TILE: BC >= C.
    """
    i_n, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    K = tl.num_programs(1)
    acc = rstd.dtype.element_ty
    b_root = opmath_scalar(root_c, FP64)

    o_p = i_k * BP + tl.arange(0, BP)  # [BP] int64 positions
    m_p = o_p < S
    b_r = tl.load(rstd + i_n * S + o_p, mask=m_p, other=0)  # [BP]
    # positions whose norm was not clamped: the norm's gradient flows there
    m_free = b_r < _inv_norm(tl.zeros([], dtype=acc), eps, FP64)
    p_x, p_dy, p_dx = x + i_n * C * S, dy + i_n * C * S, dx + i_n * C * S
    p_ws = ws + (i_n * K + i_k) * C
    if ONE_TILE:
        o_c = tl.arange(0, BC)
        b_xh, b_dz, b_g, o, m = _bwd_tile(p_x, p_dy, weight, scale, shift, b_r, o_c, o_p, m_p, i_n,
                                          b_root, C, S, BC, acc, HAS_WEIGHT, HAS_SCALE, HAS_SHIFT,
                                          SILU, CHANNELS_LAST)
        if STORE_SUMS:
            tl.store(p_ws + o_c, tl.sum(b_dz, axis=1), mask=o_c < C)
            tl.store(p_ws + WS_PLANE + o_c, tl.sum(b_dz * b_xh, axis=1), mask=o_c < C)
        if STORE_DX:
            b_dzg = b_dz * b_g[:, None]  # [BC, BP] d x̂
            b_dot = tl.where(m_free, tl.sum(b_dzg * b_xh, axis=0), 0)  # [BP]
            b_dx = b_r[None, :] * (b_dzg - b_xh * b_dot[None, :])
            tl.store(p_dx + o, round_to(b_dx, dx.dtype.element_ty), mask=m)
    else:
        # pass 1: the dot and the channel sums, BC channels at a time
        b_dot = tl.zeros([BP], dtype=acc)
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            b_xh, b_dz, b_g, o, m = _bwd_tile(p_x, p_dy, weight, scale, shift, b_r, o_c, o_p, m_p,
                                              i_n, b_root, C, S, BC, acc, HAS_WEIGHT, HAS_SCALE,
                                              HAS_SHIFT, SILU, CHANNELS_LAST)
            if STORE_SUMS:
                tl.store(p_ws + o_c, tl.sum(b_dz, axis=1), mask=o_c < C)
                tl.store(p_ws + WS_PLANE + o_c, tl.sum(b_dz * b_xh, axis=1), mask=o_c < C)
            b_dot += tl.sum(b_dz * b_g[:, None] * b_xh, axis=0)
        b_dot = tl.where(m_free, b_dot, 0)
        # pass 2: dx
        if STORE_DX:
            for c0 in range(0, C, BC):
                o_c = c0 + tl.arange(0, BC)
                b_xh, b_dz, b_g, o, m = _bwd_tile(p_x, p_dy, weight, scale, shift, b_r, o_c, o_p,
                                                  m_p, i_n, b_root, C, S, BC, acc, HAS_WEIGHT,
                                                  HAS_SCALE, HAS_SHIFT, SILU, CHANNELS_LAST)
                b_dx = b_r[None, :] * (b_dz * b_g[:, None] - b_xh * b_dot[None, :])
                tl.store(p_dx + o, round_to(b_dx, dx.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["root_c"])
def rms_norm_bwd_kernel_combine(
    ws,
    weight,
    scale,
    dwp,
    dscale,
    dshift,
    root_c,
    C,
    K,
    WS_PLANE,
    HAS_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    STORE_DW: tl.constexpr,
    STORE_DSCALE: tl.constexpr,
    STORE_DSHIFT: tl.constexpr,
    FP64: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
):
    """The K block partials of sample n, channels [j*BC, (j+1)*BC), added in
    order: dshift = S1, dscale = sqrt(C) w S2, dwp = sqrt(C) (1 + scale) S2
    (dwp: (N, C) per-sample partials of dweight).

    Grid: (N, cdiv(C, BC)).
    """
    i_n, i_j = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    acc = ws.dtype.element_ty
    b_root = opmath_scalar(root_c, FP64)

    o_c = i_j * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_nc = i_n * C + o_c
    p_ws = ws + i_n * K * C
    b_s1 = tl.zeros([BC], dtype=acc)
    b_s2 = tl.zeros([BC], dtype=acc)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m = (o_k < K)[:, None] & m_c[None, :]  # [BK, BC]
        o = o_k[:, None] * C + o_c[None, :]
        b_s1 += tl.sum(tl.load(p_ws + o, mask=m, other=0), axis=0)
        b_s2 += tl.sum(tl.load(p_ws + WS_PLANE + o, mask=m, other=0), axis=0)
    if STORE_DSHIFT:
        tl.store(dshift + o_nc, b_s1, mask=m_c)
    if STORE_DSCALE:
        b_w = tl.zeros([BC], dtype=acc) + b_root
        if HAS_WEIGHT:
            b_w = b_w * tl.load(weight + o_c, mask=m_c, other=0)
        tl.store(dscale + o_nc, b_w * b_s2, mask=m_c)
    if STORE_DW:
        b_op = tl.zeros([BC], dtype=acc) + b_root
        if HAS_SCALE:
            b_op = b_op * (1 + tl.load(scale + o_nc, mask=m_c, other=0))
        tl.store(dwp + o_nc, b_op * b_s2, mask=m_c)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How a launch walks a sample: blocks of ``block_p`` positions per
    program, its channels in one [block_c, block_p] tile (``one_tile``,
    block_c >= C) or in a loop of them.  ``block_k``: partials added per step
    by the combine kernel (0: as many as fill a tile)."""

    one_tile: bool
    block_c: int
    block_p: int
    num_warps: int
    block_k: int = 0


def _warps(tile: int) -> int:
    return max(1, min(MAX_WARPS, tile // 512))


def plan_for(c: int, s: int, channels_last: bool) -> Plan:
    """The path for C = c channels and S = s positions (see the module docstring)."""
    bc_all, bs = next_power_of_2(c), next_power_of_2(s)
    if bc_all <= MAX_ONE_TILE_C:
        bp = min(bs, max(1 if channels_last else MIN_BLOCK_P, TILE // bc_all))
        return Plan(True, bc_all, bp, _warps(bc_all * bp))
    bp = min(bs, LOOP_BLOCK_P_CL if channels_last else LOOP_BLOCK_P)
    bc = min(bc_all, TILE // bp)
    return Plan(False, bc, bp, _warps(bc * bp))


def _dims(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x.numel() // (n * c)


def rms_norm_silu_fwd_triton(x, weight, scale, shift, eps, act, y, rstd, *,
                             plan: Optional[Plan] = None) -> None:
    """Writes y and rstd (see the module docstring).  ``plan`` forces a path."""
    cl = check_layout("rms_norm_silu", x, y)
    n, c, s = _dims(x)
    plan = plan or plan_for(c, s, cl)
    if plan.one_tile:
        assert plan.block_c >= c, plan
    fp64 = rstd.dtype == torch.float64
    params = [rstd if t is None else t for t in (weight, scale, shift)]
    with device_guard(x):
        rms_norm_fwd_kernel[(n, cdiv(s, plan.block_p))](
            x, *params, y, rstd, scalar_arg(eps, fp64), scalar_arg(math.sqrt(c), fp64), c, s,
            HAS_WEIGHT=weight is not None, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, SILU=act == "silu", CHANNELS_LAST=cl, FP64=fp64,
            ONE_TILE=plan.one_tile, BC=plan.block_c, BP=plan.block_p, num_warps=plan.num_warps,
        )


def rms_norm_silu_bwd_triton(dy, x, weight, scale, shift, rstd, eps, act,
                             dx, dweight, dscale, dshift, *, plan: Optional[Plan] = None) -> None:
    """Writes every gradient that is not None (see the module docstring).
    ``plan`` forces a path."""
    cl = check_layout("rms_norm_silu", x, dy, dx)
    n, c, s = _dims(x)
    plan = plan or plan_for(c, s, cl)
    if plan.one_tile:
        assert plan.block_c >= c, plan
    acc = rstd.dtype
    fp64 = acc == torch.float64
    k = cdiv(s, plan.block_p)
    sums = dweight is not None or dscale is not None or dshift is not None
    # (2, N, K, C) block partials of S1, S2; a dummy pointer when unused
    ws = empty(2, n, k, c, dtype=acc, device=x.device) if sums else rstd
    params = [rstd if t is None else t for t in (weight, scale, shift)]
    root_c = scalar_arg(math.sqrt(c), fp64)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_SCALE=scale is not None)
    with device_guard(x):
        if dx is not None or sums:
            rms_norm_bwd_kernel[(n, k)](
                dy, x, *params, rstd, ws, x if dx is None else dx, scalar_arg(eps, fp64), root_c,
                c, s, n * k * c,
                **flags, HAS_SHIFT=shift is not None, SILU=act == "silu", CHANNELS_LAST=cl,
                FP64=fp64, STORE_DX=dx is not None, STORE_SUMS=sums, ONE_TILE=plan.one_tile,
                BC=plan.block_c, BP=plan.block_p, num_warps=plan.num_warps,
            )
        if not sums:
            return
        # per-sample partials of dweight, summed over n below (fixed order);
        # with one sample the partial is the gradient
        dwp = dweight
        if dweight is not None and n > 1:
            dwp = empty(n, c, dtype=acc, device=x.device)
        bc = min(next_power_of_2(c), COMBINE_BLOCK_C)
        bk = min(next_power_of_2(k), plan.block_k or max(1, TILE // bc))
        rms_norm_bwd_kernel_combine[(n, cdiv(c, bc))](
            ws, *params[:2], *(rstd if t is None else t for t in (dwp, dscale, dshift)), root_c,
            c, k, n * k * c,
            **flags, STORE_DW=dwp is not None, STORE_DSCALE=dscale is not None,
            STORE_DSHIFT=dshift is not None, FP64=fp64, BC=bc, BK=bk,
            num_warps=_warps(bc * bk),
        )
    if dweight is not None and n > 1:
        torch.sum(dwp, dim=0, out=dweight)
