"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools
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


def cdiv(x: int, y: int) -> int:
    """``triton.cdiv`` for the launchers' host arithmetic: in recent Triton releases that
    is a constexpr-function wrapper costing ~1.6 µs per call; this is plain Python."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` (0 for 0) in plain Python (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def scalar_arg(v: Optional[float], fp64: bool):
    """A float for a kernel: as is for fp32 opmath, its int64 bit pattern for
    fp64 (Triton would pass a Python float as fp32); 0 when absent (unread)."""
    if v is None:
        return 0
    if fp64:
        return struct.unpack("<q", struct.pack("<d", float(v)))[0]
    return float(v)


@functools.lru_cache(maxsize=None)
def _one_visible_gpu() -> bool:
    return torch.cuda.device_count() <= 1


def device_guard(t: torch.Tensor):
    """Launch on t's GPU: a no-op context for CPU tensors under the interpreter and
    when only one GPU is visible (the current device then is t's; entering a
    ``torch.cuda.device`` costs microseconds per launch)."""
    if not t.is_cuda or _one_visible_gpu():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _is_channels_last(op: str, t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return False
    if t.dim() > 2 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return True
    raise ValueError(
        f"{op} (triton backend): tensors must be contiguous or channels_last, "
        f"got shape {tuple(t.shape)} with strides {t.stride()}"
    )


def check_layout(op: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether x (N, C, *spatial) is channels_last (else contiguous: anything else
    raises); every other tensor given must share x's shape and layout."""
    cl = _is_channels_last(op, x)
    for t in others:
        if t is not None and (t.shape != x.shape or _is_channels_last(op, t) != cl):
            raise ValueError(
                f"{op} (triton backend): x, dy, y and dx must share shape and "
                f"memory layout, got strides {x.stride()} and {t.stride()}"
            )
    return cl
