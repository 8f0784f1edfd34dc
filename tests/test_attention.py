"""fastdiff::attention on every backend that implements it here, against SDPA and the reference.

Triton runs in interpreter mode without CUDA, so its cases keep B·H·N small;
the long-sequence and GPU-sized cases are marked ``cuda``.
"""

import contextlib
import importlib
import re

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import _backend, use_backend
from fastdiff.ops.attention import attention
from fastdiff.reference import attention as ref
from fastdiff.testing import assert_close, device_backends, poisoned_outputs

# The module, not the function `fastdiff.ops.attention` that shadows its name.
attention_ops = importlib.import_module("fastdiff.ops.attention")

# cpu / cuda have no attention kernel: they decline (test_extension_backends_decline)
DEVICE_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in device_backends() if b in ("triton", "torch")]
TRITON = fastdiff.backends()["triton"]
needs_triton = pytest.mark.skipif(TRITON is not None, reason=f"triton backend: {TRITON}")
LOWP = (torch.float16, torch.bfloat16)

# (B, H, Nq, Nk, D): partial tiles everywhere, head dims that are not powers
# of two, cross-attention to 77 text tokens, one query, one key, B·H = 1.
SHAPES = [
    (1, 2, 17, 17, 16),
    (2, 1, 77, 77, 40),
    (1, 2, 64, 77, 32),
    (1, 1, 1, 77, 64),
    (1, 2, 17, 1, 80),
    (1, 2, 33, 20, 72),
    (1, 1, 20, 45, 128),
]


def make(b, h, nq, nk, d, dtype, device="cpu", seed=0):
    """q, k, v and an output gradient, drawn in fp64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    return rnd(b, h, nq, d), rnd(b, h, nk, d), rnd(b, h, nk, d), rnd(b, h, nq, d)


def eager(q, k, v, scale=None):
    """Materialised softmax at the inputs' precision: plain torch at the same precision."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def run(fn, q, k, v, do, **kw):
    """(o, dq, dk, dv) of fn under autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, **kw)
    o.backward(do)
    return (o.detach(), *(t.grad for t in leaves))


def run_backend(backend, q, k, v, do, **kw):
    with use_backend(backend), poisoned_outputs():
        return run(attention, q, k, v, do, **kw)


NAMES = ("o", "dq", "dk", "dv")


def check(got, q, k, v, do, scale=None):
    """fp32 / fp64 against SDPA (1e-4 relative; fp64 1e-10), fp16 / bf16 by the
    2x rule against the eager version at the same precision, both measured
    against the fp64 reference."""
    truth = run(ref.attention, *(t.double() for t in (q, k, v, do)), scale=scale)
    if q.dtype in LOWP:
        expected, tol = run(eager, q, k, v, do, scale=scale), dict(atol=1e-3)
    else:
        expected = run(F.scaled_dot_product_attention, q, k, v, do, scale=scale)
        tol = dict(rtol=1e-10, atol=1e-12) if q.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, a, e, t in zip(NAMES, got, expected, truth):
        assert_close(a, e, truth=t, name=name, **tol)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients(device, backend, dtype, shape):
    q, k, v, do = make(*shape, dtype, device)
    check(run_backend(backend, q, k, v, do), q, k, v, do)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_torch_backend(shape):
    q, k, v, do = make(*shape, torch.float64)
    check(run_backend("torch", q, k, v, do), q, k, v, do)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("scale", [None, 0.3, 2.0])
def test_scale(device, backend, scale):
    q, k, v, do = make(1, 2, 9, 13, 24, torch.float32, device)
    check(run_backend(backend, q, k, v, do, scale=scale), q, k, v, do, scale=scale)


@pytest.mark.parametrize("shape", [(1, 2, 1000, 1000, 64), (2, 2, 1000, 77, 40)], ids=str)
def test_long_sequences_torch_backend(shape):
    q, k, v, do = make(*shape, torch.float32)
    check(run_backend("torch", q, k, v, do), q, k, v, do)


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [16, 32, 40, 64, 72, 80, 128, 160])
@pytest.mark.parametrize("nq, nk", [(1000, 1000), (1000, 77), (77, 1000)], ids=str)
def test_long_sequences_cuda(dtype, d, nq, nk):
    """The GPU tile configs: several full tiles plus partial ones, every padded head dim."""
    q, k, v, do = make(2, 3, nq, nk, d, dtype, "cuda")
    check(run_backend("triton", q, k, v, do), q, k, v, do)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_qkv_views(device, backend, dtype, monkeypatch):
    """q, k, v as strided views of one projection output (the triton kernels
    read them in place: no copy reaches the launcher)."""
    b, n, h, d = 2, 33, 2, 40
    launched = []
    if backend == "triton":
        from fastdiff.kernels import attention as kernels

        fwd = kernels.attention_fwd_triton
        monkeypatch.setattr(kernels, "attention_fwd_triton",
                            lambda q, k, v, *a, **kw: launched.append((q, k, v)) or fwd(q, k, v, *a, **kw))
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, n, 3 * h * d, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)

    def unbind(t):  # (B, N, 3 H D) -> 3 x (B, H, N, D), row stride 3 H D
        return t.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)

    def conv_layout(t):  # DDPM U-Net: (B, 3 H D, N) -> 3 x (B, H, N, D), column stride N
        return t.view(b, 3, h, d, n).transpose(-1, -2).unbind(1)

    for split, make_input in ((unbind, lambda: qkv), (conv_layout, lambda: qkv.transpose(1, 2).contiguous())):
        x = make_input().clone().requires_grad_()
        q, k, v = split(x)
        assert q._base is x and not q.is_contiguous()
        with use_backend(backend), poisoned_outputs():
            o = attention(q, k, v)
            o.backward(do)
        got = (o.detach(), x.grad)
        if backend == "triton":
            for passed, view in zip(launched.pop(), (q, k, v)):
                assert (passed.data_ptr(), passed.stride()) == (view.data_ptr(), view.stride())
        x_ref = make_input().clone().requires_grad_()
        qr, kr, vr = (t.contiguous() for t in split(x_ref))
        o_ref = (eager if dtype in LOWP else F.scaled_dot_product_attention)(qr, kr, vr)
        o_ref.backward(do)
        x64 = make_input().double().requires_grad_()
        o64 = ref.attention(*split(x64))
        o64.backward(do.double())
        tol = dict(atol=1e-3) if dtype in LOWP else dict(rtol=1e-4, atol=1e-6)
        for name, a, e, t in zip(("o", "dqkv"), got, (o_ref.detach(), x_ref.grad), (o64.detach(), x64.grad)):
            assert_close(a, e, truth=t, name=name, **tol)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_lse_and_mixed_backends(device, backend):
    """lse is part of the spec: a forward on one backend feeds a backward on any other."""
    q, k, v, do = make(1, 2, 19, 23, 40, torch.float32, device)
    scale = 40**-0.5
    o_ref, lse_ref = ref.attention_forward(q.double(), k.double(), v.double(), scale)
    with use_backend(backend):
        o, lse = torch.ops.fastdiff.attention(q, k, v, scale)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 19)
    assert_close(lse, lse_ref.float(), rtol=1e-5, atol=1e-6, name="lse")
    grads_ref = ref.attention_backward(do.double(), q.double(), k.double(), v.double(), o_ref, lse_ref, scale)
    for other in [b for d, b in device_backends() if d == device and b in ("triton", "torch")]:
        with use_backend(other):
            grads = torch.ops.fastdiff.attention_backward(do, q, k, v, o, lse, scale, [True, True, True])
        for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close(g, r.float(), rtol=1e-4, atol=1e-6, name=f"{name} ({backend} -> {other})")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
def test_partial_gradients(device, backend, mask):
    q, k, v, do = make(1, 2, 11, 9, 16, torch.float32, device)
    leaves = [t.clone().requires_grad_(m) for t, m in zip((q, k, v), mask)]
    with use_backend(backend), poisoned_outputs():
        attention(*leaves).backward(do)
    _, *expected = run(F.scaled_dot_product_attention, q, k, v, do)
    for t, m, e in zip(leaves, mask, expected):
        if m:
            assert_close(t.grad, e, rtol=1e-4, atol=1e-6)
        else:
            assert t.grad is None


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 2, 0, 5, 8), (0, 2, 4, 5, 8), (1, 2, 4, 0, 8)], ids=str)
def test_empty(device, backend, shape):
    q, k, v, do = make(*shape, torch.float32, device)
    o, dq, dk, dv = run_backend(backend, q, k, v, do)
    assert (o.shape, dq.shape, dk.shape, dv.shape) == (q.shape, q.shape, k.shape, v.shape)
    assert_close(o, F.scaled_dot_product_attention(q, k, v))  # no keys: zeros
    for g in (dq, dk, dv):
        assert not g.any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nq, nk", [(37, 45), (32, 48), (16, 5)], ids=str)
def test_triton_many_tiles(dtype, nq, nk):
    """16 x 16 tiles: several query and key tiles per slice, full and partial
    last tiles, the loops' masked tail steps; gradients bit-reproducible."""
    from fastdiff.kernels.attention import Config, attention_bwd_triton, attention_fwd_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = make(2, 1, nq, nk, 40, dtype, device)
    scale = 40**-0.5
    tile = Config(16, 16, 1, 1)
    with poisoned_outputs():
        o = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device=device)
        attention_fwd_triton(q, k, v, scale, o, lse, config=tile)
        runs = []
        for _ in range(2):
            grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
            attention_bwd_triton(do, q, k, v, o, lse, scale, *grads, configs=(tile, tile))
            runs.append(grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check((o, *runs[0]), q, k, v, do)


def test_reference_chunks():
    """The chunked reference (the off-CPU torch backend) equals one chunk."""
    q, k, v, do = make(1, 2, 13, 7, 8, torch.float64)
    o, lse = ref.attention_forward(q, k, v, 0.4)
    o_c, lse_c = ref.attention_forward(q, k, v, 0.4, elems_per_chunk=30)  # 2 rows per chunk (14 scores a row)
    assert_close(o_c, o, rtol=1e-14, atol=1e-14)
    assert_close(lse_c, lse, rtol=1e-14, atol=1e-14)
    assert_close(ref.attention_lse(q, k, 0.4, elems_per_chunk=30), lse, rtol=1e-14, atol=1e-14)
    _, *expected = run(ref.attention, q, k, v, do, scale=0.4)
    got = ref.attention_backward(do, q, k, v, o, lse, 0.4, elems_per_chunk=30)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-12, atol=1e-12)
    o_s, lse_s = attention_ops._sdpa_and_reference_fwd(q, k, v, 0.4)
    assert_close(o_s, o, rtol=1e-12, atol=1e-12)
    assert_close(lse_s, lse, rtol=1e-14, atol=1e-14)


def test_gradcheck_float64():
    q, k, v, _ = make(1, 2, 5, 7, 8, torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def f(*ts):
        with use_backend("torch"):
            return attention(*ts, scale=0.5)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    q, k, v, do = make(1, 2, 5, 7, 16, torch.float32, device)
    with use_backend(backend):
        torch.library.opcheck(
            torch.ops.fastdiff.attention.default, tuple(t.requires_grad_() for t in (q, k, v)) + (0.25,)
        )
        o, lse = torch.ops.fastdiff.attention(q, k, v, 0.25)
        torch.library.opcheck(
            torch.ops.fastdiff.attention_backward.default,
            (do, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), 0.25, [True, False, True]),
        )


def test_compiles_without_graph_break():
    q, k, v, _ = make(2, 2, 12, 9, 16, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return attention(q, k, v).square().mean()

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    eager_loss = f(*leaves)
    expected = torch.autograd.grad(eager_loss, leaves)
    assert_close(got, eager_loss, rtol=1e-6, atol=1e-7)
    for g, e in zip(grads, expected):
        assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_auto_dispatch_on_cpu_is_sdpa():
    q, k, v, _ = make(2, 3, 10, 11, 40, torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("layout", ["bnhd", "bhnd", "bhdn"])
def test_cpu_gradients_are_the_flash_kernels(layout, monkeypatch):
    """On CPU the gradients are laid out (B, N, H, D) whatever the inputs' layout, the
    flash backward's layout: its tensors are returned without a copy, registered op and
    eager path alike (the fake agrees: see test_opcheck / test_compiles_without_graph_break)."""
    b, h, n, d = 2, 3, 17, 8
    g = torch.Generator().manual_seed(0)

    def make_input():
        t = torch.randn(b, n, h, d, generator=g)
        if layout == "bnhd":
            return t.transpose(1, 2)
        if layout == "bhnd":
            return t.transpose(1, 2).contiguous()
        return t.permute(0, 2, 3, 1).contiguous().transpose(-1, -2)

    q, k, v, do = (make_input() for _ in range(4))
    bnhd_strides = (n * h * d, d, h * d, 1)
    expected = ref.attention_backward(do.double(), q.double(), k.double(), v.double(),
                                      *(t.double() for t in attention_ops._forward(q, k, v, 0.3)), 0.3)
    for force in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with (_backend.force_dispatcher() if force else contextlib.nullcontext()):
            o = attention(*leaves, scale=0.3)
        grads = torch.autograd.grad(o, leaves, do)
        for got, e in zip(grads, expected):
            assert got.stride() == bnhd_strides
            assert_close(got, e.float(), truth=e, rtol=1e-4, atol=1e-6)
    o, lse = attention_ops._forward(q, k, v, 0.3)
    copies, real_copy = [], torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_",
                        lambda self, src, *a, **kw: copies.append(self) or real_copy(self, src, *a, **kw))
    out = attention_ops._backward_body(do, q, k, v, o, lse, 0.3, [True, True, True])
    monkeypatch.undo()
    assert copies == [] and all(t.stride() == bnhd_strides for t in out)


def _meta(*shape, dtype=torch.float16, stride=None):
    if stride is None:
        return torch.empty(*shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


@pytest.mark.parametrize("dtype, d, backend", [
    (torch.float16, 64, "triton"),
    (torch.float32, 160, "triton"),
    (torch.float64, 64, "torch"),   # dtype
    (torch.float16, 320, "torch"),  # head dim
])
def test_dispatch_for_cuda_inputs(dtype, d, backend):
    """What a CUDA tensor would get: the triton kernels, else SDPA (torch)."""
    if TRITON is not None and backend == "triton":
        pytest.skip(f"triton backend: {TRITON}")
    q = _meta(2, 8, 64, d, dtype=dtype)
    impl = _backend.select("fastdiff::attention", attention_ops._FWD, torch.device("cuda"), dict(q=q, k=q, v=q))
    assert impl.backend == backend


def test_triton_reasons():
    q = _meta(1, 2, 64, 40, dtype=torch.float64)
    assert attention_ops._triton_reasons(q=q, k=q, v=q) == [
        "dtype torch.float64: the triton kernels take float16, bfloat16 and float32"
    ]
    big = _meta(1, 1, 64, 300)
    assert any("head dim 300 exceeds" in r for r in attention_ops._triton_reasons(q=big, k=big, v=big))
    far = _meta(1, 1, 64, 40, stride=(1, 1, 2**25, 1))  # rows 2**25 elements apart
    assert any("k: a (batch, head) slice spans" in r for r in attention_ops._triton_reasons(q=q, k=far, v=q))


@needs_triton
def test_forced_triton_says_why():
    q, k, v, _ = make(1, 1, 4, 4, 8, torch.float64, "cuda" if torch.cuda.is_available() else "cpu")
    with use_backend("triton"), pytest.raises(fastdiff.BackendNotSupportedError,
                                              match="'triton' cannot run fastdiff::attention: dtype torch.float64"):
        attention(q, k, v)


@pytest.mark.parametrize("backend", ["cpu", "cuda"], ids=lambda b: f"forced-{b}")
def test_extension_backends_decline(backend):
    device = "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"
    q, k, v, _ = make(1, 1, 4, 4, 8, torch.float32, device)
    with use_backend(backend), pytest.raises(fastdiff.BackendNotSupportedError,
                                             match=f"{backend!r} cannot run fastdiff::attention"):
        attention(q, k, v)
    if fastdiff.backends()[backend] is None and not _backend.device_reasons(backend, q.device):
        with use_backend(backend), pytest.raises(fastdiff.BackendNotSupportedError,
                                                 match=re.escape(attention_ops.NO_KERNEL)):
            attention(q, k, v)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((_t(2, 8, 40), _t(2, 8, 4, 40), _t(2, 8, 4, 40)), {}, ValueError, r"q must be 4-D \(B, H, Nq, D\)"),
    ((_t(2, 8, 4, 40), _t(8, 4, 40), _t(2, 8, 4, 40)), {}, ValueError, r"k must be 4-D \(B, H, Nk, D\)"),
    ((_t(2, 8, 4, 40), _t(2, 4, 4, 40), _t(2, 8, 4, 40)), {}, ValueError,
     r"k has \(B, H\) = \(2, 4\) but q has \(2, 8\)"),
    ((_t(2, 8, 4, 40), _t(2, 8, 4, 40), _t(1, 8, 4, 40)), {}, ValueError, r"v has \(B, H\) = \(1, 8\)"),
    ((_t(2, 8, 4, 40), _t(2, 8, 4, 32), _t(2, 8, 4, 40)), {}, ValueError, "k has head dim 32 but q has 40"),
    ((_t(2, 8, 4, 40), _t(2, 8, 4, 40), _t(2, 8, 4, 64)), {}, ValueError, "v has head dim 64 but q has 40"),
    ((_t(2, 8, 4, 40), _t(2, 8, 77, 40), _t(2, 8, 76, 40)), {}, ValueError, "v has 76 positions but k has 77"),
    ((_t(2, 8, 4, 40), _t(2, 8, 4, 40, dtype=torch.float16), _t(2, 8, 4, 40)), {}, TypeError,
     "k has dtype torch.float16 but q has torch.float32"),
    ((torch.ones(2, 8, 4, 40, dtype=torch.int64), _t(2, 8, 4, 40), _t(2, 8, 4, 40)), {}, TypeError,
     "q must be float16, bfloat16, float32 or float64, got torch.int64"),
    ((_t(2, 8, 4, 0), _t(2, 8, 4, 0), _t(2, 8, 4, 0)), {}, ValueError, "head dim D must be at least 1"),
    ((_t(2, 8, 4, 40), _t(2, 8, 4, 40), _t(2, 8, 4, 40)), dict(scale=float("nan")), ValueError,
     "scale must be a finite float or None"),
    (([[1.0]], _t(2, 8, 4, 40), _t(2, 8, 4, 40)), {}, TypeError, "q must be a Tensor, got list"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        attention(*args, **kwargs)


@needs_triton
def test_triton_head_dim_limit_matches_configs():
    from fastdiff.kernels.attention import CONFIGS

    assert attention_ops.TRITON_MAX_HEAD_DIM == max(bd for bd, _ in CONFIGS)
