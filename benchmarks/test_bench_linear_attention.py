"""The DDPM U-Net's linear attention: fastdiff vs eager vs torch.compile.

eager: the einsum formulation of denoising-diffusion-pytorch's LinearAttention
(softmax q over D times scale, softmax k over N, v / N, two einsums), in the
inputs' dtype; compile: ``torch.compile`` of it.  Shapes are the U-Net's
linear-attention blocks at 64x64 and 128x128 feature maps (H=4 heads of
D=32).  Forward alone, and forward + backward (grads of q, k, v).
"""

import functools

import pytest
import torch
from sampler_cases import DEVICES

from fastdiff.ops.linear_attention import linear_attention

# name -> (B, H, D, N); E = D
SHAPES = {
    "cpu": {
        "b2-h4-d32-64x64": (2, 4, 32, 64 * 64),
        "b1-h4-d32-128x128": (1, 4, 32, 128 * 128),
    },
    "cuda": {
        "b8-h4-d32-64x64": (8, 4, 32, 64 * 64),
        "b4-h4-d32-128x128": (4, 4, 32, 128 * 128),
        "b8-h4-d32-128x128": (8, 4, 32, 128 * 128),
    },
}
PARAMS = [
    pytest.param(dev, dtype, shape, id=f"{dev}-{str(dtype)[6:]}-{shape}")
    for dev in DEVICES
    for dtype in ([torch.float32] if dev == "cpu" else [torch.float16, torch.bfloat16])
    for shape in SHAPES[dev]
]


def eager(q, k, v):
    scale = q.shape[-2] ** -0.5
    q = q.softmax(dim=-2) * scale
    k = k.softmax(dim=-1)
    v = v / v.shape[-1]
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    return torch.einsum("bhde,bhdn->bhen", context, q)


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device, dtype, shape", PARAMS)
def test_linear_attention(benchmark, device, dtype, shape, pass_, impl):
    b, h, d, n = SHAPES[device][shape]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, d, n, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    fn = {"fastdiff": linear_attention, "eager": eager, "compile": compiled()}[impl]
    backward = pass_ == "fwd+bwd"
    if backward:
        for t in (q, k, v):
            t.requires_grad_()
    do = torch.randn(b, h, d, n, generator=g).to(device=device, dtype=dtype)

    if impl == "fastdiff":  # same numbers as eager before timing anything
        y_ref, y = eager(q, k, v), linear_attention(q, k, v)
        err = (y.double() - y_ref.double()).abs().max().item() / y_ref.double().abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), err

    def step():
        y = fn(q, k, v)
        if backward:
            torch.autograd.grad(y, (q, k, v), do)

    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    for _ in range(3):
        timed()
    benchmark.group = f"linattn-{device}-{str(dtype)[6:]}-{shape}-{pass_}"
    # least traffic: q, k, v in and out out; backward adds q, k, v, dO in and dq, dk, dv out
    moved = q.numel() * q.element_size() * (4 + (7 if backward else 0))
    benchmark.extra_info.update(device=device, dtype=str(dtype)[6:], shape=shape,
                                kind=f"linear_attention {pass_}", impl=impl, bytes=moved)
    rounds = 100 if device == "cuda" else 5
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
