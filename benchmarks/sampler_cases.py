"""Benchmark cases of the fused sampler step: fastdiff vs eager vs torch.compile.

Each case builds, from one set of inputs, three callables computing the same
update:

* ``fastdiff`` -- one ``sampler_step`` pass reading a precomputed coefficient
  table with a per-sample index (what a scheduler does after set_timesteps);
* ``eager``    -- the multi-kernel torch formulation of diffusers /
  k-diffusion (gather schedule values per sample, broadcast, combine);
* ``compile``  -- ``torch.compile`` of that eager function.

plus ``copy`` (``out.copy_(x)``, the memory floor for one read + one write).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

import fastdiff
from fastdiff import ops, schedules

# FASTDIFF_BENCH_DEVICES=cuda (comma-separated) limits a run to some devices:
# a GPU machine's run then leaves the CPU rows (measured elsewhere) alone.
DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           if d in os.environ.get("FASTDIFF_BENCH_DEVICES", d).split(",")]
SHAPES = {
    "pixel-64x3x32x32": (64, 3, 32, 32),
    "latent-8x4x64x64": (8, 4, 64, 64),
    "latent-16x4x128x128": (16, 4, 128, 128),
}
KINDS = ("ddpm", "ddpm_seed", "ddim_cfg", "euler", "heun", "dpmpp_2m", "add_noise")
IMPLS = ("fastdiff", "eager", "compile", "copy")
# The fused op forced onto fastdiff's CUDA C++ kernels: on a GPU the default is Triton,
# and this row says per shape which of the two is faster (skipped where there is no GPU
# or fastdiff._C was built without CUDA).
CUDA_CPP = "fastdiff[cuda]"


def cuda_cpp_skip_reason(device: str):
    """Why the ``fastdiff[cuda]`` row cannot run on ``device`` (None: it can)."""
    if device != "cuda":
        return "the CUDA C++ kernels run on CUDA tensors only"
    return fastdiff.backends()["cuda"]


def on_backend(fn: Callable, name: str) -> Callable:
    """fn run with fastdiff's backend forced to ``name`` (the backward too: the forward
    records it for autograd)."""
    def run(*args, **kwargs):
        with fastdiff.use_backend(name):
            return fn(*args, **kwargs)
    return run


@dataclass
class Case:
    fns: dict[str, Callable[[], torch.Tensor]]
    bytes_moved: int  # bytes the fused pass must read + write at least


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


# -- eager formulations, written as diffusers / k-diffusion write them -------


def eager_ddpm(x, eps, noise, t, ab):
    ab_t = _bshape(ab[t], x)
    ab_prev = _bshape(torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones_like(ab[t])), x)
    beta_t, beta_prev = 1 - ab_t, 1 - ab_prev
    cur_alpha = ab_t / ab_prev
    cur_beta = 1 - cur_alpha
    x0 = (x - beta_t**0.5 * eps) / ab_t**0.5
    x0 = x0.clamp(-1, 1)
    mean = (ab_prev**0.5 * cur_beta / beta_t) * x0 + (cur_alpha**0.5 * beta_prev / beta_t) * x
    var = (beta_prev / beta_t * cur_beta).clamp(min=1e-20)
    return mean + var**0.5 * noise


def eager_ddim_cfg(x, eps_pair, t, t_prev, ab, w):
    eps_u, eps_c = eps_pair.chunk(2)
    eps = eps_u + w * (eps_c - eps_u)
    ab_t, ab_prev = _bshape(ab[t], x), _bshape(ab[t_prev], x)
    x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
    return ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps


def eager_euler(x, denoised, sigma, sigma_next):
    s, sn = _bshape(sigma, x), _bshape(sigma_next, x)
    d = (x - denoised) / s
    return x + d * (sn - s)


def eager_heun(x, x_mid, denoised, denoised_mid, sigma, sigma_next):
    s, sn = _bshape(sigma, x), _bshape(sigma_next, x)
    d = (x - denoised) / s
    d_2 = (x_mid - denoised_mid) / sn
    return x + (d + d_2) / 2 * (sn - s)


def eager_dpmpp_2m(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    sp, s, sn = (_bshape(v, x) for v in (sigma_prev, sigma, sigma_next))
    t, t_next = -s.log(), -sn.log()
    h = t_next - t
    r = (t - (-sp.log())) / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sn / s) * x - (-h).expm1() * denoised_d


def eager_add_noise(x0, noise, t, ab):
    ab_t = _bshape(ab[t], x0)
    return ab_t**0.5 * x0 + (1 - ab_t) ** 0.5 * noise


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def build(kind: str, shape, device: str, dtype: torch.dtype) -> Case:
    """The callables of one benchmark case; every one returns its result."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    batch = shape[0]
    x, m, z = rnd(*shape), rnd(*shape), rnd(*shape)
    out = torch.empty_like(x)
    itemsize = x.element_size()
    ab32 = schedules.alphas_cumprod(schedules.betas("linear", 1000)).to(device)
    t = torch.randint(1, 1000, (batch,), generator=g).to(device)
    sigmas = schedules.karras_sigmas(50, 0.002, 80.0).to(device)
    step = torch.randint(1, 48, (batch,), generator=g).to(device)  # σ-space step per sample
    s_prev, s_cur, s_next = sigmas[step - 1], sigmas[step], sigmas[step + 1]
    fns: dict[str, Callable[[], torch.Tensor]] = {"copy": lambda: out.copy_(x)}

    if kind in ("ddpm", "ddpm_seed"):
        t_all = torch.arange(1000, device=device)
        ab = schedules.alphas_cumprod(schedules.betas("linear", 1000)).double().to(device)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        table = ops.ddpm_coefs(ab, ab_prev, t_all > 0).float()
        if kind == "ddpm":
            fns["fastdiff"] = lambda: ops.sampler_step(x, m, table, t, noise=z, clip_range=(-1, 1))
            eager = functools.partial(eager_ddpm, x, m, z, t, ab32)
            fns["eager"] = eager
            fns["compile"] = lambda: _compiled(eager_ddpm)(x, m, z, t, ab32)
            moved = 4 * x.numel() * itemsize
        else:  # noise drawn inside the kernel: one tensor less to read
            seed = torch.tensor([1], device=device)
            fns["fastdiff"] = lambda: ops.sampler_step(x, m, table, t, seed=seed, clip_range=(-1, 1))
            fns["eager"] = lambda: eager_ddpm(x, m, torch.randn_like(x), t, ab32)
            fns["compile"] = lambda: _compiled(eager_ddpm)(x, m, torch.randn_like(x), t, ab32)
            moved = 3 * x.numel() * itemsize
    elif kind == "ddim_cfg":
        pair = rnd(2 * batch, *shape[1:])
        t_prev = (t - 20).clamp(min=0)
        coefs = ops.ddim_coefs(ab32.double()[t], ab32.double()[t_prev]).float()
        fns["fastdiff"] = lambda: ops.sampler_step(x, pair, coefs, guidance_scale=7.5)
        fns["eager"] = lambda: eager_ddim_cfg(x, pair, t, t_prev, ab32, 7.5)
        fns["compile"] = lambda: _compiled(eager_ddim_cfg)(x, pair, t, t_prev, ab32, 7.5)
        moved = 4 * x.numel() * itemsize
    elif kind == "euler":
        table = ops.euler_coefs(sigmas[:-1].double(), sigmas[1:].double()).float()
        fns["fastdiff"] = lambda: ops.sampler_step(x, m, table, step)
        fns["eager"] = lambda: eager_euler(x, m, s_cur, s_next)
        fns["compile"] = lambda: _compiled(eager_euler)(x, m, s_cur, s_next)
        moved = 3 * x.numel() * itemsize
    elif kind == "heun":
        x_mid, d_mid = rnd(*shape), rnd(*shape)
        table = ops.heun_coefs(sigmas[:-1].double(), sigmas[1:].double()).float()
        fns["fastdiff"] = lambda: ops.sampler_step(x_mid, d_mid, table, step, prev=x, prev2=m)
        fns["eager"] = lambda: eager_heun(x, x_mid, m, d_mid, s_cur, s_next)
        fns["compile"] = lambda: _compiled(eager_heun)(x, x_mid, m, d_mid, s_cur, s_next)
        moved = 5 * x.numel() * itemsize
    elif kind == "dpmpp_2m":
        old = rnd(*shape)
        sd = sigmas.double()
        table = ops.dpmpp_2m_coefs(sd[1:-1], sd[2:], sd[:-2]).float()
        fns["fastdiff"] = lambda: ops.sampler_step(x, m, table, step - 1, prev=old)
        fns["eager"] = lambda: eager_dpmpp_2m(x, m, old, s_prev, s_cur, s_next)
        fns["compile"] = lambda: _compiled(eager_dpmpp_2m)(x, m, old, s_prev, s_cur, s_next)
        moved = 4 * x.numel() * itemsize
    elif kind == "add_noise":
        fns["fastdiff"] = lambda: ops.add_noise(x, z, t, ab32)
        fns["eager"] = lambda: eager_add_noise(x, z, t, ab32)
        fns["compile"] = lambda: _compiled(eager_add_noise)(x, z, t, ab32)
        moved = 3 * x.numel() * itemsize
    else:
        raise ValueError(f"unknown benchmark kind {kind!r}; valid kinds are {KINDS}")
    return Case(fns=fns, bytes_moved=moved)


def check_agreement(case: Case, kind: str, impl: str = "fastdiff") -> None:
    """``impl`` computes eager's update (seeded noise aside); for ``fastdiff``,
    ``compile`` is checked too."""
    if kind == "ddpm_seed":
        return
    ref = case.fns["eager"]()
    for name in ("fastdiff", "compile") if impl == "fastdiff" else (impl,):
        got = case.fns[name]()
        err = (got.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
        # fp16/bf16 steps: eager promotes to fp32 through the fp32 tables, fastdiff
        # returns the input dtype (one rounding: ~5e-4 relative for fp16)
        tol = 1e-4 if got.dtype == ref.dtype == torch.float32 else 2e-2
        if not err < tol:
            raise AssertionError(f"{kind}: {name} differs from eager by {err:.2e} (relative)")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def backend_used(device: str) -> str:
    """The backend fastdiff picks for this device (or the forced one)."""
    forced = fastdiff._backend.current_backend()
    if forced:
        return forced
    from fastdiff.testing import backends_for

    order = fastdiff._backend._PRIORITY[device]
    return next(b for b in order if b in backends_for(device))
