"""``fastdiff::linear_attention``: the DDPM U-Net's linear attention, fused.

The math is specified in :mod:`fastdiff.reference.linear_attention`.  Two custom
ops carry it -- a forward returning (out, context, lse) and a fused backward --
so torch.compile sees each as one node; ``register_autograd`` ties them.
Validation happens once, in :func:`_validate`, before dispatch.

Backends: ``triton`` (fused kernels, :mod:`fastdiff.kernels.linear_attention`)
and ``torch`` (the reference), which is also the CPU path: there is no C++
kernel.  The reference folds scale / Nk into the small D x E context instead of
scaling q and v (two passes fewer than eager); the registered backward recomputes
the softmaxes from q and k (O(D x E) saved, not O(D x N)).  Eager calls that need
gradients on the torch backend keep the two softmaxes instead, as eager autograd
does (see ``_KEPT_SOFTMAXES``; the same bits).  CPU, fp32, D = 32, 64x64 and
128x128 maps (benchmarks/RESULTS.md): forward 1.2-1.3x the eager einsums, forward +
backward 1.07-1.23x (recomputing, it was 0.58-0.68x).  Degenerate sizes (no head,
no query position, E = 0) run the reference on every backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._alloc import empty
from ..reference import linear_attention as ref

__all__ = ["linear_attention"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMES = ("q", "k", "v")


# --------------------------------------------------------------------------
# Backends.  Inputs as validated (any strides).  The forward returns (out,
# context, lse), the backward (dq, dk, dv) with None where ``output_mask`` is
# False: fresh contiguous tensors, context / lse in the opmath dtype.  The
# torch backend returns the reference's tensors (no copy into preallocated
# outputs: on CPU it is the fast path).
# --------------------------------------------------------------------------


def _torch_fwd(q, k, v, scale):
    return [t.contiguous() for t in ref.linear_attention_forward(q, k, v, scale)]


def _torch_bwd(grad_out, q, k, v, context, lse, scale, output_mask):
    grads = ref.linear_attention_backward(grad_out, q, k, v, context, lse, scale, output_mask)
    return [None if g is None else g.contiguous() for g in grads]


def _triton_fwd(q, k, v, scale):
    from ..kernels.linear_attention import linear_attention_fwd_triton

    out, context, lse = _new_outputs(q, k, v, lambda *s, dtype: empty(*s, dtype=dtype, device=q.device))
    linear_attention_fwd_triton(q, k, v, scale / k.shape[3], out, context, lse)
    return out, context, lse


def _triton_bwd(grad_out, q, k, v, context, lse, scale, output_mask):
    from ..kernels.linear_attention import linear_attention_bwd_triton

    grads = [empty(*t.shape, dtype=t.dtype, device=t.device) if want else None
             for want, t in zip(output_mask, (q, k, v))]
    linear_attention_bwd_triton(grad_out, q, k, v, context, lse, scale / k.shape[3], *grads)
    return grads


_INT32_LIMIT = 2**31


def _head_span(t: torch.Tensor) -> int:
    """Elements from the first to the last of one (b, h) slice, + 1."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))


def _triton_reasons(q, k, v, **_) -> list[str]:
    from ..kernels.linear_attention import MAX_HEAD_DIM

    reasons = []
    if q.dtype == torch.float64:
        reasons.append("float64 inputs are not supported by the triton kernels (fp16/bf16/fp32)")
    d, e = q.shape[2], v.shape[2]
    if max(d, e) > MAX_HEAD_DIM:
        reasons.append(f"head dims D={d}, E={e} exceed the triton kernels' maximum {MAX_HEAD_DIM}")
    spans = [(name, _head_span(t)) for name, t in zip(_NAMES, (q, k, v))] + [("out", e * q.shape[3])]
    for name, span in spans:
        if span >= _INT32_LIMIT:
            reasons.append(f"one head of {name} spans {span} elements, beyond the kernels' 32-bit offsets")
    return reasons


_FWD = (
    _backend.Impl("triton", _triton_fwd, _triton_reasons),
    _backend.Impl("torch", _torch_fwd),
)
_BWD = (
    _backend.Impl("triton", _triton_bwd, _triton_reasons),
    _backend.Impl("torch", _torch_bwd),
)


def _degenerate(q: torch.Tensor, v: torch.Tensor) -> bool:
    """No head, no query position or E = 0: nothing for a kernel to do."""
    return q.shape[0] * q.shape[1] * q.shape[3] * v.shape[2] == 0


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate(q, k, v, scale) -> None:
    for name, t in zip(_NAMES, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"linear_attention: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"linear_attention: {name} must be 4-D (B, H, {'E' if name == 'v' else 'D'}, N), "
                f"got shape {tuple(t.shape)}"
            )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"linear_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not q.device == k.device == v.device:
        raise ValueError(
            f"linear_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    (b, h, d, _), (bk, hk, dk, nk), (bv, hv, _, nv) = q.shape, k.shape, v.shape
    if (bk, hk, dk) != (b, h, d):
        raise ValueError(
            f"linear_attention: k must be (B, H, D, Nk) = ({b}, {h}, {d}, Nk) for q of shape "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if (bv, hv, nv) != (b, h, nk):
        raise ValueError(
            f"linear_attention: v must be (B, H, E, Nk) = ({b}, {h}, E, {nk}) for k of shape "
            f"{tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if d == 0:
        raise ValueError(
            f"linear_attention: the head dim D of q and k must be >= 1, got shape {tuple(q.shape)}"
        )
    if nk == 0:
        raise ValueError(
            f"linear_attention: k and v need at least one position (Nk >= 1), got shape {tuple(k.shape)}"
        )
    numbers = (int, float, torch.SymInt, torch.SymFloat)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers)):
        raise TypeError(f"linear_attention: scale must be a float or None, got {scale!r}")


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------


def _new_outputs(q, k, v, new):
    """out (B, H, E, Nq) in q's dtype; context (B, H, D, E), lse (B, H, D) in opmath."""
    b, h, d, nq = q.shape
    acc = ref.opmath_dtype(q.dtype)
    return (new(b, h, v.shape[2], nq, dtype=q.dtype), new(b, h, d, v.shape[2], dtype=acc),
            new(b, h, d, dtype=acc))


@torch.library.custom_op("fastdiff::linear_attention", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(q, k, v, scale)
    return _forward(q, k, v, scale)


def _forward(q, k, v, scale):
    """The forward op's body on validated inputs: what the registered op and
    the eager fast path of :func:`linear_attention` both run."""
    impl = _backend.select("fastdiff::linear_attention", _FWD, q.device, dict(q=q, k=k, v=v))
    run = _torch_fwd if _degenerate(q, v) else impl.run
    return tuple(run(q, k, v, float(scale)))


@_fwd_op.register_fake
def _(q, k, v, scale):
    _validate(q, k, v, scale)
    return _new_outputs(q, k, v, lambda *s, dtype: q.new_empty(s, dtype=dtype))


def _backward_body(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (q, k, v), contiguous; one not in ``output_mask`` is an
    empty (0-element) tensor."""
    grad_out = grad_out.to(q.dtype)
    if _head_span(grad_out) >= _INT32_LIMIT:  # strided beyond the kernels' offsets: dense is E * Nq
        grad_out = grad_out.contiguous()
    impl = _backend.select("fastdiff::linear_attention_backward", _BWD, q.device, dict(q=q, k=k, v=v))
    run = _torch_bwd if _degenerate(q, v) else impl.run
    grads = run(grad_out, q, k, v, context, lse, float(scale), output_mask)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


# Registered from the plain function so the eager fast path of the backward
# (see _backward) can call the body itself.
_bwd_op = torch.library.custom_op("fastdiff::linear_attention_backward", mutates_args=())(_backward_body)


@_bwd_op.register_fake
def _(grad_out, q, k, v, context, lse, scale, output_mask):
    return tuple(t.new_empty(t.shape) if want else q.new_empty(0)
                 for want, t in zip(output_mask, (q, k, v)))


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    _, context, lse = output
    ctx.save_for_backward(q, k, v, context, lse)
    ctx.scale = scale
    _backend.remember_backend(ctx)


def _backward(ctx, grad_out, _grad_context, _grad_lse):
    q, k, v, context, lse = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = _backend.run_backward(ctx, "linear_attention_backward", _backward_body,
                                  grad_out, q, k, v, context, lse, ctx.scale, mask)
    dq, dk, dv = (g if m else None for g, m in zip(grads, mask))
    return dq, dk, dv, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# eager calls: the body directly, or a lean autograd.Function, else the dispatcher
_EAGER = _backend.EagerOp("linear_attention", _forward, _setup_context, _backward)


def _kept_softmaxes_forward(ctx, q, k, v, scale):
    p, kk, context = ref.softmaxes_and_context(q, k, v)
    ctx.save_for_backward(q, k, v, context, p, kk)
    ctx.scale = scale
    _backend.remember_backend(ctx)
    return ref.output(p, context, scale / k.shape[-1], q.dtype).contiguous()


def _kept_softmaxes_backward(ctx, grad_out):
    q, k, v, context, p, kk = ctx.saved_tensors
    mask = tuple(ctx.needs_input_grad[:3])
    if _backend.eager_fast_path(grad_out, q, k, v):
        grads = ref.backward_from_softmaxes(grad_out.to(q.dtype), p, kk, v, context,
                                            ctx.scale / k.shape[-1], mask)
        return (*(None if g is None else g.contiguous() for g in grads), None)
    # create_graph: the registered backward, as on the op's other paths (it needs the lse)
    grads = _backend.run_backward(ctx, "linear_attention_backward", _backward_body, grad_out,
                                  q, k, v, context, ref.lse_from_softmax(k, kk), ctx.scale, list(mask))
    return (*(g if m else None for g, m in zip(grads, mask)), None)


# The torch backend's eager autograd path: the forward keeps P = softmax_D(q) and
# K = softmax_N(k) for the backward, as eager autograd keeps them, instead of
# recomputing them (the registered op saves only C and lse: its memory-lean contract,
# which the kernels and torch.compile use).  O(D N) saved instead of O(D E); the same
# outputs and gradients, bit for bit.  CPU, fp32, D = 32 at 64x64 / 128x128 maps, 1-2
# threads: forward + backward 1.3-1.5x faster than recomputing.
_KEPT_SOFTMAXES = type("linear_attention_eager_kept", (torch.autograd.Function,), {
    "forward": staticmethod(_backend.without_autocast(_kept_softmaxes_forward)),
    "backward": staticmethod(_backend.without_autocast(_kept_softmaxes_backward)),
})


@_backend.without_autocast
def _output_only(q, k, v, scale):
    """No graph on the torch backend: out alone, without the context / lse the
    registered op also returns (the same bits as its out; autocast off, as there)."""
    p, _, context = ref.softmaxes_and_context(q, k, v)
    return ref.output(p, context, scale / k.shape[-1], q.dtype).contiguous()


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     scale: Optional[float] = None) -> torch.Tensor:
    """The DDPM U-Net's linear attention in its (B, H, D, N) layout.

    ``q = softmax(q, dim=-2) * scale; k = softmax(k, dim=-1); v = v / Nk;
    context = einsum('bhdn,bhen->bhde', k, v);
    out = einsum('bhde,bhdn->bhen', context, q)``.

    Args:
        q: (B, H, D, Nq); k: (B, H, D, Nk); v: (B, H, E, Nk); fp16/bf16/fp32
            (fp64 on the torch backend), any strides (e.g. views of a fused qkv
            projection).  Nq may differ from Nk (memory keys/values).
        scale: multiplies the q softmax; default D^-0.5.

    Returns (B, H, E, Nq) in q's dtype.  Statistics and products are fp32 (fp64
    for fp64 inputs); the backward is fused and deterministic.
    """
    _validate(q, k, v, scale)
    s = ref.default_scale(q) if scale is None else scale
    mode = _backend.eager_mode(q, k, v)
    if mode is not None and not _degenerate(q, v) and _backend.select(
            "fastdiff::linear_attention", _FWD, q.device, dict(q=q, k=k, v=v)).backend == "torch":
        if mode == "autograd":
            return _KEPT_SOFTMAXES.apply(q, k, v, float(s))
        return _output_only(q, k, v, float(s))
    return _EAGER.run(mode, q, k, v, s)[0]
