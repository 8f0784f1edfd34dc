"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import struct
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def opmath_scalar(v, FP64: tl.constexpr):
    """A launch-time float in opmath precision.

    Triton types Python float arguments as fp32, so fp64 launches pass the
    double's int64 bit pattern instead (see :func:`scalar_arg`).
    """
    if FP64:
        v = v.to(tl.int64).to(tl.float64, bitcast=True)
    return v


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """v (opmath) in the storage dtype, rounded to nearest even.

    Triton's interpreter truncates fp32 -> bf16 where GPUs round, so bf16 is
    rounded by hand on the fp32 bits first (NaN passed through); the cast that
    follows is then exact on both.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = tl.add(bits, 0x7FFF + ((bits >> 16) & 1), sanitize_overflow=False) & 0xFFFF0000
        v = tl.where(v == v, bits.to(tl.float32, bitcast=True), v)
    return v.to(dtype)


def scalar_arg(v: Optional[float], fp64: bool):
    """A float for a kernel: as is for fp32 opmath, its int64 bit pattern for
    fp64 (Triton would pass a Python float as fp32); 0 when absent (unread)."""
    if v is None:
        return 0
    if fp64:
        return struct.unpack("<q", struct.pack("<d", float(v)))[0]
    return float(v)


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (a no-op context for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
