"""Test helpers shared by every op's tests (and usable by downstream projects).

* :func:`backends_for` -- the backends that can run on a device here.
* :func:`poisoned_outputs` -- fill every output fastdiff allocates with NaN, so
  a kernel that skips an element fails loudly.
* :func:`assert_close` -- the numerics rule of DESIGN.md: fp32/fp64 within a
  relative tolerance of the reference; fp16/bf16 within 2x the error of the
  plain-torch reference run at the same precision (plus a small atol), both
  measured against a float64 "truth" (FlashAttention's test rule).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from . import _alloc, _backend

__all__ = [
    "assert_close",
    "backends_for",
    "device_backends",
    "devices",
    "max_rel_error",
    "poisoned_outputs",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def backends_for(device: str | torch.device) -> list[str]:
    """Backends available on this machine that take tensors on ``device``."""
    device = torch.device(device)
    return [
        name
        for name, why_not in _backend.backends().items()
        if why_not is None and not _backend.device_reasons(name, device)
    ]


def devices() -> list[str]:
    """The device types tests run on here: cpu, and cuda when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends() -> list[tuple[str, str]]:
    """Every (device, backend) pair that can run here, for test parametrisation."""
    return [(dev, name) for dev in devices() for name in backends_for(dev)]


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Inside the block, outputs allocated by fastdiff ops start as NaN."""
    token = _alloc._poison.set(True)
    try:
        yield
    finally:
        _alloc._poison.reset(token)


@contextlib.contextmanager
def no_cuda_sync() -> Iterator[None]:
    """Inside the block, any synchronization of the host with the GPU raises (after one
    that lets the work queued before the block finish): for tests that a step, a loss or
    a sampling loop is launches only."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors), in float64."""
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    truth: Optional[torch.Tensor] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    lowp_factor: float = 2.0,
    name: str = "output",
) -> None:
    """Assert ``actual`` (a fastdiff result) matches ``expected`` (the reference).

    fp32/fp64: elementwise ``|a - e| <= atol + rtol * max|e|`` (relative to the
    tensor's scale, so values near zero are not held to a tighter bound).
    fp16/bf16: ``truth`` (the reference in float64) is required and
    ``err(actual) <= lowp_factor * err(expected) + atol`` with errors measured
    as max abs difference to ``truth``.
    NaNs must sit in the same places.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != {expected.dtype}")
    nan_a, nan_e = actual.isnan(), expected.isnan()
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(
            f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} expected)"
        )
    keep = ~nan_e
    a, e = actual[keep].double(), expected[keep].double()
    if a.numel() == 0:
        return
    if actual.dtype in LOW_PRECISION:
        if truth is None:
            raise ValueError("assert_close: low-precision comparisons need the float64 truth")
        t = truth[keep].double()
        err = (a - t).abs().max().item()
        ref_err = (e - t).abs().max().item()
        bound = lowp_factor * ref_err + atol
        if not err <= bound:
            raise AssertionError(
                f"{name} ({actual.dtype}): max error {err:.3g} vs float64 truth exceeds "
                f"{lowp_factor} x reference error {ref_err:.3g} + atol {atol:g}"
            )
        return
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    bound = atol + rtol * scale
    if not err <= bound:
        raise AssertionError(
            f"{name} ({actual.dtype}): max abs error {err:.3g} exceeds {bound:.3g} "
            f"(rtol {rtol:g} x scale {scale:.3g} + atol {atol:g})"
        )
