"""Attention: fastdiff vs eager vs every SDPA backend vs torch.compile.

Implementations, all on the same q, k, v (B, H, N, D):

* ``fastdiff``  -- ``fastdiff.ops.attention`` (Triton FlashAttention-2 on CUDA,
  SDPA's CPU flash kernel on CPU);
* ``eager``     -- ``softmax(q kᵀ * scale) v`` with the score matrix materialised;
* ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math`` --
  ``F.scaled_dot_product_attention`` pinned to one backend with
  ``torch.nn.attention.sdpa_kernel`` (skipped where that backend cannot run
  the case: e.g. only flash and math exist on CPU);
* ``compile``   -- ``torch.compile`` of eager.

Forward alone, and forward + backward (grads of q, k, v).  ``flops`` counts
the matmuls: 4 B H Nq Nk D forward, 3.5x that forward + backward (the
backward's five matmuls are 2.5x the forward's two; FlashAttention's
convention).  ``bytes``: q, k, v read and o written (forward), plus do read
and dq, dk, dv written (backward) -- what a fused kernel must move at least.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from sampler_cases import DEVICES
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdiff.ops.attention import attention

# name -> (B, H, Nq, Nk, D)
SHAPES = {
    "sd15-self-4096": (2, 8, 4096, 4096, 40),
    "sd15-self-1024": (2, 8, 1024, 1024, 40),
    "sd15-self-256": (2, 8, 256, 256, 40),
    "sd15-cross-4096x77": (2, 8, 4096, 77, 40),
    "sd15-cross-1024x77": (2, 8, 1024, 77, 40),
    "dit-256": (2, 16, 256, 256, 72),
    "dit-1024": (2, 16, 1024, 1024, 72),
    "unet-pixel-256": (2, 4, 256, 256, 32),
    "unet-pixel-1024": (2, 4, 1024, 1024, 32),
    "video-4608": (1, 24, 4608, 4608, 128),
}
# CPU runs only these sizes (fp32).
CPU_MAX_N = 1024
SDPA = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
IMPLS = ["fastdiff", "eager", *SDPA, "compile"]
PARAMS = [
    pytest.param(dev, dtype, shape, id=f"{dev}-{str(dtype)[6:]}-{shape}")
    for dev in DEVICES
    for dtype in ([torch.float32] if dev == "cpu" else [torch.float16, torch.bfloat16])
    for shape, (_, _, nq, nk, _) in SHAPES.items()
    if dev != "cpu" or max(nq, nk) <= CPU_MAX_N
]


def eager(q, k, v):
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device, dtype, shape", PARAMS)
def test_attention(benchmark, device, dtype, shape, pass_, impl):
    b, h, nq, nk, d = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for n in (nq, nk, nk))
    do = torch.randn(b, h, nq, d, generator=g).to(device=device, dtype=dtype)
    backward = pass_ == "fwd+bwd"
    if backward:
        for t in (q, k, v):
            t.requires_grad_()
    if impl in SDPA:
        fn = functools.partial(sdpa, SDPA[impl])
    elif impl == "compile":
        torch._dynamo.reset()  # one compiled graph per case (no recompile limit across cases)
        fn = compiled()
    else:
        fn = {"fastdiff": attention, "eager": eager}[impl]

    if impl == "fastdiff":  # same numbers as SDPA before timing anything
        with torch.no_grad():
            err = (attention(q, k, v).double() - F.scaled_dot_product_attention(q, k, v).double()).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), err

    def step():
        o = fn(q, k, v)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    try:
        timed()
    except RuntimeError as e:
        if impl not in SDPA:
            raise
        pytest.skip(f"{impl} cannot run this case here: {str(e).splitlines()[0]}")
    for _ in range(2):
        timed()
    benchmark.group = f"attn-{device}-{str(dtype)[6:]}-{shape}-{pass_}"
    io = (2 * b * h * nq * d + 2 * b * h * nk * d) * q.element_size()  # q, o; k, v
    flops = 4 * b * h * nq * nk * d
    benchmark.extra_info.update(
        device=device, dtype=str(dtype)[6:], shape=shape, kind=f"attention {pass_}", impl=impl,
        bytes=2 * io if backward else io, flops=int(3.5 * flops) if backward else flops,
    )
    if device == "cuda":
        rounds = 50
    else:
        rounds = 3 if max(nq, nk) >= CPU_MAX_N else 10
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
