"""fastdiff::rms_norm_silu on every backend that can run here, against its reference.

The backend-generic tests run the op through ``fastdiff.ops``; the classes at
the end reach what those cannot: the Triton launchers with forced plans (the
C loop and several combine steps at interpreter sizes) and the extension's own
argument checks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import use_backend
from fastdiff.ops.rms_norm import rms_norm_silu
from fastdiff.reference import rms_norm as ref
from fastdiff.testing import assert_close, device_backends, poisoned_outputs

DEVICE_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in device_backends()]
CPU_BACKENDS = [b for d, b in device_backends() if d == "cpu"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PARAMS = ("weight", "scale", "shift")
GRAD_NAMES = ("x", *PARAMS)

# C = 3 and C = 1000 (past the Triton one-tile limit: the C loop; on the CPU
# two position blocks of 32, the last partial), 1-D / 2-D / 3-D spatial, no
# spatial dims, spatial 1x1, batch 1, sizes that are multiples of no block.
SHAPES = [
    (2, 3, 5, 7),
    (1, 12, 9),
    (2, 10, 3, 4, 5),
    (3, 8),
    (2, 8, 1, 1),
    (2, 1000, 37),
    (2, 40, 17, 17),
]


def make(shape, dtype, device, cond=PARAMS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]

    def rnd(*s, sd=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sd).to(device=device, dtype=dtype)

    kw = dict(x=rnd(*shape))
    sizes = dict(weight=(c,), scale=(n, c), shift=(n, c))
    for name in cond:
        kw[name] = rnd(*sizes[name], sd=0.5) + (1.0 if name == "weight" else 0.0)
    return kw


def run(backend, kw, act="silu", grad_y=None, eps=1e-12):
    """(y, grads dict) of rms_norm_silu under ``backend`` (forward and backward)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items()}
    with use_backend(backend):
        y = rms_norm_silu(**leaves, eps=eps, act=act)
        if grad_y is None:
            return y.detach(), {}
        y.backward(grad_y)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def truth(kw, act, grad_y, eps=1e-12):
    return run("torch", {k: v.double() for k, v in kw.items()}, act, grad_y.double(), eps)


def ddp_block(x, g=None, scale=None, shift=None, eps=1e-12, act="silu"):
    """denoising-diffusion-pytorch 2.x: RMSNorm (g as (1, C, 1, ...)), scale-shift, SiLU."""
    bshape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    h = F.normalize(x, dim=1, eps=eps) * x.shape[1] ** 0.5
    if g is not None:
        h = h * g.reshape(bshape)
    if scale is not None:
        h = h * (scale.reshape(*scale.shape, *bshape[2:]) + 1)
    if shift is not None:
        h = h + shift.reshape(*shift.shape, *bshape[2:])
    return F.silu(h) if act == "silu" else h


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ["silu", None])
def test_values_and_gradients(device, backend, dtype, shape, act):
    kw = make(shape, dtype, device)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)
    with poisoned_outputs():
        y, grads = run(backend, kw, act, grad_y)
    y_ref, grads_ref = run("torch", kw, act, grad_y)
    y64, grads64 = truth(kw, act, grad_y)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(y, y_ref, truth=y64, name="y", **tol)
    for name in GRAD_NAMES:
        # Reductions over many elements: 1e-4 relative (DESIGN.md) for fp32 grads.
        gtol = tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        assert_close(grads[name], grads_ref[name], truth=grads64[name], name=f"grad {name}", **gtol)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("cond", [(), ("weight",), ("scale",), ("shift",), ("weight", "shift"),
                                  ("scale", "shift")], ids=lambda c: "+".join(c) or "none")
def test_optional_inputs(device, backend, cond):
    kw = make((2, 6, 4, 5), torch.float32, device, cond=cond)
    grad_y = torch.randn(2, 6, 4, 5).to(device)
    y, grads = run(backend, kw, "silu", grad_y)
    y_ref, grads_ref = run("torch", kw, "silu", grad_y)
    assert_close(y, y_ref)
    assert set(grads) == {"x", *cond}
    for name in grads:
        assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ["silu", None])
def test_matches_ddp_formula(backend, act):
    """Values and gradients equal autograd of the denoising-diffusion-pytorch block."""
    kw = make((3, 12, 7, 5), torch.float64, "cpu")
    grad_y = torch.randn(3, 12, 7, 5, dtype=torch.float64)
    y, grads = run(backend, kw, act, grad_y)
    leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
    expected = ddp_block(leaves["x"], leaves["weight"], leaves["scale"], leaves["shift"], act=act)
    expected.backward(grad_y)
    assert_close(y, expected.detach(), rtol=1e-12, atol=1e-12)
    for name in GRAD_NAMES:
        assert_close(grads[name], leaves[name].grad, rtol=1e-12, atol=1e-12, name=name)
    # the plain RMSNorm (no scale-shift) in fp32, against the module's own formula
    x, g = kw["x"].float(), kw["weight"].float()
    with use_backend(backend):
        assert_close(rms_norm_silu(x, g, act=act), ddp_block(x, g, act=act), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eps_clamp(device, backend, dtype):
    """Positions whose norm is below eps (an all-zero pixel, a tiny one) follow
    F.normalize: divided by eps, no gradient through the norm."""
    eps = 1e-3
    kw = make((2, 5, 3, 4), dtype, device)
    kw["x"][0, :, 1, 2] = 0
    kw["x"][1, :, 2, 0] *= 1e-5 / kw["x"][1, :, 2, 0].norm()
    grad_y = torch.randn(2, 5, 3, 4, dtype=dtype).to(device)
    y, grads = run(backend, kw, "silu", grad_y, eps=eps)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items()}
    expected = ddp_block(leaves["x"], leaves["weight"], leaves["scale"], leaves["shift"], eps=eps)
    expected.backward(grad_y)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(y, expected.detach(), **tol)
    for name in GRAD_NAMES:
        assert_close(grads[name], leaves[name].grad, name=name,
                     **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)))
    # d x̂ / eps at the clamped positions: large but finite in fp32
    assert torch.isfinite(grads["x"]).all()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_layouts(device, backend):
    kw = make((2, 8, 6, 5), torch.float32, device)
    grad_y = torch.randn(2, 8, 6, 5).to(device)
    y_ref, grads_ref = run("torch", kw, "silu", grad_y)
    for x in (kw["x"].to(memory_format=torch.channels_last),
              kw["x"].transpose(2, 3).contiguous().transpose(2, 3),  # strided, not dense in NCHW
              torch.cat([kw["x"], kw["x"]], dim=3)[..., :5]):       # a slice
        y, grads = run(backend, dict(kw, x=x), "silu", grad_y.to(memory_format=torch.channels_last))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, y_ref)
        for name in GRAD_NAMES:
            assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, name=name)
    x3 = torch.randn(2, 8, 3, 4, 5, device=device).to(memory_format=torch.channels_last_3d)
    with use_backend(backend):
        y3 = rms_norm_silu(x3)
    assert y3.is_contiguous(memory_format=torch.channels_last_3d)
    with use_backend("torch"):
        assert_close(y3, rms_norm_silu(x3.contiguous()))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0)], ids=str)
def test_empty(device, backend, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(6, device=device, requires_grad=True)
    with use_backend(backend):
        y = rms_norm_silu(x, w, shift=torch.randn(shape[0], 6, device=device))
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_nan_stays_in_its_position(device, backend):
    kw = make((2, 6, 4, 4), torch.float32, device)
    kw["x"][1, 2, 3, 1] = float("nan")
    y, _ = run(backend, kw)
    bad = y.isnan()
    assert bad[1, :, 3, 1].all()
    bad[1, :, 3, 1] = False
    assert not bad.any()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradients_are_deterministic(device, backend):
    kw = make((4, 16, 9, 9), torch.float32, device)
    grad_y = torch.randn(4, 16, 9, 9).to(device)
    _, first = run(backend, kw, "silu", grad_y)
    _, second = run(backend, kw, "silu", grad_y)
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    kw = make((2, 4, 3, 2), torch.float64, "cpu")
    inputs = [kw[k].clone().requires_grad_() for k in GRAD_NAMES]

    def f(x, weight, scale, shift):
        with use_backend(backend):
            return rms_norm_silu(x, weight, scale=scale, shift=shift)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    kw = make((2, 6, 3, 4), torch.float32, device)
    for v in kw.values():
        v.requires_grad_()
    args = (kw["x"], kw["weight"], 1e-12, kw["scale"], kw["shift"], "silu")
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastdiff.rms_norm_silu.default, args)


def test_compiles_without_graph_break():
    g = torch.nn.Parameter(1 + 0.1 * torch.randn(8))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)

    def f(x, scale, shift):
        return rms_norm_silu(x, g, scale=scale, shift=shift).square().mean()

    compiled = torch.compile(f, fullgraph=True)
    eager = f(x, scale, shift)
    got = compiled(x, scale, shift)
    assert_close(got, eager, rtol=1e-5, atol=1e-6)
    got.backward()
    gx, gg = x.grad.clone(), g.grad.clone()
    x.grad = g.grad = None
    eager.backward()
    assert_close(gx, x.grad, rtol=1e-5, atol=1e-7)
    assert_close(gg, g.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (8, 128, 16, 16), (8, 256, 8, 8),
                                   (8, 512, 4, 4), (2, 1024, 8, 8)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_ddp_shapes_cuda(dtype, shape, channels_last):
    """The U-Net's shapes on the GPU (default plans, both layouts) against the reference."""
    kw = make(shape, dtype, "cuda")
    if channels_last:
        kw["x"] = kw["x"].to(memory_format=torch.channels_last)
    grad_y = torch.randn(shape, device="cuda", dtype=dtype)
    with poisoned_outputs():
        y, grads = run("triton", kw, "silu", grad_y)
    y_ref, grads_ref = run("torch", kw, "silu", grad_y)
    y64, grads64 = truth(kw, "silu", grad_y)
    tol = dict(rtol=1e-5, atol=1e-5)
    assert_close(y, y_ref, truth=y64, name="y", **tol)
    for name in GRAD_NAMES:
        assert_close(grads[name], grads_ref[name], truth=grads64[name], name=name,
                     rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 1e-5)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(x=torch.randn(2, 6, 4), weight=torch.randn(3)), ValueError, r"weight must have shape \(6,\)"),
    (dict(x=torch.randn(2, 6, 4), scale=torch.randn(2, 5)), ValueError, r"scale must have shape \(2, 6\)"),
    (dict(x=torch.randn(2, 6, 4), shift=torch.randn(6)), ValueError, r"shift must have shape \(2, 6\)"),
    (dict(x=torch.ones(2, 6, 4, dtype=torch.int32)), TypeError, "x must be float16"),
    (dict(x=torch.randn(2, 6, 4), act="relu"), ValueError, "act must be 'silu' or None, got 'relu'"),
    (dict(x=torch.randn(6)), ValueError, r"x must be \(N, C, \*spatial\)"),
    (dict(x=torch.randn(2, 6, 4), eps=-1.0), ValueError, "eps must be a float >= 0"),
    (dict(x=torch.randn(2, 6, 4), weight=torch.ones(6, dtype=torch.int64)), TypeError,
     "weight must be a floating-point tensor"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a Tensor"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        rms_norm_silu(**kwargs)


# --------------------------------------------------------------------------
# Triton launchers with forced plans
# --------------------------------------------------------------------------

_TRITON = fastdiff.backends()["triton"]


@pytest.mark.skipif(_TRITON is not None, reason=f"triton backend: {_TRITON}")
class TestTritonPlans:
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    def check(self, shape, dtype, plan, channels_last=False, cond=PARAMS, act="silu",
              want=GRAD_NAMES):
        from fastdiff.kernels import rms_norm as kernels

        kw = make(shape, dtype, self.DEVICE, cond=cond)
        x = kw["x"]
        if channels_last:
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        acc = ref.opmath_dtype(dtype)
        p = {k: kw[k].to(acc) if k in kw else None for k in PARAMS}
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(x.device, dtype)
        dy = dy.contiguous(memory_format=torch.channels_last) if channels_last else dy
        y = torch.full_like(x, math.nan)
        rstd = torch.full((shape[0], *shape[2:]), math.nan, dtype=acc, device=x.device)
        kernels.rms_norm_silu_fwd_triton(x, *p.values(), 1e-12, act, y, rstd, plan=plan)
        grads = {"x": torch.full_like(x, math.nan) if "x" in want else None}
        for k in PARAMS:
            grads[k] = torch.full_like(p[k], math.nan) if k in want and p[k] is not None else None
        kernels.rms_norm_silu_bwd_triton(dy, x, *p.values(), rstd, 1e-12, act, *grads.values(),
                                         plan=plan)
        a = None if act == "none" else act
        y_ref, rstd_ref = ref.rms_norm_silu_forward(x, p["weight"], 1e-12, p["scale"], p["shift"], a)
        g_ref = ref.rms_norm_silu_backward(dy, x, p["weight"], 1e-12, p["scale"], p["shift"],
                                           rstd_ref, a)
        x64 = x.double()
        p64 = {k: None if v is None else v.double() for k, v in p.items()}
        y64, r64 = ref.rms_norm_silu_forward(x64, p64["weight"], 1e-12, p64["scale"], p64["shift"], a)
        g64 = ref.rms_norm_silu_backward(dy.double(), x64, p64["weight"], 1e-12, p64["scale"],
                                         p64["shift"], r64, a)
        fp64 = dtype == torch.float64
        tol = dict(rtol=1e-12, atol=1e-12) if fp64 else dict(rtol=1e-5, atol=1e-5)
        assert y.stride() == x.stride()
        assert_close(y, y_ref, truth=y64, name="y", **tol)
        assert_close(rstd, rstd_ref, name="rstd", **tol)
        for name, got, exp, t64 in zip(GRAD_NAMES, grads.values(), g_ref, g64):
            if got is None:
                assert name not in want or exp is None, name
                continue
            assert_close(got, exp, truth=t64 if name == "x" else None, name=name,
                         **(tol if fp64 else dict(rtol=1e-4, atol=1e-5)))
        return grads

    def plan(self, **kw):
        from fastdiff.kernels.rms_norm import Plan

        return Plan(**kw)

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
    def test_c_loop(self, channels_last, dtype):
        # C = 13 in chunks of 4 (the last partial), 35 positions in blocks of
        # 8 (the last partial); K = 5 partials combined 2 at a time
        plan = self.plan(one_tile=False, block_c=4, block_p=8, num_warps=1, block_k=2)
        self.check((2, 13, 5, 7), dtype, plan, channels_last)

    @pytest.mark.parametrize("cond, act, want", [
        ((), "silu", ("x",)),
        (("weight",), "none", ("weight",)),         # no dx: the sums only
        (("scale", "shift"), "silu", ("scale", "shift")),
        (PARAMS, "none", GRAD_NAMES),
    ], ids=["x-only", "dweight-only", "scale-shift", "all-no-act"])
    def test_c_loop_optional(self, cond, act, want):
        plan = self.plan(one_tile=False, block_c=4, block_p=4, num_warps=1)
        self.check((3, 6, 9), torch.float32, plan, cond=cond, act=act, want=want)

    def test_one_tile_many_blocks(self):
        plan = self.plan(one_tile=True, block_c=8, block_p=2, num_warps=1, block_k=4)
        self.check((2, 6, 3, 5), torch.float16, plan, channels_last=True)

    def test_default_plans(self):
        from fastdiff.kernels.rms_norm import MAX_ONE_TILE_C, plan_for

        for c, s, cl in ((64, 1024, False), (512, 16, True), (3, 7, False)):
            plan = plan_for(c, s, cl)
            assert plan.one_tile and plan.block_c >= c
            assert plan.block_c * plan.block_p <= 8192
        plan = plan_for(MAX_ONE_TILE_C + 1, 64, False)
        assert not plan.one_tile and plan.block_c * plan.block_p <= 4096


# --------------------------------------------------------------------------
# The extension's argument checks (direct calls)
# --------------------------------------------------------------------------


class TestExtensionChecks:
    @pytest.fixture
    def ext(self):
        ext = fastdiff._backend.extension()
        if ext is None or not hasattr(ext, "rms_norm_silu_fwd"):
            pytest.skip("fastdiff._C without rms_norm_silu")
        return ext

    def test_rejects_bad_tensors(self, ext):
        x = torch.randn(2, 6, 4)
        y, rstd = torch.empty_like(x), torch.empty(2, 4)
        with pytest.raises(RuntimeError, match=r"rms_norm_silu: rstd must be a contiguous \[2, 4\] Float"):
            ext.rms_norm_silu_fwd(x, None, None, None, 1e-12, "silu", y, torch.empty(2, 5))
        with pytest.raises(RuntimeError, match="rms_norm_silu: weight must be a contiguous"):
            ext.rms_norm_silu_fwd(x, torch.ones(6, dtype=torch.float64), None, None, 1e-12, "silu",
                                  y, rstd)
        with pytest.raises(RuntimeError, match="rms_norm_silu: y must match x"):
            ext.rms_norm_silu_fwd(x, None, None, None, 1e-12, "silu", y.half(), rstd)
        with pytest.raises(RuntimeError, match="rms_norm_silu: act must be 'silu' or 'none'"):
            ext.rms_norm_silu_fwd(x, None, None, None, 1e-12, "gelu", y, rstd)
        with pytest.raises(RuntimeError, match="rms_norm_silu: x must be contiguous or channels_last"):
            ext.rms_norm_silu_fwd(x.transpose(0, 2), None, None, None, 1e-12, "silu",
                                  torch.empty(4, 6, 2), torch.empty(4, 2))

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
    def test_several_blocks_and_threads(self, ext, channels_last):
        """561 positions of 40 channels: two position blocks per sample (the
        last partial) in either layout; bit-identical on 1 and 2+ threads."""
        kw = make((3, 40, 33, 17), torch.float32, "cpu")
        if channels_last:
            kw["x"] = kw["x"].to(memory_format=torch.channels_last)
        grad_y = torch.randn(3, 40, 33, 17)
        y_ref, g_ref = run("torch", kw, "silu", grad_y)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            y1, g1 = run("cpu", kw, "silu", grad_y)
            torch.set_num_threads(max(2, threads))
            y2, g2 = run("cpu", kw, "silu", grad_y)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(y1, y2)
        assert_close(y1, y_ref)
        for name in GRAD_NAMES:
            assert torch.equal(g1[name], g2[name]), name
            assert_close(g1[name], g_ref[name], rtol=1e-4, atol=1e-5, name=name)
