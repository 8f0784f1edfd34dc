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
from sampler_cases import DEVICES

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


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile", "copy"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device, dtype, shape", PARAMS)
def test_group_norm_silu(benchmark, device, dtype, shape, pass_, impl):
    n, c, h, w_ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w_, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(c, generator=g)).to(device=device, dtype=dtype)
    emb = torch.randn(n, c, generator=g).to(device=device, dtype=dtype)
    fn = {"fastdiff": fused, "eager": eager, "compile": compiled()}.get(impl)
    backward = pass_ == "fwd+bwd"
    if backward and impl != "copy":
        for t in (x, w, b, emb):
            t.requires_grad_()
    dy = torch.randn_like(x)
    out = torch.empty_like(x)

    if impl == "fastdiff":  # same numbers as eager before timing anything
        y_ref, y = eager(x, w, b, emb), fused(x, w, b, emb)
        # relative to the largest output: bf16 outputs near 8 are 2**-5 apart
        err = (y.double() - y_ref.double()).abs().max().item() / y_ref.double().abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), err

    def step():
        if impl == "copy":
            out.copy_(x)
            if backward:  # backward moves dy and x in, dx out: one more copy-equivalent
                out.copy_(dy)
            return
        y = fn(x, w, b, emb)
        if backward:
            torch.autograd.grad(y, (x, w, b, emb), dy)

    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    for _ in range(3):
        timed()
    benchmark.group = f"gn-{device}-{str(dtype)[6:]}-{shape}-{pass_}"
    moved = x.numel() * x.element_size() * (5 if backward else 2)
    benchmark.extra_info.update(device=device, dtype=str(dtype)[6:], shape=shape,
                                kind=f"group_norm_silu {pass_}", impl=impl, bytes=moved)
    rounds = 100 if device == "cuda" else (3 if "vae" in shape else 10)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
