"""fastdiff::linear_attention on every backend that can run here, against its reference.

Values and gradients are checked against autograd through the literal formula
(:func:`fastdiff.reference.linear_attention.linear_attention_naive`): fp32 to 1e-4
relative, fp16/bf16 by the 2x rule against the formula in float64.  The Triton
kernels run under the interpreter on CPU at small sizes; their split-reduction
paths are reached with forced plans.
"""

import contextlib

import pytest
import torch

from fastdiff import BackendNotSupportedError, use_backend
from fastdiff.ops.linear_attention import linear_attention
from fastdiff.reference import linear_attention as ref
from fastdiff.testing import assert_close, device_backends, poisoned_outputs

OP_BACKENDS = ("triton", "torch")
DEVICE_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in device_backends() if b in OP_BACKENDS]
LOW = (torch.float16, torch.bfloat16)

# (B, H, D, E, Nq, Nk): lengths 1, 17, 77, 1000; head dims 16/32/40/64, D != E;
# B*H = 1; Nk = Nq + 4 as with the U-Net's memory keys/values.
CASES = [
    (2, 2, 16, 16, 1, 1),
    (1, 1, 32, 32, 17, 17),
    (2, 1, 40, 24, 77, 81),
    (1, 2, 64, 64, 17, 21),
    (1, 1, 40, 40, 1000, 1000),
    (2, 2, 32, 16, 1000, 1004),
]
# What the interpreter can afford (every case on the torch backend and on CUDA).
SMALL = {c for c in CASES if max(c[4], c[5]) <= 81}


def make(b, h, d, e, nq, nk, dtype, device, seed=0, k_std=2.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    return rnd(b, h, d, nq), rnd(b, h, d, nk, std=k_std), rnd(b, h, e, nk), rnd(b, h, e, nq)


def run(backend, q, k, v, grad_out, scale=None):
    """(out, (dq, dk, dv)) of linear_attention under ``backend`` (inputs keep their strides)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with use_backend(backend):
        out = linear_attention(*leaves, scale=scale)
        out.backward(grad_out)
    return out.detach(), tuple(t.grad for t in leaves)


def naive(q, k, v, grad_out, scale=None, dtype=None):
    """Autograd through the literal formula, with inputs cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = ref.linear_attention_naive(*leaves, scale=scale)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), tuple(t.grad for t in leaves)


def check(actual, expected, truth, dtype, name):
    if dtype in LOW:
        assert_close(actual, expected, truth=truth, atol=1e-5, name=name)
    elif dtype == torch.float64:
        assert_close(actual, expected, rtol=1e-10, atol=1e-12, name=name)
    else:
        assert_close(actual, expected, rtol=1e-4, atol=1e-7, name=name)


def check_all(result, q, k, v, grad_out, dtype, scale=None):
    out, grads = result
    out_e, grads_e = naive(q, k, v, grad_out, scale)
    out_t, grads_t = naive(q, k, v, grad_out, scale, torch.float64)
    check(out, out_e, out_t, dtype, "out")
    for name, g, g_e, g_t in zip(("dq", "dk", "dv"), grads, grads_e, grads_t):
        check(g, g_e, g_t, dtype, name)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_gradients(device, backend, dtype, case):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the torch backend (see TestTriton.test_rejects_what_it_cannot_take)")
    if backend == "triton" and device == "cpu" and case not in SMALL:
        pytest.skip("too large for the Triton interpreter")
    q, k, v, grad_out = make(*case, dtype, device)
    with poisoned_outputs():
        result = run(backend, q, k, v, grad_out)
    check_all(result, q, k, v, grad_out, dtype)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_explicit_scale(device, backend):
    q, k, v, grad_out = make(1, 2, 16, 24, 9, 13, torch.float32, device)
    check_all(run(backend, q, k, v, grad_out, scale=3.5), q, k, v, grad_out, torch.float32, scale=3.5)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_strided_inputs(device, backend):
    """Views of a fused qkv 1x1-conv output (what the U-Net passes), (B, H, N, D)
    tensors transposed to (B, H, D, N), and a batch broadcast with stride 0."""
    b, h, d, side = 2, 2, 16, 5
    qkv = torch.randn(b, 3 * h * d, side, side, device=device, requires_grad=True)
    grad_out = torch.randn(b, h, d, side * side, device=device)

    def views(t):
        return t.reshape(b, 3, h, d, side * side).unbind(1)  # (B, H, D, N) each, not contiguous

    with use_backend(backend):
        linear_attention(*views(qkv)).backward(grad_out)
    expected = torch.autograd.grad(ref.linear_attention_naive(*views(qkv)), qkv, grad_out)[0]
    assert_close(qkv.grad, expected, rtol=1e-4, atol=1e-7, name="d qkv")

    q_t = torch.randn(b, h, 11, d, device=device).transpose(-1, -2)  # D stride 1
    k_t = torch.randn(1, h, 13, d, device=device).transpose(-1, -2).expand(b, -1, -1, -1)  # batch stride 0
    v = torch.randn(b, h, 24, 13, device=device)[:, :, ::2]  # E stride 2N
    g_t = torch.randn(b, h, 12, 11, device=device)
    check_all(run(backend, q_t, k_t, v, g_t), q_t, k_t, v, g_t, torch.float32)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_large_and_masked_keys(device, backend):
    """Online softmax: keys growing along N (the running max rises tile after
    tile) and keys at -inf (masked positions; a whole leading stretch of one
    feature) match the reference."""
    q, k, v, grad_out = make(1, 2, 16, 16, 40, 70, torch.float32, device)
    k = k * 10 + torch.linspace(0, 200, 70, device=device)
    k[0, 0, 3, :50] = float("-inf")
    k[0, 1, :, 7] = float("-inf")
    check_all(run(backend, q, k, v, grad_out), q, k, v, grad_out, torch.float32)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 8, 8, 5, 5), (2, 1, 8, 8, 0, 5), (1, 2, 8, 0, 6, 5)], ids=str)
def test_degenerate_sizes(device, backend, shape):
    q, k, v, grad_out = make(*shape, torch.float32, device)
    out, grads = run(backend, q, k, v, grad_out)
    out_e, grads_e = naive(q, k, v, grad_out)
    assert out.shape == out_e.shape
    for g, g_e in zip(grads, grads_e):
        assert_close(g, g_e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradients_are_deterministic(device, backend):
    q, k, v, grad_out = make(2, 2, 16, 16, 33, 37, torch.float32, device)
    _, first = run(backend, q, k, v, grad_out)
    _, second = run(backend, q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_only_needed_gradients(device, backend):
    q, k, v, grad_out = make(1, 2, 16, 16, 9, 9, torch.float32, device)
    _, (dq_e, dk_e, dv_e) = naive(q, k, v, grad_out)
    v_leaf = v.clone().requires_grad_()
    with use_backend(backend):
        linear_attention(q, k, v_leaf).backward(grad_out)
    assert_close(v_leaf.grad, dv_e, rtol=1e-4, atol=1e-7)
    q_leaf = q.clone().requires_grad_()
    with use_backend(backend):
        linear_attention(q_leaf, k, v).backward(grad_out)
    assert_close(q_leaf.grad, dq_e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("wanted", [(True, True, True), (False, True, False), (True, False, True)], ids=str)
def test_kept_softmaxes_path_is_the_registered_ops(dtype, wanted):
    """Eager calls needing gradients on the torch backend keep P and K from the forward
    (the registered op recomputes them): the same output and gradients, bit for bit,
    for every subset of wanted gradients, with strided inputs and Nq != Nk."""
    from fastdiff import _backend

    q, k, v, grad_out = make(2, 2, 12, 8, 19, 23, dtype, "cpu")
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # D stride 1
    results = []
    for force in (False, True):
        leaves = [t.detach().clone().requires_grad_(w) for t, w in zip((q, k, v), wanted)]
        with use_backend("torch"), (_backend.force_dispatcher() if force else contextlib.nullcontext()):
            out = linear_attention(*leaves)
        name = type(out.grad_fn).__name__
        assert name.startswith("linear_attention_eager_kept" if not force else "GeneratedBackwardFor"), name
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for kept, registered in zip(*results):
        assert (kept is None) == (registered is None)
        assert kept is None or torch.equal(kept, registered)


def test_reference_backward_is_autograd_of_the_formula():
    q, k, v, grad_out = make(2, 3, 8, 5, 11, 13, torch.float64, "cpu")
    out, context, lse = ref.linear_attention_forward(q, k, v, 0.7)
    out_e, grads_e = naive(q, k, v, grad_out, 0.7)
    assert_close(out, out_e, rtol=1e-12, atol=1e-14)
    for g, g_e in zip(ref.linear_attention_backward(grad_out, q, k, v, context, lse, 0.7), grads_e):
        assert_close(g, g_e, rtol=1e-12, atol=1e-14)


def test_gradcheck_float64():
    q, k, v, _ = make(1, 2, 4, 3, 5, 6, torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def f(*ts):
        with use_backend("torch"):
            return linear_attention(*ts, scale=0.8)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    q, k, v, _ = make(1, 2, 16, 16, 7, 9, torch.float32, device)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastdiff.linear_attention.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.25))


def test_compiles_without_graph_break():
    q, k, v, grad_out = make(2, 2, 16, 16, 25, 29, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return (linear_attention(q, k, v) * grad_out).sum()

    eager = f(*leaves)
    got = torch.compile(f, fullgraph=True)(*leaves)
    assert_close(got, eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, leaves)
    for g, g_e in zip(grads, torch.autograd.grad(eager, leaves)):
        assert_close(g, g_e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((torch.randn(2, 8, 5), torch.randn(2, 8, 5), torch.randn(2, 8, 5)), {}, ValueError,
     r"q must be 4-D \(B, H, D, N\), got shape \(2, 8, 5\)"),
    ((torch.randn(1, 2, 8, 5), torch.randn(1, 2, 4, 5), torch.randn(1, 2, 8, 5)), {}, ValueError,
     r"k must be \(B, H, D, Nk\) = \(1, 2, 8, Nk\)"),
    ((torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 6), torch.randn(1, 2, 8, 5)), {}, ValueError,
     r"v must be \(B, H, E, Nk\) = \(1, 2, E, 6\)"),
    ((torch.randn(1, 2, 8, 5), torch.randn(1, 3, 8, 5), torch.randn(1, 3, 8, 5)), {}, ValueError,
     "k must be"),
    ((torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 0), torch.randn(1, 2, 8, 0)), {}, ValueError,
     r"at least one position \(Nk >= 1\)"),
    ((torch.randn(1, 2, 0, 5), torch.randn(1, 2, 0, 5), torch.randn(1, 2, 8, 5)), {}, ValueError,
     "head dim D of q and k must be >= 1"),
    ((torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 5).half(), torch.randn(1, 2, 8, 5)), {}, TypeError,
     "must share a dtype"),
    ((torch.ones(1, 2, 8, 5, dtype=torch.int64),) * 3, {}, TypeError, "q must be float16"),
    ((torch.randn(1, 2, 8, 5), "k", torch.randn(1, 2, 8, 5)), {}, TypeError, "k must be a Tensor"),
    ((torch.randn(1, 2, 8, 5),) * 3, {"scale": "big"}, TypeError, "scale must be a float or None"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        linear_attention(*args, **kwargs)


def test_forced_backends_say_why_not():
    q, k, v, _ = make(1, 1, 8, 8, 4, 4, torch.float32, "cpu")
    with use_backend("cpu"), pytest.raises(BackendNotSupportedError, match="has no cpu implementation"):
        linear_attention(q, k, v)


def test_split_products_are_fp32_accurate_on_tf32():
    """The Triton kernels' products (kernels.linear_attention._dot): x = hi + lo
    with hi = x with its 13 low mantissa bits cleared (exact in tf32), and three
    tf32 products hi*hi + hi*lo + lo*hi.  Emulated here (the interpreter computes
    dots in fp32, never in tf32): ~2^-21 relative error, where one tf32 product
    has ~2^-11."""

    def tf32(t):  # truncation: the pessimistic rounding
        return (t.view(torch.int32) & -8192).view(torch.float32)

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(32, 64, generator=g), torch.randn(64, 32, generator=g)
    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = a - a_hi, b - b_hi
    assert torch.equal(a_hi + a_lo, a) and torch.equal(b_hi + b_lo, b)
    exact = a.double() @ b.double()
    split3 = (a_hi.double() @ b_hi.double() + a_hi.double() @ tf32(b_lo).double()
              + tf32(a_lo).double() @ b_hi.double())
    scale = exact.abs().max()
    assert (split3 - exact).abs().max() / scale < 2**-19
    assert (a_hi.double() @ b_hi.double() - exact).abs().max() / scale > 2**-14


class TestTriton:
    """The Triton launchers directly: forced plans reach the split reductions
    (K chunks, combine kernels), several tiles per chunk and a partial last
    chunk at sizes the interpreter can afford."""

    @pytest.fixture(autouse=True)
    def _need_triton(self):
        from fastdiff import backends

        if backends()["triton"] is not None:
            pytest.skip(f"triton backend: {backends()['triton']}")

    @staticmethod
    def launch(q, k, v, grad_out, scale, plan):
        from fastdiff.kernels import linear_attention as kernels

        b, h, d, nq = q.shape
        e = v.shape[2]
        nan = dict(fill_value=float("nan"), device=q.device)
        out = torch.full((b, h, e, nq), dtype=q.dtype, **nan)
        context = torch.full((b, h, d, e), dtype=torch.float32, **nan)
        lse = torch.full((b, h, d), dtype=torch.float32, **nan)
        alpha = scale / k.shape[3]
        kernels.linear_attention_fwd_triton(q, k, v, alpha, out, context, lse, plan=plan)
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        kernels.linear_attention_bwd_triton(grad_out, q, k, v, context, lse, alpha, *grads, plan=plan)
        return out, tuple(grads)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("chunks", [1, 2, 3])
    def test_split_reductions(self, dtype, chunks):
        from fastdiff.kernels.linear_attention import Plan

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Nk = 75 in tiles of 16: 5 tiles, chunks of 2-3 tiles, the last one partial
        q, k, v, grad_out = make(2, 1, 24, 40, 70, 75, dtype, device, k_std=4.0)
        k = k + torch.linspace(-20, 20, 75, device=device).to(dtype)  # the max moves between chunks
        k[0, 0, 5, :40] = float("-inf")  # a feature with no key in the first chunk(s)
        result = self.launch(q, k, v, grad_out, 24**-0.5, Plan(block_n=16, chunks=chunks, num_warps=4))
        check_all(result, q, k, v, grad_out, dtype)

    def test_plan_at_unet_shapes(self):
        from fastdiff.kernels.linear_attention import Plan, plan_for

        # B=8, H=4, D=32 at 64x64 on an H100 (132 SMs): 32 heads, 8 chunks of 4 tiles
        assert plan_for(32, 32, 32, 4096, 132) == Plan(block_n=128, chunks=8, num_warps=4)
        assert plan_for(32, 32, 32, 16384, 132) == Plan(block_n=128, chunks=9, num_warps=4)
        # enough heads to fill the SMs: no split (fp16 inputs)
        assert plan_for(512, 64, 64, 4096, 132, 2) == Plan(block_n=128, chunks=1, num_warps=4)
        # fp32 inputs: half the positions per tile, so a pipelining stage stays 32 KiB
        # (64 KiB stages overflowed an H100's shared memory at D = E = 40)
        assert plan_for(512, 64, 64, 4096, 132, 4) == Plan(block_n=64, chunks=1, num_warps=4)
        assert plan_for(1, 40, 40, 1000, 132, 4) == Plan(block_n=64, chunks=4, num_warps=4)
        # D = 128: narrower tiles, more warps; short sequences are one tile
        assert plan_for(4, 128, 128, 4096, 132, 2) == Plan(block_n=64, chunks=16, num_warps=8)
        assert plan_for(4, 128, 128, 4096, 132, 4) == Plan(block_n=32, chunks=32, num_warps=8)
        assert plan_for(4, 40, 40, 20, 132) == Plan(block_n=32, chunks=1, num_warps=4)

    def test_rejects_what_it_cannot_take(self):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        q, k, v, _ = make(1, 1, 8, 8, 4, 4, torch.float64, device)
        with use_backend("triton"), pytest.raises(BackendNotSupportedError, match="float64 inputs"):
            linear_attention(q, k, v)
        q, k, v, _ = make(1, 1, 8, 200, 4, 4, torch.float32, device)
        with use_backend("triton"), pytest.raises(BackendNotSupportedError, match="E=200 exceed"):
            linear_attention(q, k, v)
