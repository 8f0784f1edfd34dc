"""Counter-based normal noise: the specification every backend reproduces.

Noise element ``i`` (its position in memory of the output) for seed ``s`` is

    (w0, w1, _, _) = Philox4x32-10(counter=(lo32(i), hi32(i), 0, 0),
                                   key=(lo32(s), hi32(s)))
    u1 = ((w0 >> 8) + 1) * 2**-24            # in (0, 1], so log(u1) is finite
    u2 =  (w1 >> 8)      * 2**-24            # in [0, 1)
    z  = sqrt(-2 log u1) * cos(2 pi u2)      # Box-Muller, fp32

The Triton, CUDA and C++ CPU kernels compute the same integers bit for bit;
the final float ops (log, cos, sqrt) may differ by an ulp or two between math
libraries, so the same seed gives the same noise on every backend to ~1e-6.
Element ``i`` never depends on the launch grid, so results are reproducible.

This module emulates the uint32 arithmetic with int64 torch tensors.
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * m, a < 2**32 in int64.

    The product can exceed int64, so m is split in 16-bit halves:
    a*m = a*m_hi*2**16 + a*m_lo, each partial product < 2**48.
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors (or ints) holding uint32 values."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_normal(seed, numel: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The first ``numel`` noise values of stream ``seed`` as a 1-D tensor.

    ``seed`` is a Python int or a one-element int64 tensor; a tensor is read
    on its own device (no host sync), its 64 bits taken as unsigned.  log, cos
    and sqrt are evaluated in float64 (u1 and u2 are exact in it) and the result
    rounded once: the values the float32 kernels approximate to a few ulps.
    (torch's float32 log / cos on CPU were seen to differ by up to 4.5e-5 in
    about one process in 40 on the CI machine, which made the reference flaky.)
    """
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    i = torch.arange(numel, dtype=torch.int64, device=device)
    zero = torch.zeros_like(i)
    w0, w1, _, _ = philox4x32(i & _MASK32, (i >> 32) & _MASK32, zero, zero,
                              seed & _MASK32, (seed >> 32) & _MASK32)
    u1 = ((w0 >> 8) + 1).to(torch.float64) * 2.0**-24
    u2 = (w1 >> 8).to(torch.float64) * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(torch.float32).to(dtype)
