"""RMSNorm + scale-shift + SiLU (denoising-diffusion-pytorch 2.x): fastdiff vs eager vs torch.compile.

eager: ``silu(F.normalize(x, dim=1) * g * sqrt(C) * (scale + 1) + shift)``, the
U-Net Block of denoising-diffusion-pytorch 2.x (its RMSNorm, then the time
embedding's scale-shift); compile: ``torch.compile`` of it; copy: a same-size
``copy_`` (the one-read-one-write floor of the forward).  Forward alone, and
forward + backward (grads of x, g, scale, shift).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from sampler_cases import DEVICES

import fastdiff

# name -> (C, H, W) of the U-Net's blocks at dim 64, dim_mults (1, 2, 4, 8),
# 32x32 images; batch 64 on GPU, 8 on CPU.
SHAPES = {
    "ddp-64x32x32": (64, 32, 32),
    "ddp-128x16x16": (128, 16, 16),
    "ddp-256x8x8": (256, 8, 8),
    "ddp-512x4x4": (512, 4, 4),
}
BATCH = {"cuda": 64, "cpu": 8}
PARAMS = [
    pytest.param(dev, dtype, shape, id=f"{dev}-{str(dtype)[6:]}-{shape}")
    for dev in DEVICES
    for dtype in ([torch.float32] if dev == "cpu" else [torch.float16, torch.bfloat16])
    for shape in SHAPES
]


def eager(x, g, scale, shift):
    c = x.shape[1]
    h = F.normalize(x, dim=1) * g.view(1, c, 1, 1) * c**0.5
    return F.silu(h * (scale[:, :, None, None] + 1) + shift[:, :, None, None])


def fused(x, g, scale, shift):
    return fastdiff.ops.rms_norm_silu(x, g, scale=scale, shift=shift)


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile", "copy"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device, dtype, shape", PARAMS)
def test_rms_norm_silu(benchmark, device, dtype, shape, pass_, impl):
    c, h, w_ = SHAPES[shape]
    n = BATCH[device]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w_, generator=gen).to(device=device, dtype=dtype)
    g = (1 + 0.1 * torch.randn(c, generator=gen)).to(device=device, dtype=dtype)
    scale = (0.1 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype)
    shift = (0.1 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype)
    fn = {"fastdiff": fused, "eager": eager, "compile": compiled()}.get(impl)
    backward = pass_ == "fwd+bwd"
    if backward and impl != "copy":
        for t in (x, g, scale, shift):
            t.requires_grad_()
    dy = torch.randn_like(x)
    out = torch.empty_like(x)

    if impl == "fastdiff":  # same numbers as eager before timing anything
        y_ref, y = eager(x, g, scale, shift), fused(x, g, scale, shift)
        err = (y.double() - y_ref.double()).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 6e-2), err

    def step():
        if impl == "copy":
            out.copy_(x)
            if backward:  # backward moves dy and x in, dx out: one more copy-equivalent
                out.copy_(dy)
            return
        y = fn(x, g, scale, shift)
        if backward:
            torch.autograd.grad(y, (x, g, scale, shift), dy)

    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    for _ in range(3):
        timed()
    name = f"{shape}-b{n}"
    benchmark.group = f"rms-{device}-{str(dtype)[6:]}-{name}-{pass_}"
    moved = x.numel() * x.element_size() * (5 if backward else 2)
    benchmark.extra_info.update(device=device, dtype=str(dtype)[6:], shape=name,
                                kind=f"rms_norm_silu {pass_}", impl=impl, bytes=moved)
    rounds = 100 if device == "cuda" else 10
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
