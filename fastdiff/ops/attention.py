"""``fastdiff::attention``: non-causal scaled dot-product attention.

The math is specified in :mod:`fastdiff.reference.attention`.  Two custom ops
carry it -- a forward returning (o, lse) and a backward returning
(dq, dk, dv) from the saved o and lse -- so torch.compile sees each as one
node; ``register_autograd`` ties them.  lse (B, H, Nq), the fp32 (fp64 for
fp64) natural-log logsumexp of the scaled scores, is part of the spec, so a
forward on one backend and a backward on another agree.  Validation happens
once, in :func:`_validate`, before dispatch.

Backends:

* ``triton`` -- FlashAttention-2 kernels (:mod:`fastdiff.kernels.attention`)
  for fp16 / bf16 / fp32 and 1 <= D <= 256; q, k, v are read through their
  strides (views of a fused qkv projection are not copied).
* ``cuda`` / ``cpu`` -- no C++ kernel: they decline with a reason and dispatch
  moves on to ``torch``.  On CPU, SDPA's flash kernel already keeps memory
  O(N·D) and beats a materialised softmax (fp32, one thread, best of 5-15:
  forward 5.4x / 5.7x / 2.9x faster at N = 1024 for D = 40 / 32 / 72,
  forward+backward 3.3x / 3.7x / 1.7x; about even (1.0-1.3x) at N = 256;
  only cross-attention to 77 keys is faster materialised, by 10-20%), so a
  tiled C++ kernel would have to beat SDPA, not the naive version.
* ``torch`` -- SDPA.  CPU tensors go through SDPA's CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward,
  the ops ``F.scaled_dot_product_attention`` runs on CPU), which returns and
  consumes the lse.  Other devices (CUDA inputs the Triton kernels decline,
  e.g. fp64 or D > 256): o from ``F.scaled_dot_product_attention``, lse and
  the backward from the chunked reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend
from .._alloc import empty, empty_like
from ..reference import attention as ref

__all__ = ["attention"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest head dim of the Triton kernels: the largest padded head dim in
# kernels.attention.CONFIGS (not imported here: Triton is optional; a test
# keeps the two equal).
TRITON_MAX_HEAD_DIM = 256
# The kernels address inside a (b, h) slice with int32 offsets, up to one
# tile (at most 128 rows) past its last row.
_MAX_TILE_ROWS = 128
_INT32_MAX = 2**31 - 1
NO_KERNEL = "no C++ kernel: SDPA is used (the torch backend)"


# --------------------------------------------------------------------------
# Backends.  Inputs validated; outputs preallocated (o like q, lse and the
# gradients as their tensors); Nk >= 1 and Nq >= 1.  A forward returns (o, lse), a
# backward the gradients (None where not asked for): the preallocated tensors, or
# its own where they have exactly their layout.
# --------------------------------------------------------------------------


def _rows_dense(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (SDPA's CPU flash kernel reads rows as vectors
    and silently misreads others); other strides are kept."""
    return t if t.stride(-1) == 1 else t.contiguous()


_SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _flash_cpu(q, k, v, scale):
    """(o, lse) of SDPA's CPU flash kernel on q, k, v with unit column strides."""
    return _SDPA_CPU(*(_rows_dense(t) for t in (q, k, v)), 0.0, False, scale=scale)


def _torch_fwd(q, k, v, scale, o, lse):
    """SDPA's (o, lse) where they already have the op's layouts (o like ``o``, lse
    contiguous: the fake's, so compiled graphs may rely on them), else copied into the
    preallocated ``o`` / ``lse``.  On CPU o comes out laid out like q, so the O(N D)
    copy is skipped for dense q; the flash kernel's lse is strided, its copy is O(N)."""
    if q.device.type == "cpu":
        o_, lse_ = _flash_cpu(q, k, v, scale)
    else:
        o_, lse_ = _sdpa_and_reference_fwd(q, k, v, scale)
    if o_.dtype == o.dtype and o_.stride() == o.stride():
        o = o_
    else:
        o.copy_(o_)
    if lse_.dtype == lse.dtype and lse_.is_contiguous():
        lse = lse_
    else:
        lse.copy_(lse_)
    return o, lse


@_backend.without_autocast
def _sdpa_cpu(q, k, v, scale):
    """An eager call on CPU with the torch backend: SDPA's CPU flash op, with its own
    (C++) autograd node when grad is needed.  Forward and backward run the kernels
    :func:`_torch_fwd` / :func:`_torch_bwd` run, on the same inputs, so outputs and
    gradients are the registered op's; what is skipped is the Python around them
    (the lse and o buffers, the autograd.Function: ~10 µs per no-grad call, ~150 µs
    per training call).  Autocast is off inside, as in the registered op's body."""
    o = _flash_cpu(q, k, v, scale)[0]
    if o.stride() != q.stride():  # q not dense: the op's o is laid out as empty_like(q)
        o = empty_like(q).copy_(o)
    return o


def _sdpa_and_reference_fwd(q, k, v, scale):
    """(o, lse) off CPU: SDPA's o, the reference's chunked lse."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale), ref.attention_lse(q, k, scale)


def _torch_bwd(grad_o, q, k, v, o, lse, scale, grads):
    """The gradients: each computed one where it already has its preallocated tensor's
    layout (the fake's, see :func:`_grad_like`), else copied into it.  On CPU the flash
    kernel's (B, N, H, D) layout is the preallocated one: no copy."""
    if q.device.type == "cpu":
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(_rows_dense(t) for t in (grad_o, q, k, v, o)), lse, 0.0, False, scale=scale
        )
    else:
        res = ref.attention_backward(grad_o, q, k, v, o, lse, scale)
    out = []
    for g, val in zip(grads, res):
        if g is not None and not (val.dtype == g.dtype and val.stride() == g.stride()):
            val = g.copy_(val)
        out.append(None if g is None else val)
    return out


def _triton_fwd(q, k, v, scale, o, lse):
    from ..kernels.attention import attention_fwd_triton

    attention_fwd_triton(q, k, v, scale, o, lse)
    return o, lse


def _triton_bwd(grad_o, q, k, v, o, lse, scale, grads):
    from ..kernels.attention import attention_bwd_triton

    attention_bwd_triton(grad_o, q, k, v, o, lse, scale, *grads)
    return grads


def _triton_reasons(**tensors: torch.Tensor) -> list[str]:
    """Why the Triton kernels cannot take these (B, H, N, D) tensors."""
    q = tensors["q"]
    reasons = []
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype}: the triton kernels take float16, bfloat16 and float32")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        reasons.append(
            f"head dim {q.shape[-1]} exceeds the triton kernels' limit of {TRITON_MAX_HEAD_DIM}"
        )
    for name, t in tensors.items():
        extent = (t.shape[2] + _MAX_TILE_ROWS) * t.stride(2) + t.shape[3] * t.stride(3)
        if extent > _INT32_MAX:
            reasons.append(
                f"{name}: a (batch, head) slice spans {extent} elements, beyond the triton "
                "kernels' int32 in-slice offsets"
            )
    return reasons


@_backend.static_reasons
def _declines(**_) -> list[str]:
    return [NO_KERNEL]


# cpu / cuda: fastdiff._C has no attention kernel; they always decline (see
# the module docstring), so their run entry is never reached.
_FWD = (
    _backend.Impl("triton", _triton_fwd, _triton_reasons),
    _backend.Impl("cuda", _torch_fwd, _declines),
    _backend.Impl("cpu", _torch_fwd, _declines),
    _backend.Impl("torch", _torch_fwd),
)
_BWD = (
    _backend.Impl("triton", _triton_bwd, _triton_reasons),
    _backend.Impl("cuda", _torch_bwd, _declines),
    _backend.Impl("cpu", _torch_bwd, _declines),
    _backend.Impl("torch", _torch_bwd),
)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate(q, k, v, scale) -> None:
    for name, t, n in (("q", q, "Nq"), ("k", k, "Nk"), ("v", v, "Nk")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"attention: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (B, H, {n}, D), got shape {tuple(t.shape)}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"attention: {name} has (B, H) = {tuple(t.shape[:2])} but q has {tuple(q.shape[:2])}"
            )
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"attention: {name} has head dim {t.shape[3]} but q has {q.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: v has {v.shape[2]} positions but k has {k.shape[2]}")
    if q.shape[3] == 0:
        raise ValueError("attention: head dim D must be at least 1")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"attention: scale must be a finite float or None, got {scale!r}")


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o like q (q's strides when q is dense, else contiguous), lse (B, H, Nq)."""
    _validate(q, k, v, scale)
    return _forward(q, k, v, scale)


def _forward(q, k, v, scale):
    """The forward op's body on validated inputs: what the registered op and
    the eager fast path of :func:`attention` both run."""
    impl = _backend.select("fastdiff::attention", _FWD, q.device, dict(q=q, k=k, v=v))
    o = empty_like(q)
    lse = empty(*q.shape[:3], dtype=ref.opmath_dtype(q.dtype), device=q.device)
    if q.numel() == 0:
        return o, lse
    if k.shape[2] == 0:  # no keys: o = 0, lse = -inf (as SDPA)
        o.zero_()
        lse.fill_(float("-inf"))
        return o, lse
    return impl.run(q, k, v, scale, o, lse)


@_fwd_op.register_fake
def _(q, k, v, scale):
    _validate(q, k, v, scale)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=ref.opmath_dtype(q.dtype))


def _grad_like(t: torch.Tensor, fake: bool = False) -> torch.Tensor:
    """An empty gradient for t (B, H, N, D): on CPU laid out (B, N, H, D), the layout
    SDPA's CPU flash backward writes (its gradients are then returned as they are, as
    SDPA's own autograd returns them); elsewhere like t.  ``fake``: for the fake impl
    (no NaN poisoning)."""
    if t.device.type == "cpu":
        b, h, n, d = t.shape
        new = torch.empty if fake else empty
        return new(b, n, h, d, dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty_like(t) if fake else empty_like(t)


def _backward_body(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (q, k, v); one not in ``output_mask`` is an empty (0-element) tensor."""
    grad_o = grad_o.to(q.dtype)
    grads = [_grad_like(t) if want else None for want, t in zip(output_mask, (q, k, v))]
    impl = _backend.select(
        "fastdiff::attention_backward", _BWD, q.device, dict(q=q, k=k, v=v, grad_o=grad_o)
    )
    if q.numel() == 0 or k.shape[2] == 0:  # o does not depend on any input
        for g in grads:
            if g is not None:
                g.zero_()
    elif any(output_mask):
        grads = impl.run(grad_o, q, k, v, o, lse, scale, grads)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


# Registered from the plain function so the eager fast path of the backward
# (see _backward) can call the body itself.
_bwd_op = torch.library.custom_op("fastdiff::attention_backward", mutates_args=())(_backward_body)


@_bwd_op.register_fake
def _(grad_o, q, k, v, o, lse, scale, output_mask):
    return tuple(_grad_like(t, fake=True) if want else q.new_empty(0)
                 for want, t in zip(output_mask, (q, k, v)))


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    _backend.remember_backend(ctx)


def _backward(ctx, grad_o, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = _backend.run_backward(ctx, "attention_backward", _backward_body,
                                  grad_o, q, k, v, o, lse, ctx.scale, mask)
    return (*(g if m else None for g, m in zip(grads, mask)), None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# eager calls: the body directly, or a lean autograd.Function, else the dispatcher
_EAGER = _backend.EagerOp("attention", _forward, _setup_context, _backward)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(scale * q kᵀ) v``, non-causal: ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.

    Args:
        q: (B, H, Nq, D) queries, fp16 / bf16 / fp32 / fp64, any strides
            (e.g. ``qkv.unbind`` views of a fused projection).
        k, v: (B, H, Nk, D) keys and values, q's dtype and device; Nk may
            differ from Nq (cross-attention).
        scale: softmax scale; None for D^-0.5.

    Returns:
        o (B, H, Nq, D) in q's dtype, laid out like q when q is dense (else
        contiguous).  Softmax statistics are fp32; the backward recomputes
        the probabilities from the saved logsumexp (no O(N²) memory on the
        triton and CPU paths) and is deterministic.  The gradients of q, k, v
        are laid out like them on CUDA and (B, N, H, D) on CPU, as SDPA's CPU
        backward lays them out.
    """
    _validate(q, k, v, scale)
    s = ref.default_scale(q.shape[-1]) if scale is None else float(scale)
    mode = _backend.eager_mode(q, k, v)
    if mode is not None and q.device.type == "cpu" and q.numel() > 0 and k.shape[2] > 0:
        impl = _backend.select("fastdiff::attention", _FWD, q.device, dict(q=q, k=k, v=v))
        if impl.backend == "torch":
            return _sdpa_cpu(q, k, v, s)
    return _EAGER.run(mode, q, k, v, s)[0]
