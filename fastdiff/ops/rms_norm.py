"""``fastdiff::rms_norm_silu``: denoising-diffusion-pytorch 2.x's RMSNorm + scale-shift + SiLU.

The math is specified in :mod:`fastdiff.reference.rms_norm`.  Two custom ops
carry it -- a forward returning (y, rstd) and a fused backward -- so
torch.compile sees both as single nodes; ``register_autograd`` ties them.
Validation happens once, in :func:`_validate`, before dispatch.

Backends: ``triton`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1),
``cpu`` (fastdiff._C) and ``torch`` (the reference).  There is no CUDA C++
kernel: the op is one memory-bound pass per direction, which the Triton
kernels already run at bandwidth, so a second GPU implementation would only
be more code to keep in step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend
from .._alloc import empty, empty_like
from ..reference import rms_norm as ref
from .group_norm import (
    _act_name,
    _check_channel_inputs,
    _cpp_autograd,
    _fake_grads,
    _grad_buffers,
    _grad_results,
    _memory_format,
    _small,
    _whole_body,
)

__all__ = ["rms_norm_silu"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PARAMS = ("weight", "scale", "shift")


# --------------------------------------------------------------------------
# Backends.  Canonical inputs (see _fwd_op): x dense, contiguous or
# channels_last; weight / scale / shift contiguous in the opmath dtype;
# outputs preallocated, rstd (N, *spatial) contiguous.  ``act`` is "silu" or
# "none".
# --------------------------------------------------------------------------


def _torch_fwd(x, weight, scale, shift, eps, act, y, rstd):
    y_, rstd_ = ref.rms_norm_silu_forward(x, weight, eps, scale, shift,
                                          None if act == "none" else act)
    y.copy_(y_)
    rstd.copy_(rstd_)


def _torch_bwd(dy, x, weight, scale, shift, rstd, eps, act, grads):
    res = ref.rms_norm_silu_backward(dy, x, weight, eps, scale, shift, rstd,
                                     None if act == "none" else act)
    for out, val in zip(grads, res):
        if out is not None:
            out.copy_(val)


def _ext_fwd(*args):
    _backend.extension().rms_norm_silu_fwd(*args)


def _ext_bwd(dy, x, weight, scale, shift, rstd, eps, act, grads):
    _backend.extension().rms_norm_silu_bwd(dy, x, weight, scale, shift, rstd, eps, act, *grads)


def _triton_fwd(*args):
    from ..kernels.rms_norm import rms_norm_silu_fwd_triton

    rms_norm_silu_fwd_triton(*args)


def _triton_bwd(dy, x, weight, scale, shift, rstd, eps, act, grads):
    from ..kernels.rms_norm import rms_norm_silu_bwd_triton

    rms_norm_silu_bwd_triton(dy, x, weight, scale, shift, rstd, eps, act, *grads)


_FWD = (
    _backend.Impl("triton", _triton_fwd),
    _backend.Impl("cpu", _ext_fwd, _backend.extension_has("rms_norm_silu_fwd")),
    _backend.Impl("torch", _torch_fwd),
)
_BWD = (
    _backend.Impl("triton", _triton_bwd),
    _backend.Impl("cpu", _ext_bwd, _backend.extension_has("rms_norm_silu_bwd")),
    _backend.Impl("torch", _torch_bwd),
)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate(x, weight, eps, scale, shift, act) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rms_norm_silu: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"rms_norm_silu: x must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dim() < 2:
        raise ValueError(f"rms_norm_silu: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"rms_norm_silu: eps must be a float >= 0, got {eps!r}")
    if act not in ref.ACTIVATIONS:
        raise ValueError(f"rms_norm_silu: act must be 'silu' or None, got {act!r}")
    _check_channel_inputs("rms_norm_silu", x, (("weight", weight, (c,)), ("scale", scale, (n, c)),
                                               ("shift", shift, (n, c))))


def _rstd_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], *x.shape[2:])


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------


@torch.library.custom_op("fastdiff::rms_norm_silu", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, weight, eps, scale, shift, None if act == "none" else act)
    return _forward(x, weight, eps, scale, shift, act)


def _forward(x, weight, eps, scale, shift, act):
    """The forward op's body on validated inputs: what the registered op and
    the eager fast path of :func:`rms_norm_silu` both run."""
    impl = _backend.select("fastdiff::rms_norm_silu", _FWD, x.device, {})
    ext = _whole_body(impl, x, "rms_norm_silu_backward", ("cpu",))
    if ext is not None:
        return ext.rms_norm_silu_forward(x, weight, scale, shift, float(eps), act)
    acc = ref.opmath_dtype(x.dtype)
    x = x.contiguous(memory_format=_memory_format(x))
    y = empty_like(x)
    rstd = empty(*_rstd_shape(x), dtype=acc, device=x.device)
    if x.numel() == 0:  # no samples or no positions (rstd empty), or no channels (norm 0)
        rstd.fill_(1 / eps if eps > 0 else math.inf)
        return y, rstd
    impl.run(x, *(_small(t, acc) for t in (weight, scale, shift)), float(eps), act, y, rstd)
    return y, rstd


@_fwd_op.register_fake
def _(x, weight, eps, scale, shift, act):
    _validate(x, weight, eps, scale, shift, None if act == "none" else act)
    acc = ref.opmath_dtype(x.dtype)
    y = torch.empty_like(x.contiguous(memory_format=_memory_format(x)))
    return y, x.new_empty(_rstd_shape(x), dtype=acc)


def _backward_body(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    rstd: torch.Tensor,
    act: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, weight, scale, shift); an input that is absent or not
    in ``output_mask`` gets an empty (0-element) tensor."""
    impl = _backend.select("fastdiff::rms_norm_silu_backward", _BWD, x.device, {})
    ext = _whole_body(impl, x, "rms_norm_silu_backward", ("cpu",))
    if ext is not None:
        return tuple(ext.rms_norm_silu_backward(grad_y, x, weight, float(eps), scale, shift, rstd,
                                                act, output_mask))
    acc = ref.opmath_dtype(x.dtype)
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad_y = grad_y.to(x.dtype).contiguous(memory_format=fmt)
    params = (weight, scale, shift)
    grads = _grad_buffers(x, params, output_mask, acc)
    if x.numel() > 0:
        impl.run(grad_y, x, *(_small(t, acc) for t in params), rstd.contiguous(), float(eps), act,
                 grads)
    return _grad_results(x, grads, params)


# Registered from the plain function so the eager fast path of the backward
# (see _backward) can call the body itself.
_bwd_op = torch.library.custom_op("fastdiff::rms_norm_silu_backward", mutates_args=())(_backward_body)


@_bwd_op.register_fake
def _(grad_y, x, weight, eps, scale, shift, rstd, act, output_mask):
    return _fake_grads(x, (weight, scale, shift), output_mask)


def _setup_context(ctx, inputs, output):
    x, weight, eps, scale, shift, act = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, scale, shift, rstd)
    ctx.eps, ctx.act = eps, act
    _backend.remember_backend(ctx)


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, scale, shift, rstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[i] for i in (0, 1, 3, 4)]
    grads = _backend.run_backward(ctx, "rms_norm_silu_backward", _backward_body, grad_y, x, weight,
                                  ctx.eps, scale, shift, rstd, ctx.act, mask)
    dx, dw, dscale, dshift = (g if m else None for g, m in zip(grads, mask))
    return dx, dw, None, dscale, dshift, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# eager calls: the body directly, or a lean autograd.Function, else the dispatcher
_EAGER = _backend.EagerOp("rms_norm_silu", _forward, _setup_context, _backward)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def rms_norm_silu(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    act: Optional[str] = "silu",
) -> torch.Tensor:
    """``act(F.normalize(x, dim=1, eps=eps) * sqrt(C) * weight * (1 + scale) + shift)``
    in one fused pass.

    Args:
        x: (N, C, *spatial), fp16/bf16/fp32/fp64, contiguous or channels_last
            (the output keeps x's memory format).
        weight: (C,) gain (denoising-diffusion-pytorch's RMSNorm ``g``), optional.
        eps: lower clamp of the L2 norm over the channels (F.normalize's eps).
        scale, shift: (N, C) modulation applied after the norm, optional.
        act: "silu" or None.

    The norm is accumulated in fp32 (fp64 for fp64 input); the backward fuses
    all four gradients and reduces dweight / dscale / dshift in a fixed order
    (bit-reproducible).
    """
    _validate(x, weight, eps, scale, shift, act)
    args = (x, weight, float(eps), scale, shift, _act_name(act))
    mode = _backend.eager_mode(x, weight, scale, shift)
    if mode == "autograd":
        ext = _cpp_autograd("fastdiff::rms_norm_silu", _FWD, x, "rms_norm_silu_autograd", ("cpu",))
        if ext is not None:
            return ext.rms_norm_silu_autograd(x, weight, scale, shift, float(eps), _act_name(act))
    return _EAGER.run(mode, *args)[0]
