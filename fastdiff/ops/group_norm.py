"""``fastdiff::group_norm_silu``: GroupNorm + time-embedding add + scale-shift + SiLU.

The math is specified in :mod:`fastdiff.reference.group_norm`.  Two custom ops
carry it -- a forward returning (y, mean, rstd) and a fused backward -- so
torch.compile sees both as single nodes; ``register_autograd`` ties them.
Validation happens once, in :func:`_validate`, before dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._alloc import empty, empty_like, poisoning
from ..reference import group_norm as ref

__all__ = ["group_norm_silu"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PARAMS = ("weight", "bias", "emb", "scale", "shift")


# --------------------------------------------------------------------------
# Backends.  Canonical inputs (see _canonicalize): x dense, contiguous or
# channels_last; the small per-channel tensors contiguous in the opmath dtype;
# outputs preallocated.  ``act`` is "silu" or "none".
# --------------------------------------------------------------------------


def _torch_fwd(x, weight, bias, emb, scale, shift, num_groups, eps, act, y, mean, rstd):
    y_, mean_, rstd_ = ref.group_norm_silu_forward(
        x, num_groups, weight, bias, eps, emb, scale, shift, None if act == "none" else act
    )
    y.copy_(y_)
    mean.copy_(mean_)
    rstd.copy_(rstd_)


def _torch_bwd(dy, x, weight, bias, emb, scale, shift, mean, rstd, num_groups, act, grads):
    res = ref.group_norm_silu_backward(
        dy, x, num_groups, weight, bias, emb, scale, shift, mean, rstd,
        None if act == "none" else act,
    )
    for out, val in zip(grads, res):
        if out is not None:
            out.copy_(val)


def _ext_fwd(*args):
    _backend.extension().group_norm_silu_fwd(*args)


def _ext_bwd(dy, x, weight, bias, emb, scale, shift, mean, rstd, num_groups, act, grads):
    _backend.extension().group_norm_silu_bwd(
        dy, x, weight, bias, emb, scale, shift, mean, rstd, num_groups, act, *grads
    )


def _triton_fwd(*args):
    from ..kernels.group_norm import group_norm_silu_fwd_triton

    group_norm_silu_fwd_triton(*args)


def _triton_bwd(dy, x, weight, bias, emb, scale, shift, mean, rstd, num_groups, act, grads):
    from ..kernels.group_norm import group_norm_silu_bwd_triton

    group_norm_silu_bwd_triton(dy, x, weight, bias, emb, scale, shift, mean, rstd,
                               num_groups, act, *grads)


_FWD = (
    _backend.Impl("triton", _triton_fwd),
    _backend.Impl("cuda", _ext_fwd, _backend.extension_has("group_norm_silu_fwd")),
    _backend.Impl("cpu", _ext_fwd, _backend.extension_has("group_norm_silu_fwd")),
    _backend.Impl("torch", _torch_fwd),
)
_BWD = (
    _backend.Impl("triton", _triton_bwd),
    _backend.Impl("cuda", _ext_bwd, _backend.extension_has("group_norm_silu_bwd")),
    _backend.Impl("cpu", _ext_bwd, _backend.extension_has("group_norm_silu_bwd")),
    _backend.Impl("torch", _torch_bwd),
)


# --------------------------------------------------------------------------
# Validation and canonical layout
# --------------------------------------------------------------------------


def _validate(x, num_groups, weight, bias, eps, emb, scale, shift, act) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm_silu: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"group_norm_silu: x must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(
            f"group_norm_silu: num_groups ({num_groups}) must divide the channels of x ({c})"
        )
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"group_norm_silu: eps must be a float >= 0, got {eps!r}")
    if act not in ref.ACTIVATIONS:
        raise ValueError(f"group_norm_silu: act must be 'silu' or None, got {act!r}")
    _check_channel_inputs("group_norm_silu", x, (("weight", weight, (c,)), ("bias", bias, (c,)),
                                                 ("emb", emb, (n, c)), ("scale", scale, (n, c)),
                                                 ("shift", shift, (n, c))))


def _check_channel_inputs(op: str, x: torch.Tensor, inputs) -> None:
    """Each (name, tensor or None, expected shape) of a norm's per-channel inputs: a
    floating-point tensor of that shape on x's device, or None."""
    for name, t, shape in inputs:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
        if t.shape != shape:  # torch.Size is a tuple
            raise ValueError(
                f"{op}: {name} must have shape {shape} for x of shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) when x is in it (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _small(t: Optional[torch.Tensor], acc: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(acc).contiguous()`` (None stays None), skipping the calls when t already is."""
    if t is None or (t.dtype == acc and t.is_contiguous()):
        return t
    return t.to(acc).contiguous()


def _grad_buffers(x: torch.Tensor, params: tuple, output_mask: list[bool],
                  acc: torch.dtype) -> list[Optional[torch.Tensor]]:
    """Outputs of a fused norm backward: dx like (canonical) x, then one opmath
    buffer per wanted, present parameter (None otherwise); zeros for an empty x."""
    grads = [empty_like(x) if output_mask[0] else None]
    for want, t in zip(output_mask[1:], params):
        grads.append(empty(*t.shape, dtype=acc, device=x.device) if want and t is not None else None)
    if x.numel() == 0:
        for g in grads:
            if g is not None:
                g.zero_()
    return grads


def _grad_results(x: torch.Tensor, grads: list, params: tuple) -> tuple[torch.Tensor, ...]:
    """The backward op's outputs: each gradient in its input's dtype, an empty
    (0-element) tensor for an input that is absent or was not asked for."""
    results = [grads[0] if grads[0] is not None else x.new_empty(0)]
    for g, t in zip(grads[1:], params):
        results.append(x.new_empty(0) if g is None else g.to(t.dtype))
    return tuple(results)


def _fake_grads(x: torch.Tensor, params: tuple, output_mask: list[bool]) -> tuple[torch.Tensor, ...]:
    """:func:`_grad_results`' shapes, strides and dtypes, for the fake kernels."""
    fmt = _memory_format(x)
    results = [torch.empty_like(x.contiguous(memory_format=fmt)) if output_mask[0] else x.new_empty(0)]
    for want, t in zip(output_mask[1:], params):
        results.append(torch.empty_like(t) if want and t is not None else x.new_empty(0))
    return tuple(results)


def _act_name(act: Optional[str]) -> str:
    return "none" if act is None else act


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    emb: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(x, num_groups, weight, bias, eps, emb, scale, shift, None if act == "none" else act)
    return _forward(x, num_groups, weight, bias, eps, emb, scale, shift, act)


def _whole_body(impl: _backend.Impl, x: torch.Tensor, symbol: str = "group_norm_silu_backward",
                backends: tuple = ("cpu", "cuda")):
    """fastdiff._C, whose ``symbol`` is a whole-body entry point (layout, opmath inputs,
    allocation and kernel in one C++ call), when ``impl`` is one of the C++ ``backends``
    it serves and outputs need no poisoning (tests allocate them in Python to NaN-fill
    them); else None."""
    if impl.backend not in backends or x.numel() == 0 or poisoning():
        return None
    ext = _backend.extension()
    return ext if hasattr(ext, symbol) else None


def _cpp_autograd(op: str, impls, x: torch.Tensor, symbol: str, backends: tuple = ("cpu", "cuda")):
    """fastdiff._C, whose ``symbol`` runs op's eager training step in C++ (the whole
    forward body, and an autograd node whose backward is the whole backward body),
    when the op's forward would run those bodies (:func:`_whole_body`); else None.
    Call only in eager_mode "autograd"."""
    return _whole_body(_backend.select(op, impls, x.device, {}), x, symbol, backends)


def _forward(x, num_groups, weight, bias, eps, emb, scale, shift, act):
    """The forward op's body on validated inputs: what the registered op and
    the eager fast path of :func:`group_norm_silu` both run."""
    impl = _backend.select("fastdiff::group_norm_silu", _FWD, x.device, {})
    ext = _whole_body(impl, x)
    if ext is not None:
        return ext.group_norm_silu_forward(x, weight, bias, emb, scale, shift, num_groups,
                                           float(eps), act)
    acc = ref.opmath_dtype(x.dtype)
    x = x.contiguous(memory_format=_memory_format(x))
    y = empty_like(x)
    mean = empty(x.shape[0], num_groups, dtype=acc, device=x.device)
    rstd = empty(x.shape[0], num_groups, dtype=acc, device=x.device)
    if x.numel() == 0:  # empty batch or empty groups: nothing to normalise
        mean.zero_()
        rstd.zero_()
        return y, mean, rstd
    impl.run(x, *(_small(t, acc) for t in (weight, bias, emb, scale, shift)),
             num_groups, float(eps), act, y, mean, rstd)
    return y, mean, rstd


@_fwd_op.register_fake
def _(x, num_groups, weight, bias, eps, emb, scale, shift, act):
    _validate(x, num_groups, weight, bias, eps, emb, scale, shift, None if act == "none" else act)
    acc = ref.opmath_dtype(x.dtype)
    y = torch.empty_like(x.contiguous(memory_format=_memory_format(x)))
    return y, x.new_empty(x.shape[0], num_groups, dtype=acc), x.new_empty(x.shape[0], num_groups, dtype=acc)


def _backward_body(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    emb: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    act: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, weight, bias, emb, scale, shift); an input that is absent
    or not in ``output_mask`` gets an empty (0-element) tensor."""
    impl = _backend.select("fastdiff::group_norm_silu_backward", _BWD, x.device, {})
    ext = _whole_body(impl, x)
    if ext is not None:
        return tuple(ext.group_norm_silu_backward(grad_y, x, weight, bias, emb, scale, shift, mean,
                                                  rstd, num_groups, act, output_mask))
    acc = ref.opmath_dtype(x.dtype)
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad_y = grad_y.to(x.dtype).contiguous(memory_format=fmt)
    params = (weight, bias, emb, scale, shift)
    grads = _grad_buffers(x, params, output_mask, acc)
    if x.numel() > 0:
        impl.run(grad_y, x, *(_small(t, acc) for t in params), mean, rstd, num_groups, act, grads)
    return _grad_results(x, grads, params)


# Registered from the plain function so the eager fast path of the backward
# (see _backward) can call the body itself.
_bwd_op = torch.library.custom_op("fastdiff::group_norm_silu_backward", mutates_args=())(_backward_body)


@_bwd_op.register_fake
def _(grad_y, x, num_groups, weight, bias, emb, scale, shift, mean, rstd, act, output_mask):
    return _fake_grads(x, (weight, bias, emb, scale, shift), output_mask)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, emb, scale, shift, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, emb, scale, shift, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act
    _backend.remember_backend(ctx)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, emb, scale, shift, mean, rstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[i] for i in (0, 2, 3, 5, 6, 7)]
    grads = _backend.run_backward(ctx, "group_norm_silu_backward", _backward_body, grad_y, x,
                                  ctx.num_groups, weight, bias, emb, scale, shift, mean, rstd,
                                  ctx.act, mask)
    dx, dw, db, demb, dscale, dshift = (g if m else None for g, m in zip(grads, mask))
    return dx, None, dw, db, None, demb, dscale, dshift, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# eager calls: the body directly, or a lean autograd.Function, else the dispatcher
_EAGER = _backend.EagerOp("group_norm_silu", _forward, _setup_context, _backward)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    emb: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    act: Optional[str] = "silu",
) -> torch.Tensor:
    """``act(GN(x + emb) * (1 + scale) + shift)`` in one fused pass.

    Args:
        x: (N, C, *spatial), fp16/bf16/fp32/fp64, contiguous or channels_last
            (the output keeps x's memory format).
        num_groups: groups G; must divide C.
        weight, bias: GroupNorm's affine, (C,) each, optional.
        eps: added to the variance.
        emb: (N, C) time embedding added to x before the norm (DDPM ResnetBlock).
        scale, shift: (N, C) AdaGN modulation applied after the affine.
        act: "silu" or None.

    Statistics are fp32 (fp64 for fp64 input), two-pass; the backward fuses all
    six gradients and reduces dweight / dbias in a fixed order (bit-reproducible).
    """
    _validate(x, num_groups, weight, bias, eps, emb, scale, shift, act)
    args = (x, num_groups, weight, bias, float(eps), emb, scale, shift, _act_name(act))
    mode = _backend.eager_mode(x, weight, bias, emb, scale, shift)
    if mode == "autograd":
        ext = _cpp_autograd("fastdiff::group_norm_silu", _FWD, x, "group_norm_silu_autograd")
        if ext is not None:
            return ext.group_norm_silu_autograd(x, weight, bias, emb, scale, shift, num_groups,
                                                float(eps), _act_name(act))
    return _EAGER.run(mode, *args)[0]
