"""GroupNorm + time-embedding add + SiLU: fastdiff vs eager vs torch.compile.

eager: ``silu(group_norm(x + emb[:, :, None, None], G, w, b))`` (the DDPM /
diffusers ResnetBlock sequence); compile: ``torch.compile`` of it; copy: a
same-size ``copy_`` (the one-read-one-write floor of the forward).  Forward
alone, and forward + backward (grads of x, weight, bias, emb).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from norm_cases import run_norm_case
from sampler_cases import CUDA_CPP, DEVICES, cuda_cpp_skip_reason, on_backend

import fastdiff

GROUPS = 32
# name -> (N, C, H, W)
SHAPES = {
    "sd-320x64x64": (2, 320, 64, 64),
    "sd-640x32x32": (2, 640, 32, 32),
    "sd-1280x16x16": (2, 1280, 16, 16),
    "sd-1280x8x8": (2, 1280, 8, 8),
    "ddpm-cifar-128x32x32": (128, 128, 32, 32),
    "vae-128x512x512": (1, 128, 512, 512),
}
PARAMS = [
    pytest.param(dev, dtype, shape, id=f"{dev}-{str(dtype)[6:]}-{shape}")
    for dev in DEVICES
    for dtype in ([torch.float32] if dev == "cpu" else [torch.float16, torch.bfloat16])
    for shape in SHAPES
]


def eager(x, w, b, emb):
    return F.silu(F.group_norm(x + emb[:, :, None, None], GROUPS, w, b))


def fused(x, w, b, emb):
    return fastdiff.ops.group_norm_silu(x, GROUPS, w, b, emb=emb)


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile", "copy", CUDA_CPP])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device, dtype, shape", PARAMS)
def test_group_norm_silu(benchmark, device, dtype, shape, pass_, impl):
    if impl == CUDA_CPP and cuda_cpp_skip_reason(device):
        pytest.skip(cuda_cpp_skip_reason(device))
    n, c, h, w_ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w_, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(c, generator=g)).to(device=device, dtype=dtype)
    emb = torch.randn(n, c, generator=g).to(device=device, dtype=dtype)
    run_norm_case(benchmark, kind="group_norm_silu", group="gn", shape=shape, impl=impl, pass_=pass_,
                  device=device, dtype=dtype, fns={"fastdiff": fused, "eager": eager, "compile": compiled(),
                       CUDA_CPP: on_backend(fused, "cuda")},
                  inputs=(x, w, b, emb), rounds=100 if device == "cuda" else (3 if "vae" in shape else 10))
