"""Checks of the C++ GroupNorm kernels (``fastdiff._C``) that the backend-generic
tests in test_group_norm.py do not reach: the extension's own argument checks,
channels_last channel counts that end off every vector width, groups spanning
several position chunks / row blocks, layouts only a direct call can pass
(channels-innermost 1-D), the dz-recomputing path of large groups, and results
that do not depend on the thread count.  The kernels are called directly, with
NaN-filled outputs, and compared with fastdiff.reference.group_norm.
"""

import pytest
import torch

from fastdiff.reference import group_norm as ref
from fastdiff.testing import assert_close

_C = pytest.importorskip("fastdiff._C")
if not hasattr(_C, "group_norm_silu_fwd"):
    pytest.skip("fastdiff._C predates group_norm_silu (rebuild it)", allow_module_level=True)

PARAMS = ("weight", "bias", "emb", "scale", "shift")
NAN = float("nan")


def channels_last(t):
    """t with the channels innermost in memory, for any number of spatial dims."""
    perm = (0, *range(2, t.dim()), 1)
    return t.permute(perm).contiguous().permute([perm.index(i) for i in range(t.dim())])


def make(shape, groups, dtype, cl=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    acc = ref.opmath_dtype(dtype)

    def rnd(*s, sd=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sd

    x, dy = rnd(*shape).to(dtype), rnd(*shape).to(dtype)
    if cl:
        x, dy = channels_last(x), channels_last(dy)
    p = dict(weight=1 + rnd(c, sd=0.5), bias=rnd(c, sd=0.5), emb=rnd(n, c, sd=0.5),
             scale=rnd(n, c, sd=0.5), shift=rnd(n, c, sd=0.5))
    return x, dy, {k: v.to(acc) for k, v in p.items()}


def fwd(x, groups, p, act="silu", eps=1e-5):
    acc = ref.opmath_dtype(x.dtype)
    y = torch.full_like(x, NAN)
    mean = torch.full((x.shape[0], groups), NAN, dtype=acc)
    rstd = torch.full_like(mean, NAN)
    _C.group_norm_silu_fwd(x, *(p.get(k) for k in PARAMS), groups, eps, act, y, mean, rstd)
    return y, mean, rstd


def bwd(dy, x, groups, p, mean, rstd, act="silu"):
    grads = [torch.full_like(x, NAN)] + [torch.full_like(p[k], NAN) for k in PARAMS]
    _C.group_norm_silu_bwd(dy, x, *(p.get(k) for k in PARAMS), mean, rstd, groups, act, *grads)
    return grads


def reference(dy, x, groups, p, act, dtype=None):
    """Forward and backward of the reference, in ``dtype`` (default: x's)."""
    dtype = dtype or x.dtype
    acc = ref.opmath_dtype(dtype)
    x, dy = x.to(dtype), dy.to(dtype)
    q = {k: v.to(acc) for k, v in p.items()}
    a = None if act == "none" else act
    y, mean, rstd = ref.group_norm_silu_forward(x, groups, q["weight"], q["bias"], 1e-5, q["emb"],
                                                q["scale"], q["shift"], a)
    grads = ref.group_norm_silu_backward(dy, x, groups, q["weight"], q["bias"], q["emb"],
                                         q["scale"], q["shift"], mean, rstd, a)
    return y, mean, rstd, grads


def check(shape, groups, dtype, cl, act="silu"):
    x, dy, p = make(shape, groups, dtype, cl)
    y, mean, rstd = fwd(x, groups, p, act)
    grads = bwd(dy, x, groups, p, mean, rstd, act)
    if cl:
        assert y.stride() == x.stride() and grads[0].stride() == x.stride()
    y_ref, mean_ref, rstd_ref, grads_ref = reference(dy, x, groups, p, act)
    y64, _, _, grads64 = reference(dy, x, groups, p, act, torch.float64)
    tol = dict(rtol=1e-5, atol=1e-5)
    assert_close(mean, mean_ref, name="mean", **tol)
    assert_close(rstd, rstd_ref, name="rstd", **tol)
    assert_close(y, y_ref, truth=y64, name="y", **tol)
    for name, g, g_ref, g64 in zip(("x",) + PARAMS, grads, grads_ref, grads64):
        assert_close(g, g_ref, truth=g64, rtol=1e-4, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("act", ["silu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, groups", [
    ((2, 35, 40, 40), 5),   # 2 chunks of positions per sample, many sub-blocks, C = 35
    ((3, 21, 5, 7), 7),     # D = 3
    ((2, 12, 9), 4),        # 1-D, channels innermost (the op layer never passes this)
    ((1, 6, 2, 3, 4), 2),   # 3-D
], ids=str)
def test_channels_last_odd_channels(shape, groups, dtype, act):
    check(shape, groups, dtype, cl=True, act=act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape, groups", [
    ((2, 6, 37, 41), 3),     # rows of 1517 positions: two row blocks, odd tail
    ((1, 4, 512, 384), 1),   # a group of 786432 elements: dz recomputed, not kept
], ids=str)
def test_contiguous_long_rows(shape, groups, dtype):
    check(shape, groups, dtype, cl=False)


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_results_do_not_depend_on_thread_count(cl):
    x, dy, p = make((4, 32, 24, 24), 8, torch.float32, cl)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y, mean, rstd = fwd(x, 8, p)
            results.append([y, mean, rstd, *bwd(dy, x, 8, p, mean, rstd)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_input_zeroes_statistics_and_gradients():
    x, dy, p = make((2, 6, 0), 3, torch.float32)
    y, mean, rstd = fwd(x, 3, p)
    assert torch.equal(mean, torch.zeros(2, 3)) and torch.equal(rstd, torch.zeros(2, 3))
    for g in bwd(dy, x, 3, p, mean, rstd)[1:]:
        assert torch.equal(g, torch.zeros_like(g))


def _call_fwd(x=None, y=None, mean=None, groups=3, act="silu", **params):
    x = torch.randn(2, 6, 4) if x is None else x
    p = dict(make((2, 6, 4), 3, torch.float32)[2], **params)
    y = torch.empty_like(x) if y is None else y
    mean = torch.empty(2, groups) if mean is None else mean
    _C.group_norm_silu_fwd(x, *(p[k] for k in PARAMS), groups, 1e-5, act, y, mean,
                           torch.empty_like(mean))


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.ones(2, 6, 4, dtype=torch.int32)), "x must be float16, bfloat16, float32 or float64"),
    (dict(x=torch.randn(6)), r"x must be \(N, C, \*spatial\)"),
    (dict(groups=4, mean=torch.empty(2, 4)), r"num_groups \(4\) must be positive and divide"),
    (dict(act="gelu"), "act must be 'silu' or 'none', got 'gelu'"),
    (dict(x=torch.randn(2, 6, 8)[..., ::2]), "x must be contiguous or channels_last"),
    (dict(y=torch.empty(2, 6, 4, dtype=torch.float64)), "y must match x"),
    (dict(y=torch.empty(2, 4, 6).transpose(1, 2)), r"y must be in x's memory layout \(contiguous\)"),
    (dict(weight=torch.randn(6, dtype=torch.float64)), r"weight must be a contiguous \[6\] Float"),
    (dict(emb=torch.randn(2, 5)), r"emb must be a contiguous \[2, 6\] Float"),
    (dict(scale=torch.randn(6, 2).t()), r"scale must be .* \(not contiguous\)"),
    (dict(mean=torch.empty(3, 2)), r"mean must be a contiguous \[2, 3\] Float"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_forward_argument_checks(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _call_fwd(**kwargs)


def test_backward_argument_checks():
    x, dy, p = make((2, 6, 4, 4), 3, torch.float32)
    y, mean, rstd = fwd(x, 3, p)
    grads = bwd(dy, x, 3, p, mean, rstd)
    with pytest.raises(RuntimeError, match=r"dx must be in x's memory layout \(contiguous\)"):
        bwd_args = [grads[0].to(memory_format=torch.channels_last)] + grads[1:]
        _C.group_norm_silu_bwd(dy, x, *(p[k] for k in PARAMS), mean, rstd, 3, "silu", *bwd_args)
    with pytest.raises(RuntimeError, match=r"dweight must be a contiguous \[6\] Float"):
        bwd_args = [grads[0], torch.empty(2, 3)] + grads[2:]
        _C.group_norm_silu_bwd(dy, x, *(p[k] for k in PARAMS), mean, rstd, 3, "silu", *bwd_args)
    with pytest.raises(RuntimeError, match="dy must match x"):
        _C.group_norm_silu_bwd(dy.double(), x, *(p[k] for k in PARAMS), mean, rstd, 3, "silu",
                               *grads)


# --------------------------------------------------------------------------
# The whole-body entry points the ops call (group_norm_silu_forward / _backward,
# rms_norm_silu_forward / _backward): bit for bit what the op computes with its
# outputs allocated in Python (the path taken when outputs are NaN-poisoned)
# --------------------------------------------------------------------------


def _op_paths(op, args, grad):
    """(y, grads) of op on the whole-body path and on the Python-allocated one."""
    from fastdiff.testing import poisoned_outputs

    results = []
    for poison in (False, True):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                  else a for a in args]
        with poisoned_outputs() if poison else _nullcontext():
            y = op(*leaves)
            y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves
                                       if isinstance(t, torch.Tensor) and t.requires_grad])
    return results


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("which", ["group_norm", "rms_norm"])
def test_whole_body_entry_points_equal_the_python_allocated_path(which, cl, dtype):
    import fastdiff

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 3, generator=g).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(8, generator=g).to(dtype).requires_grad_()  # cast to opmath inside
    scale = torch.randn(2, 8, generator=g).requires_grad_()
    shift = torch.randn(2, 8, generator=g)  # no gradient wanted
    grad = torch.randn(2, 8, 5, 3, generator=g).to(dtype)
    x.requires_grad_()
    with fastdiff.use_backend("cpu"):
        if which == "group_norm":
            fast, slow = _op_paths(lambda x, w, s, t: fastdiff.ops.group_norm_silu(
                x, 4, w, None, emb=s, scale=s, shift=t), [x, w, scale, shift], grad)
        else:
            fast, slow = _op_paths(lambda x, w, s, t: fastdiff.ops.rms_norm_silu(
                x, w, scale=s, shift=t), [x, w, scale, shift], grad)
    assert fast[0].stride() == slow[0].stride()
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_whole_body_output_mask_length_is_checked():
    x = torch.randn(2, 4, 3)
    mean, rstd = torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="output_mask must have 6 entries, got 2"):
        _C.group_norm_silu_backward(x, x, None, None, None, None, None, mean, rstd, 2, "silu",
                                    [True, False])
    with pytest.raises(RuntimeError, match="output_mask must have 4 entries, got 6"):
        _C.rms_norm_silu_backward(x, x, None, 1e-12, None, None, torch.ones(2, 3), "silu",
                                  [True] * 6)
