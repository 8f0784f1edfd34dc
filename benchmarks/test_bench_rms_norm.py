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
from norm_cases import run_norm_case
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
    run_norm_case(benchmark, kind="rms_norm_silu", group="rms", shape=f"{shape}-b{n}", impl=impl,
                  pass_=pass_, device=device, dtype=dtype,
                  fns={"fastdiff": fused, "eager": eager, "compile": compiled()},
                  inputs=(x, g, scale, shift), rounds=100 if device == "cuda" else 10)
