"""fastdiff::group_norm_silu on every backend that can run here, against its reference."""

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import use_backend
from fastdiff.ops.group_norm import group_norm_silu
from fastdiff.testing import assert_close, device_backends, poisoned_outputs

DEVICE_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in device_backends()]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GRAD_NAMES = ("x", "weight", "bias", "emb", "scale", "shift")

# (shape, groups): C/G not a power of two, spatial sizes not multiples of any
# block, 1-D / 2-D / 3-D spatial, batch 1, no spatial dims.
SHAPES = [
    ((2, 6, 5, 7), 3),
    ((1, 12, 9), 4),
    ((2, 10, 3, 4, 5), 5),
    ((3, 8), 2),
    ((2, 40, 17, 17), 8),
]


def make(shape, groups, dtype, device, cond=("weight", "bias", "emb", "scale", "shift"),
         mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]

    def rnd(*s, m=0.0, sd=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sd + m).to(device=device, dtype=dtype)

    kw = dict(x=rnd(*shape, m=mean, sd=std), num_groups=groups)
    sizes = dict(weight=(c,), bias=(c,), emb=(n, c), scale=(n, c), shift=(n, c))
    for name in cond:
        kw[name] = rnd(*sizes[name], sd=0.5) + (1.0 if name == "weight" else 0.0)
    return kw


def run(backend, kw, act="silu", grad_y=None):
    """(y, grads dict) of group_norm_silu under ``backend``."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items()
              if isinstance(v, torch.Tensor)}
    with use_backend(backend):
        y = group_norm_silu(**dict(kw, **leaves), act=act)
        if grad_y is None:
            return y.detach(), {}
        y.backward(grad_y)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def truth(kw, act, grad_y):
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return run("torch", kw64, act, grad_y.double())


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", SHAPES, ids=str)
@pytest.mark.parametrize("act", ["silu", None])
def test_values_and_gradients(device, backend, dtype, shape, groups, act):
    kw = make(shape, groups, dtype, device)
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
@pytest.mark.parametrize("cond", [(), ("weight", "bias"), ("emb",), ("scale", "shift"), ("weight", "shift")],
                         ids=lambda c: "+".join(c) or "none")
def test_optional_inputs(device, backend, cond):
    kw = make((2, 6, 4, 5), 3, torch.float32, device, cond=cond)
    grad_y = torch.randn(2, 6, 4, 5).to(device)
    y, grads = run(backend, kw, "silu", grad_y)
    y_ref, grads_ref = run("torch", kw, "silu", grad_y)
    assert_close(y, y_ref)
    assert set(grads) == {"x", *cond}
    for name in grads:
        assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, name=name)


def test_matches_torch_group_norm_and_silu():
    for backend in [b for d, b in device_backends() if d == "cpu"]:
        x = torch.randn(3, 12, 7, 5)
        w, b = torch.randn(12), torch.randn(12)
        with use_backend(backend):
            assert_close(group_norm_silu(x, 4, w, b), F.silu(F.group_norm(x, 4, w, b)), rtol=1e-5, atol=1e-6)
            assert_close(group_norm_silu(x, 4, w, b, act=None), F.group_norm(x, 4, w, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_large_mean_small_std_in_bf16(device, backend):
    """Two-pass fp32 statistics: inputs with mean 100 and std 4 stay accurate
    (E[x²] - E[x]² would cancel catastrophically)."""
    kw = make((2, 8, 16, 16), 4, torch.bfloat16, device, cond=("weight", "bias"), mean=100.0, std=4.0)
    y, _ = run(backend, kw)
    y_ref, _ = run("torch", kw)
    y64, _ = run("torch", {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert_close(y, y_ref, truth=y64, atol=1e-2)
    assert (y.double() - y64).abs().max() < 0.05


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_layouts(device, backend):
    kw = make((2, 8, 6, 5), 4, torch.float32, device)
    grad_y = torch.randn(2, 8, 6, 5).to(device)
    y_ref, grads_ref = run("torch", kw, "silu", grad_y)
    for x in (kw["x"].to(memory_format=torch.channels_last),
              kw["x"].transpose(2, 3).contiguous().transpose(2, 3),  # strided, not dense in NCHW
              torch.cat([kw["x"], kw["x"]], dim=3)[..., :5]):       # a slice
        y, grads = run(backend, dict(kw, x=x), "silu",
                       grad_y.to(memory_format=torch.channels_last))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, y_ref)
        for name in GRAD_NAMES:
            assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, name=name)
    x3 = torch.randn(2, 8, 3, 4, 5, device=device).to(memory_format=torch.channels_last_3d)
    with use_backend(backend):
        y3 = group_norm_silu(x3, 4)
    with use_backend("torch"):
        assert_close(y3, group_norm_silu(x3.contiguous(), 4))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0)], ids=str)
def test_empty(device, backend, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    with use_backend(backend):
        y = group_norm_silu(x, 3, emb=torch.randn(shape[0], 6, device=device))
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_nan_stays_in_its_group(device, backend):
    kw = make((2, 6, 4, 4), 3, torch.float32, device)
    kw["x"][1, 2, 3, 1] = float("nan")  # sample 1, group 1 (channels 2-3)
    y, _ = run(backend, kw)
    bad = y.isnan()
    assert bad[1, 2:4].all()
    bad[1, 2:4] = False
    assert not bad.any()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradients_are_deterministic(device, backend):
    kw = make((4, 16, 9, 9), 4, torch.float32, device)
    grad_y = torch.randn(4, 16, 9, 9).to(device)
    _, first = run(backend, kw, "silu", grad_y)
    _, second = run(backend, kw, "silu", grad_y)
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", [b for d, b in device_backends() if d == "cpu" and b != "triton"])
def test_gradcheck_float64(backend):
    kw = make((2, 4, 3, 2), 2, torch.float64, "cpu")
    names = list(GRAD_NAMES)
    inputs = [kw[k].clone().requires_grad_() for k in names]

    def f(*ts):
        with use_backend(backend):
            return group_norm_silu(ts[0], 2, ts[1], ts[2], emb=ts[3], scale=ts[4], shift=ts[5])

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    kw = make((2, 6, 3, 4), 3, torch.float32, device)
    for v in kw.values():
        if isinstance(v, torch.Tensor):
            v.requires_grad_()
    args = (kw["x"], 3, kw["weight"], kw["bias"], 1e-5, kw["emb"], kw["scale"], kw["shift"], "silu")
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, args)


def test_compiles_without_graph_break():
    gn = fastdiff.nn.GroupNorm(4, 8, act="silu")
    x, emb = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 8)

    def f(x, emb):
        return gn(x, emb=emb).square().mean()

    compiled = torch.compile(f, fullgraph=True)
    eager = f(x, emb)
    got = compiled(x, emb)
    assert_close(got, eager, rtol=1e-5, atol=1e-6)
    got.backward()
    gx = x.grad.clone()
    x.grad = None
    eager.backward()
    assert_close(gx, x.grad, rtol=1e-5, atol=1e-7)


class TestModule:
    def test_drop_in_for_nn_group_norm(self):
        ref = torch.nn.GroupNorm(4, 12)
        torch.nn.init.normal_(ref.weight)
        torch.nn.init.normal_(ref.bias)
        mod = fastdiff.nn.GroupNorm(4, 12, act="silu")
        assert isinstance(mod, torch.nn.GroupNorm)
        assert list(mod.state_dict()) == list(ref.state_dict())
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(2, 12, 5, 5)
        assert_close(mod(x), F.silu(ref(x)), rtol=1e-5, atol=1e-6)
        plain = fastdiff.nn.GroupNorm(4, 12, eps=1e-6, affine=False)
        assert list(plain.state_dict()) == []
        assert_close(plain(x), F.group_norm(x, 4, eps=1e-6), rtol=1e-5, atol=1e-6)

    def test_conditioning(self):
        mod = fastdiff.nn.GroupNorm(2, 4, act="silu")
        x, emb, scale, shift = torch.randn(3, 4, 5), torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
        expected = F.silu(F.group_norm(x + emb[..., None], 2, mod.weight, mod.bias) * (1 + scale[..., None])
                          + shift[..., None])
        assert_close(mod(x, emb=emb, scale=scale, shift=shift), expected, rtol=1e-5, atol=1e-6)

    def test_bad_act(self):
        with pytest.raises(ValueError, match="act must be 'silu' or None, got 'gelu'"):
            fastdiff.nn.GroupNorm(2, 4, act="gelu")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(x=torch.randn(2, 6, 4), num_groups=4), ValueError, r"num_groups \(4\) must divide the channels of x \(6\)"),
    (dict(x=torch.randn(2, 6, 4), num_groups=3, emb=torch.randn(2, 5)), ValueError, r"emb must have shape \(2, 6\)"),
    (dict(x=torch.randn(2, 6, 4), num_groups=3, weight=torch.randn(3)), ValueError, r"weight must have shape \(6,\)"),
    (dict(x=torch.ones(2, 6, 4, dtype=torch.int32), num_groups=3), TypeError, "x must be float16"),
    (dict(x=torch.randn(2, 6, 4), num_groups=3, act="relu"), ValueError, "act must be 'silu' or None"),
    (dict(x=torch.randn(6), num_groups=3), ValueError, r"x must be \(N, C, \*spatial\)"),
    (dict(x=torch.randn(2, 6, 4), num_groups=0), ValueError, "num_groups must be a positive int"),
    (dict(x=torch.randn(2, 6, 4), num_groups=3, eps=-1.0), ValueError, "eps must be a float >= 0"),
    (dict(x=torch.randn(2, 6, 4), num_groups=3, scale=torch.ones(2, 6, dtype=torch.int64)), TypeError,
     "scale must be a floating-point tensor"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        group_norm_silu(**kwargs)
