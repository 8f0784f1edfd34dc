"""``fastdiff::sampler_step``: the generic fused sampler update.

The math is specified in :mod:`fastdiff.reference.sampler_step`.  This module is
the op's single entry point: validation (once, before dispatch), layout
canonicalisation, the ``torch.library`` registration (schema, fake impl,
autograd) and the dispatch to a backend.  The per-sampler steps in
:mod:`fastdiff.ops.steps` only build coefficient rows and call this op.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _backend
from .._alloc import empty_like
from ..reference import sampler_step as ref
from ..reference.sampler_step import NUM_COEFS

__all__ = ["sampler_step", "NUM_COEFS"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


# --------------------------------------------------------------------------
# Backends.  Each takes canonical inputs (see _canonicalize) and writes into
# the preallocated ``out`` / ``x0_out`` (x0_out may be None).
# --------------------------------------------------------------------------


def _run_torch(out, x0_out, **a):
    o, x0 = ref.sampler_step(**a)
    out.copy_(o)
    if x0_out is not None:
        x0_out.copy_(x0)


def _run_extension(out, x0_out, **a):
    _backend.extension().sampler_step(
        a["x"], a["model_output"], a["coefs"], a["index"], a["prev"], a["prev2"],
        a["noise"], a["seed"], a["guidance_scale"], a["clip_min"], a["clip_max"],
        out, x0_out,
    )


def _run_triton(out, x0_out, **a):
    from ..kernels.sampler_step import sampler_step_triton

    sampler_step_triton(out=out, x0_out=x0_out, **a)


_IMPLS = (
    _backend.Impl("triton", _run_triton),
    _backend.Impl("cuda", _run_extension, _backend.extension_has("sampler_step")),
    _backend.Impl("cpu", _run_extension, _backend.extension_has("sampler_step")),
    _backend.Impl("torch", _run_torch),
)


# --------------------------------------------------------------------------
# Validation and canonical layout
# --------------------------------------------------------------------------


def _check_float(name: str, t: torch.Tensor, x: torch.Tensor, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sampler_step: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"sampler_step: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if t.device != x.device:
        raise ValueError(f"sampler_step: {name} is on {t.device} but x is on {x.device}")
    if t.shape != tuple(shape):  # torch.Size is a tuple
        raise ValueError(
            f"sampler_step: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}"
        )


def _validate(x, model_output, coefs, index, prev, prev2, noise, seed,
              guidance_scale, clip_min, clip_max) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sampler_step: x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("sampler_step: x must have a batch dimension (x.dim() >= 1)")
    _check_float("x", x, x, x.shape)
    batch = x.shape[0]
    if model_output is not None:
        m_shape = (2 * batch,) + tuple(x.shape[1:]) if guidance_scale is not None else x.shape
        _check_float("model_output", model_output, x, m_shape)
    elif guidance_scale is not None:
        raise ValueError("sampler_step: guidance_scale needs model_output (the uncond/cond halves)")
    for name, t in (("prev", prev), ("prev2", prev2), ("noise", noise)):
        if t is not None:
            _check_float(name, t, x, x.shape)
    if noise is not None and seed is not None:
        raise ValueError("sampler_step: give noise or seed, not both")
    if seed is not None:
        if not isinstance(seed, torch.Tensor) or seed.dtype not in _INTS or seed.numel() != 1:
            raise TypeError("sampler_step: seed must be a one-element int32/int64 tensor")
        if seed.device not in (x.device, torch.device("cpu")):
            raise ValueError(f"sampler_step: seed must be on {x.device} or the CPU, got {seed.device}")
    if not isinstance(coefs, torch.Tensor) or coefs.dtype not in (torch.float32, torch.float64):
        raise TypeError("sampler_step: coefs must be a float32 or float64 tensor")
    if coefs.dim() != 2 or coefs.shape[1] != NUM_COEFS or coefs.shape[0] < 1:
        raise ValueError(
            f"sampler_step: coefs must have shape (rows, {NUM_COEFS}), got {tuple(coefs.shape)}"
        )
    if coefs.device != x.device:
        raise ValueError(f"sampler_step: coefs is on {coefs.device} but x is on {x.device}")
    rows = coefs.shape[0]
    if index is None:
        if rows not in (1, batch):
            raise ValueError(
                f"sampler_step: without index, coefs needs 1 or {batch} (batch) rows, got {rows}"
            )
    else:
        if not isinstance(index, torch.Tensor) or index.dtype not in _INTS:
            raise TypeError("sampler_step: index must be an int32/int64 tensor")
        if tuple(index.shape) != (batch,):
            raise ValueError(f"sampler_step: index must have shape ({batch},), got {tuple(index.shape)}")
        if index.device != x.device:
            raise ValueError(f"sampler_step: index is on {index.device} but x is on {x.device}")
    for name, v in (("guidance_scale", guidance_scale), ("clip_min", clip_min), ("clip_max", clip_max)):
        if v is not None and not isinstance(v, (int, float)):
            raise TypeError(f"sampler_step: {name} must be a float or None, got {type(v).__name__}")
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"sampler_step: clip_min ({clip_min}) > clip_max ({clip_max})")


def _check_index_values(index: Optional[torch.Tensor], rows: int) -> None:
    """Row indices must lie in [0, rows): checked on the host for CPU tensors,
    by an asynchronous device-side assert elsewhere (no host sync)."""
    if index is None:
        return
    n = index.numel()
    if n == 0:
        return
    if index.device.type != "cpu":
        lo, hi = torch.aminmax(index)
        torch._assert_async((lo >= 0) & (hi < rows), "sampler_step: index out of range of the coefs rows")
        return
    if n <= 64:  # a batch of indices: a list is cheaper than two reductions + two .item()
        values = index.tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = (int(v) for v in torch.aminmax(index))
    if not (0 <= lo and hi < rows):
        raise IndexError(f"sampler_step: index values must be in [0, {rows}), got [{lo}, {hi}]")


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor like x in the memory order every kernel walks.

    Kernels treat all tensors as flat arrays in one shared dense order in which
    the batch dimension is outermost (so sample b is the slice [b*F, (b+1)*F)).
    That order is x's own when x is dense with batch outermost (contiguous,
    channels_last, ...), else the contiguous one.
    """
    out = empty_like(x)
    batch = x.shape[0]
    if batch > 1 and out.stride(0) != x.numel() // batch:  # x[0].numel(), without the view
        out = empty_like(x, memory_format=torch.contiguous_format)
    return out


def _conform(t: Optional[torch.Tensor], ref_out: torch.Tensor) -> Optional[torch.Tensor]:
    """t in ref_out's dtype and memory order (a copy only when it differs)."""
    if t is None:
        return None
    if t.dtype == ref_out.dtype and t.stride() == ref_out.stride():  # the common case
        return t
    # Equal strides to the dense ref_out (size-1 dims aside) make t dense in
    # the same order; shapes differ at most in the batch dim (CFG's 2B).
    same = t.dtype == ref_out.dtype and all(
        s == r or n == 1 for s, r, n in zip(t.stride(), ref_out.stride(), t.shape)
    )
    if same:
        return t
    return torch.empty_strided(t.shape, ref_out.stride(), dtype=ref_out.dtype,
                               device=t.device).copy_(t)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype).contiguous()``, skipping the calls when t already is."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def _canonicalize(x, model_output, coefs, index, prev, prev2, noise, seed, out):
    acc = ref.opmath_dtype(x.dtype)
    return dict(
        x=_conform(x, out),
        model_output=_conform(model_output, out),
        coefs=_dense(coefs, acc),
        index=None if index is None else _dense(index, torch.int64),
        prev=_conform(prev, out),
        prev2=_conform(prev2, out),
        noise=_conform(noise, out),
        seed=None if seed is None else seed.reshape(1).to(device=x.device, dtype=torch.int64),
    )


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------


def _sampler_step(x, model_output, coefs, index, prev, prev2, noise, seed,
                  guidance_scale, clip_min, clip_max, return_x0):
    """The op's body on validated inputs: what the registered op and the
    eager fast path of :func:`sampler_step` both run.  Returns (out, x0 or
    None)."""
    _check_index_values(index, coefs.shape[0])
    out = kernel_layout(x)
    x0_out = empty_like(out) if return_x0 else None
    args = _canonicalize(x, model_output, coefs, index, prev, prev2, noise, seed, out)
    args.update(guidance_scale=guidance_scale, clip_min=clip_min, clip_max=clip_max)
    impl = _backend.select("fastdiff::sampler_step", _IMPLS, x.device, args)
    if out.numel():
        impl.run(out, x0_out, **args)
    return out, x0_out


@torch.library.custom_op("fastdiff::sampler_step", mutates_args=())
def _sampler_step_op(
    x: torch.Tensor,
    model_output: Optional[torch.Tensor],
    coefs: torch.Tensor,
    index: Optional[torch.Tensor],
    prev: Optional[torch.Tensor],
    prev2: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    guidance_scale: Optional[float],
    clip_min: Optional[float],
    clip_max: Optional[float],
    return_x0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, model_output, coefs, index, prev, prev2, noise, seed,
              guidance_scale, clip_min, clip_max)
    return _sampler_step_outputs(x, model_output, coefs, index, prev, prev2, noise, seed,
                                 guidance_scale, clip_min, clip_max, return_x0)


def _sampler_step_outputs(*args):
    """The registered op's outputs on validated inputs: (out, x0 or a 0-element tensor)."""
    out, x0_out = _sampler_step(*args)
    return out, (x0_out if x0_out is not None else args[0].new_empty(0))


@_sampler_step_op.register_fake
def _(x, model_output, coefs, index, prev, prev2, noise, seed,
      guidance_scale, clip_min, clip_max, return_x0):
    _validate(x, model_output, coefs, index, prev, prev2, noise, seed,
              guidance_scale, clip_min, clip_max)
    out = kernel_layout(x)
    return out, (torch.empty_like(out) if return_x0 else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    (x, model_output, coefs, index, _prev, _prev2, noise, seed,
     guidance_scale, clip_min, clip_max, _return_x0) = inputs
    ctx.save_for_backward(x, model_output, coefs, index, noise, seed)
    ctx.scalars = (guidance_scale, clip_min, clip_max)


def _backward(ctx, grad_out, grad_x0):
    x, model_output, coefs, index, noise, seed = ctx.saved_tensors
    guidance_scale, clip_min, clip_max = ctx.scalars
    needs = ctx.needs_input_grad
    g_x, g_m, g_p, g_q, g_n = ref.sampler_step_backward(
        grad_out, grad_x0, x, model_output, coefs, index, noise, seed,
        guidance_scale, clip_min, clip_max, (needs[0], needs[1], needs[4], needs[5], needs[6]),
    )
    return g_x, g_m, None, None, g_p, g_q, g_n, None, None, None, None, None


_sampler_step_op.register_autograd(_backward, setup_context=_setup_context)
# eager calls: the body directly, or a lean autograd.Function, else the dispatcher
_EAGER = _backend.EagerOp("sampler_step", _sampler_step_outputs, _setup_context, _backward,
                          differentiable=2)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def optional_float(name: str, v) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, torch.Tensor) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python float or None, got {type(v).__name__}")
    return float(v)


def seed_tensor(seed, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """A seed as the op takes it: a one-element int64 tensor (ints wrap to 64 bits),
    made on ``device`` by a fill (no host-to-device copy, which would synchronize)."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or an int tensor, got {type(seed).__name__}")
    seed &= 2**64 - 1
    return torch.full((1,), seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device=device)


def sampler_step(
    x: torch.Tensor,
    model_output: Optional[torch.Tensor],
    coefs: torch.Tensor,
    index: Optional[torch.Tensor] = None,
    *,
    prev: Optional[torch.Tensor] = None,
    prev2: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    guidance_scale: Optional[float] = None,
    clip_range: Optional[Sequence[float]] = None,
    return_x0: bool = False,
):
    """One fused elementwise pass of a sampler update (see the reference module).

    Args:
        x: current sample, (B, *S), fp16/bf16/fp32/fp64.  ``out`` and ``x0``
            have its dtype and shape (and its memory format when it is dense).
        model_output: (B, *S), or (2B, *S) = cat(uncond, cond) with
            ``guidance_scale``; None when the update does not use it.
        coefs: (R, 9) float32/float64 coefficient rows, columns
            ``a_x a_m a_n c_x c_m c_0 c_p c_q c_n`` (see ``reference.sampler_step``).
        index: (B,) int rows of ``coefs`` per sample (a timestep index into a
            precomputed table); None means row b (or row 0 when R == 1).
        prev, prev2: extra state tensors (B, *S) of multistep / Heun updates.
        noise: (B, *S) noise tensor, or ``seed`` (int or one-element int tensor)
            to draw Philox normals inside the kernel.
        guidance_scale: classifier-free guidance weight w.
        clip_range: (lo, hi) clamp of x0 (either bound may be None).
        return_x0: also return the predicted x0.

    Other inputs are converted to x's dtype first.  Returns ``out``, or
    ``(out, x0)`` when ``return_x0``.
    """
    seed = seed_tensor(seed, x.device if isinstance(x, torch.Tensor) else None)
    clip_min, clip_max = (None, None) if clip_range is None else tuple(clip_range)
    guidance_scale = optional_float("guidance_scale", guidance_scale)
    clip_min = optional_float("clip_range[0]", clip_min)
    clip_max = optional_float("clip_range[1]", clip_max)
    args = (x, model_output, coefs, index, prev, prev2, noise, seed,
            guidance_scale, clip_min, clip_max, return_x0)
    _validate(*args[:-1])
    out, x0 = _EAGER((x, model_output, coefs, index, prev, prev2, noise, seed), *args)
    return (out, x0) if return_x0 else out
