"""Triton-only paths of ``fastdiff::group_norm_silu`` against the plain-torch reference.

tests/test_group_norm.py runs the Triton backend through the op at sizes whose
groups all take the fused single-pass kernels.  Here the launchers are called
directly with a forced :class:`~fastdiff.kernels.group_norm.Plan`, so the
split path (per-chunk statistics merged with Chan's formula, K chunks per
group, channel and spatial tile loops, several combine steps) runs at sizes
the interpreter can afford; and the path choice itself is checked at the real
GPU shapes of the issue.
"""

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import use_backend  # noqa: E402
from fastdiff.kernels import group_norm as kernels  # noqa: E402
from fastdiff.kernels.group_norm import Plan, plan_for  # noqa: E402
from fastdiff.ops.group_norm import group_norm_silu  # noqa: E402
from fastdiff.reference import group_norm as ref  # noqa: E402
from fastdiff.testing import assert_close, poisoned_outputs  # noqa: E402

_UNAVAILABLE = fastdiff.backends()["triton"]
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"triton backend: {_UNAVAILABLE}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = ("weight", "bias", "emb", "scale", "shift")
GRADS = ("dx", "dweight", "dbias", "demb", "dscale", "dshift")

# For the usual (2, 6, 5, 7) x with 2 groups: D = 3 channels per group in
# tiles of 2 (two channel tiles, the last partial); S = 35 positions cut into
# chunks of 16 in tiles of 8 (K = 3, the last chunk 3 positions, so one tile
# partial and one empty); partials combined 2 at a time (two combine steps).
SPLIT = Plan(fused=False, chunks=3, block_d=2, block_s=8, num_warps=1, block_k=2)
# One chunk per group: the huge-group two-pass path (tile loop, no split).
ONE_CHUNK = Plan(fused=False, chunks=1, block_d=4, block_s=16, num_warps=1)
SHAPE = (2, 6, 5, 7)


def make(shape, groups, dtype, cond=PARAMS, mean=0.0, std=1.0, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]

    def rnd(*s, m=0.0, sd=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sd + m)

    x = rnd(*shape, m=mean, sd=std).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    acc = ref.opmath_dtype(dtype)
    sizes = dict(weight=(c,), bias=(c,), emb=(n, c), scale=(n, c), shift=(n, c))
    p = {k: (rnd(*sizes[k], sd=0.5) + (1.0 if k == "weight" else 0.0)).to(acc) if k in cond else None
         for k in PARAMS}
    return x.to(DEVICE), {k: None if v is None else v.to(DEVICE) for k, v in p.items()}


def nan_like(t, **kw):
    return torch.full_like(t, float("nan"), **kw)


def forward(x, p, groups, act, plan, eps=1e-5):
    n = x.shape[0]
    acc = ref.opmath_dtype(x.dtype)
    y = nan_like(x)
    mean = torch.full((n, groups), float("nan"), dtype=acc, device=x.device)
    rstd = mean.clone()
    kernels.group_norm_silu_fwd_triton(x, *(p[k] for k in PARAMS), groups, eps, act, y, mean, rstd,
                                       plan=plan)
    return y, mean, rstd


def backward(dy, x, p, mean, rstd, groups, act, plan, want=GRADS):
    acc = mean.dtype
    out = {"dx": nan_like(x) if "dx" in want else None}
    for name, key in zip(GRADS[1:], PARAMS):
        t = p[key]
        out[name] = torch.full(t.shape, float("nan"), dtype=acc, device=x.device) \
            if name in want and t is not None else None
    kernels.group_norm_silu_bwd_triton(dy, x, *(p[k] for k in PARAMS), mean, rstd, groups, act,
                                       *(out[k] for k in GRADS), plan=plan)
    return out


def reference(x, p, groups, act, dy, dtype=None, eps=1e-5):
    """Forward and backward of the reference, in ``dtype`` (default x's)."""
    dtype = dtype or x.dtype
    acc = ref.opmath_dtype(dtype)
    xd = x.to(dtype)
    pd = {k: None if v is None else v.to(acc) for k, v in p.items()}
    a = None if act == "none" else act
    y, mean, rstd = ref.group_norm_silu_forward(xd, groups, pd["weight"], pd["bias"], eps, pd["emb"],
                                                pd["scale"], pd["shift"], a)
    grads = ref.group_norm_silu_backward(dy.to(dtype), xd, groups, pd["weight"], pd["bias"], pd["emb"],
                                         pd["scale"], pd["shift"], mean, rstd, a)
    return y, mean, rstd, dict(zip(GRADS, grads))


def check(x, p, groups, act, plan, want=GRADS, seed=1):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dy = dy.to(x.dtype).to(DEVICE).contiguous(memory_format=_format(x))
    y, mean, rstd = forward(x, p, groups, act, plan)
    got = backward(dy, x, p, mean, rstd, groups, act, plan, want)
    y_ref, mean_ref, rstd_ref, g_ref = reference(x, p, groups, act, dy)
    y64, mean64, rstd64, g64 = reference(x, p, groups, act, dy, torch.float64)
    fp64 = x.dtype == torch.float64
    tol = dict(rtol=1e-12, atol=1e-12) if fp64 else dict(rtol=1e-5, atol=1e-5)
    gtol = tol if fp64 else dict(rtol=1e-4, atol=1e-5)
    assert y.stride() == x.stride()
    assert_close(y, y_ref, truth=y64, name="y", **tol)
    assert_close(mean, mean_ref, name="mean", **tol)
    assert_close(rstd, rstd_ref, name="rstd", **tol)
    for name in GRADS:
        if got[name] is None:
            assert name not in want or g_ref[name] is None, name
            continue
        truth = g64[name] if name == "dx" else None
        assert_close(got[name], g_ref[name], truth=truth, name=name, **gtol)
    return got


def _format(x):
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


@pytest.mark.parametrize("plan, channels_last, dtype", [
    (SPLIT, False, torch.float32),
    (SPLIT, True, torch.float32),
    (SPLIT, False, torch.bfloat16),
    (SPLIT, True, torch.float16),
    (SPLIT, True, torch.float64),
    (ONE_CHUNK, False, torch.float64),
    (ONE_CHUNK, True, torch.bfloat16),
], ids=["split-fp32", "split-cl-fp32", "split-bf16", "split-cl-fp16", "split-cl-fp64",
        "one_chunk-fp64", "one_chunk-cl-bf16"])
def test_split_path(plan, channels_last, dtype):
    x, p = make(SHAPE, 2, dtype, channels_last=channels_last)
    check(x, p, 2, "silu", plan)


@pytest.mark.parametrize("cond, act, want", [
    ((), "silu", ("dx",)),
    (("weight", "bias"), "none", GRADS),
    (("emb",), "silu", ("demb",)),                       # dx not wanted: only demb's loop
    (("scale", "shift"), "silu", ("dscale", "dshift")),
    (PARAMS, "none", ("dx", "dweight", "dbias")),        # no demb: no S3 partials
], ids=["plain", "affine_noact", "emb_only", "adagn", "no_demb"])
def test_split_path_optional_inputs(cond, act, want):
    x, p = make(SHAPE, 2, torch.float32, cond=cond)
    got = check(x, p, 2, act, SPLIT, want)
    assert {k for k, v in got.items() if v is not None} == {k for k in want if k == "dx" or
                                                            PARAMS[GRADS.index(k) - 1] in cond}


@pytest.mark.parametrize("shape, groups", [((3, 4, 21), 2), ((1, 4, 3, 2, 5), 2), ((4, 8), 2)], ids=str)
def test_split_path_spatial_dims(shape, groups):
    x, p = make(shape, groups, torch.float32)
    check(x, p, groups, "silu", SPLIT)
    if x.dim() == 5:
        check(x.to(memory_format=torch.channels_last_3d), p, groups, "silu", SPLIT)


def test_fused_path_forced():
    x, p = make(SHAPE, 2, torch.float16)
    check(x, p, 2, "silu", Plan(fused=True, chunks=1, block_d=4, block_s=64, num_warps=4))


def test_split_statistics_large_mean_small_std():
    """Chan's merge of per-tile two-pass statistics keeps the variance of an
    offset signal (E[x²] - E[x]² would lose it)."""
    x, p = make((1, 4, 16, 16), 1, torch.float32, cond=(), mean=1000.0, std=0.05)
    y, mean, rstd = forward(x, p, 1, "none", Plan(fused=False, chunks=4, block_d=2, block_s=16, num_warps=1))
    y64, mean64, rstd64 = ref.group_norm_silu_forward(x.double(), 1, None, None, 1e-5, None, None, None, None)
    assert abs(rstd.double().item() / rstd64.item() - 1) < 1e-3
    assert (y.double() - y64).abs().max() < 5e-3


def test_split_gradients_are_deterministic():
    x, p = make(SHAPE, 2, torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _, mean, rstd = forward(x, p, 2, "silu", SPLIT)
    first = backward(dy, x, p, mean, rstd, 2, "silu", SPLIT)
    second = backward(dy, x, p, mean, rstd, 2, "silu", SPLIT)
    for name in GRADS:
        assert torch.equal(first[name], second[name]), name


def test_default_plan_takes_split_path_through_the_op(monkeypatch):
    """With the fusion limits shrunk, the launchers' own choice is the split
    path; the op (autograd included) still matches the reference."""
    monkeypatch.setattr(kernels, "FWD_FUSED_MAX", 16)
    monkeypatch.setattr(kernels, "BWD_FUSED_MAX", 16)
    monkeypatch.setattr(kernels, "SPLIT_MIN_ELEMS", 8)
    monkeypatch.setattr(kernels, "TILE", 32)
    chosen = plan_for(2, 2, 5, 24, 0, kernels.INTERPRETER_SMS, kernels.FWD_FUSED_MAX)
    assert not chosen.fused and chosen.chunks > 1
    x, p = make((2, 10, 4, 6), 2, torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in dict(p, x=x).items()}
    with poisoned_outputs(), use_backend("triton"):
        y = group_norm_silu(**leaves, num_groups=2)
        y.backward(torch.ones_like(y))
    leaves_ref = {k: v.clone().requires_grad_() for k, v in dict(p, x=x).items()}
    with use_backend("torch"):
        y_ref = group_norm_silu(**leaves_ref, num_groups=2)
        y_ref.backward(torch.ones_like(y_ref))
    assert_close(y.detach(), y_ref.detach())
    for k in leaves:
        assert_close(leaves[k].grad, leaves_ref[k].grad, rtol=1e-4, atol=1e-5, name=k)


MB = 1 << 20


@pytest.mark.parametrize("n, c, hw, groups, fused, min_chunks", [
    (128, 128, 32 * 32, 32, True, 1),       # DDPM CIFAR: N*G = 4096 programs, 4096-element groups
    (2, 1280, 8 * 8, 32, True, 1),          # SD 1280x8², tiny: one launch
    (2, 320, 64 * 64, 32, False, 4),        # SD 320x64²: N*G = 64 on 132 SMs -> split
    (2, 640, 32 * 32, 32, False, 4),        # SD 640x32²
    (1, 128, 512 * 512, 32, False, 8),      # VAE: 1M-element groups, two-pass, split
    (8, 128, 512 * 512, 32, False, 2),      # VAE batch 8: still split (huge groups)
], ids=["cifar", "sd_1280x8", "sd_320x64", "sd_640x32", "vae", "vae_b8"])
def test_plan_on_h100_shapes(n, c, hw, groups, fused, min_chunks):
    d = c // groups
    plan = plan_for(n, groups, d, hw, n * c * hw * 2, 132, kernels.FWD_FUSED_MAX)
    assert plan.fused == fused
    assert plan.chunks >= min_chunks
    if plan.fused:
        assert plan.block_d >= d and plan.block_s >= hw
    else:
        assert plan.block_d * plan.block_s <= kernels.TILE
        cs, k = kernels._chunking(hw, plan)
        assert cs % plan.block_s == 0 and (k - 1) * cs < hw <= k * cs


def test_launcher_arithmetic_matches_triton():
    """The launchers' plain-Python cdiv / next_power_of_2 (Triton's cost ~1.6 µs a call)
    give Triton's answers."""
    from fastdiff.kernels._common import cdiv, next_power_of_2

    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 128, 4097):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
