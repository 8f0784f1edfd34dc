"""A whole k-diffusion-style sampling loop: 18 Heun steps (35 model calls) with a
tiny model, ``fastdiff.sampling.sample_heun`` vs k-diffusion's eager loop.

The model is one 3x3 convolution, so the time is mostly the sampler's own
elementwise work and per-step overhead.  ``bytes`` counts what the fused
updates must read and write (the model excluded).  k-diffusion's loop is
transcribed (its package imports torchvision); see tests/test_sampling.py.
"""

import pytest
import torch
from sampler_cases import DEVICES
from torch import nn

from fastdiff.sampling import get_sigmas_karras, sample_heun
from fastdiff.testing import max_rel_error

SHAPES = {"latent-8x4x64x64": (8, 4, 64, 64)}
STEPS = 18


@torch.no_grad()
def kd_sample_heun(model, x, sigmas):
    """k-diffusion 0.1.1 ``sample_heun`` without churn (its default)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


class TinyDenoiser(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return self.conv(x) * (s / (1 + s ** 2))


PARAMS = [pytest.param(dev, shape, id=f"{dev}-{shape}") for dev in DEVICES for shape in SHAPES]


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("device, shape", PARAMS)
def test_heun_loop(benchmark, device, shape, impl):
    torch.manual_seed(0)
    dims = SHAPES[shape]
    model = TinyDenoiser(dims[1]).to(device)
    sigmas = get_sigmas_karras(STEPS, 0.002, 80.0, device=device)
    x = torch.randn(dims, device=device) * 80.0
    fns = {"fastdiff": lambda: sample_heun(model, x, sigmas, disable=True),
           "eager": lambda: kd_sample_heun(model, x, sigmas)}
    if impl == "fastdiff":
        assert max_rel_error(fns["fastdiff"](), fns["eager"]()) < 1e-4
    fn = fns[impl]
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    for _ in range(2):
        timed()
    passes = (STEPS - 1) * 8 + 3  # Euler pass: 2 reads + 1 write; Heun pass: 4 + 1; last step Euler only
    benchmark.group = f"{device}-float32-{shape}-heun_loop"
    benchmark.extra_info.update(device=device, dtype="float32", shape=shape, kind="heun_loop",
                                impl=impl, bytes=passes * x.numel() * x.element_size())
    benchmark.pedantic(timed, rounds=5 if device == "cpu" else 20, iterations=1, warmup_rounds=1)
