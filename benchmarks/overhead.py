"""Per-call host overhead of fastdiff's public ops at tiny sizes (CPU or CUDA).

At these sizes the kernels take a few microseconds, so the time per call is
almost all Python: the op layer (validation, layout, backend choice) and, on
the dispatcher path, torch.ops + the custom-op autograd wrapper.  Each row is
the median over many blocks of back-to-back calls (time.perf_counter, after a
warm-up), in microseconds per call, next to the raw kernel call with
preallocated outputs where one exists and the same computation written in eager
PyTorch ops (what a user of plain PyTorch pays per call).

    python benchmarks/overhead.py            # table
    python benchmarks/overhead.py --profile  # plus a cProfile of a few rows
    python benchmarks/overhead.py --device cuda --profile   # on a GPU: raw = the Triton launch
    python benchmarks/overhead.py --models   # plus the host cost per call of the e2e U-Nets

On CUDA each block of calls ends with a synchronize, so a row is the host cost
per call as long as the GPU keeps up (these kernels run for a few µs); the raw
column there is the Triton launcher alone (canonical inputs, preallocated outputs),
which separates Triton's launch cost from fastdiff's op layer.

The ``dispatcher`` column forces the torch.ops.fastdiff path (what runs when
autograd, torch.compile or a tensor subclass is involved); ``public`` is what a
user calls, which takes the eager fast path where it applies.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import _backend
from fastdiff.ops import steps
from fastdiff.reference import sampler_step as ref

_C = _backend.extension()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_us(fn, *, block: int = 200, blocks: int = 40, warmup: int = 200) -> float:
    """Median over ``blocks`` blocks of ``block`` calls, in µs per call."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        _sync()
        times.append((time.perf_counter() - t0) / block)
    return statistics.median(times) * 1e6


def _dispatcher():
    """The dispatcher path forced (None when this fastdiff has no fast path)."""
    force = getattr(_backend, "force_dispatcher", None)
    return force() if force is not None else contextlib.nullcontext()


def _raw_cuda(name: str, args: dict):
    """The Triton launcher of an op, on canonical inputs with preallocated outputs."""
    if name == "sampler_step":
        from fastdiff.kernels.sampler_step import sampler_step_triton

        return lambda: sampler_step_triton(**args)
    from fastdiff.kernels.group_norm import group_norm_silu_fwd_triton

    return lambda: group_norm_silu_fwd_triton(*args.values())


def _eager_sampler_step(x, m, coefs, index):
    """The update the row encodes, as diffusers writes it: gathers + a few pointwise ops."""
    c = coefs[index].view(x.shape[0], -1, *([1] * (x.dim() - 1)))
    x0 = c[:, ref.A_X] * x + c[:, ref.A_M] * m
    return c[:, ref.C_X] * x + c[:, ref.C_M] * m + c[:, ref.C_0] * x0


def _eager_ddim(m, t, x, ac, t_prev):
    """diffusers DDIMScheduler.step (η = 0) in torch ops."""
    a = ac[t].float().view(-1, 1, 1, 1)
    a_prev = ac[t_prev].float().view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * m) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * m


def _eager_rms(x, w):
    """denoising-diffusion-pytorch 2.x Block: F.normalize(x, dim=1) * g * sqrt(C), then SiLU."""
    return F.silu(F.normalize(x, dim=1) * w.view(1, -1, 1, 1) * x.shape[1] ** 0.5)


def _eager_linear_attention(q, k, v):
    """softmax(q over d) . (softmax(k over n) vᵀ), the U-Net's linear attention in torch ops."""
    q, k = q.softmax(dim=-2), k.softmax(dim=-1)
    return torch.einsum("bhde,bhdn->bhen", torch.einsum("bhdn,bhen->bhde", k, v), q)


def cases(device: str = "cpu"):
    """(name, mode, public fn, raw kernel fn or None, eager-PyTorch equivalent or None)."""
    g = torch.Generator().manual_seed(0)
    cuda = device == "cuda"

    def r(*s, grad=False):
        return torch.randn(*s, generator=g).to(device).requires_grad_(grad)

    # sampler_step: coefs table + per-sample index (a scheduler's step)
    x, m = r(2, 4, 8, 8), r(2, 4, 8, 8)
    # fp32 table, as a scheduler caches it for fp32 samples (CoefTable.on)
    coefs = torch.randn(1000, fastdiff.ops.NUM_COEFS, generator=g).to(device)
    index = torch.tensor([10, 500], device=device)
    out = torch.empty_like(x)
    raw = (_raw_cuda("sampler_step", dict(
        out=out, x0_out=None, x=x, model_output=m, coefs=coefs, index=index, prev=None, prev2=None,
        noise=None, seed=None, guidance_scale=None, clip_min=None, clip_max=None)) if cuda else
        lambda: _C.sampler_step(x, m, coefs, index, None, None, None, None,
                                None, None, None, out, None))
    yield ("sampler_step", "no_grad", lambda: fastdiff.ops.sampler_step(x, m, coefs, index), raw,
           lambda: _eager_sampler_step(x, m, coefs, index))
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64, device=device)
    t = torch.tensor([500, 500], device=device)
    t_prev = torch.tensor([480, 480], device=device)
    yield ("ddim_step", "no_grad", lambda: steps.ddim_step(m, t, x, ac, prev_timestep=t_prev), None,
           lambda: _eager_ddim(m, t, x, ac, t_prev))
    # per-sample t with the default prev (t - 1): rows from a kept (T + 1)-row table
    yield ("ddim_step (prev t-1)", "no_grad", lambda: steps.ddim_step(m, t, x, ac), None,
           lambda: _eager_ddim(m, t, x, ac, t - 1))
    # as the README's loop calls it: int timesteps, the ᾱ table on the CPU (row kept)
    ac_host = ac.cpu()
    yield ("ddim_step (int t)", "no_grad",
           lambda: steps.ddim_step(m, 500, x, ac_host, prev_timestep=480), None,
           lambda: _eager_ddim(m, t, x, ac, t_prev))
    # a scheduler step with t from scheduler.timesteps (the diffusers loop)
    sched = fastdiff.schedulers.DDIMScheduler()
    sched.set_timesteps(50, device=device)
    t_s = sched.timesteps[25]
    yield ("DDIMScheduler.step", "no_grad", lambda: sched.step(m, t_s, x), None,
           lambda: _eager_ddim(m, t, x, ac, t_prev))
    # k-diffusion's Euler step with float σ (fastdiff.sampling; row kept)
    yield ("euler_step (float σ)", "no_grad", lambda: steps.euler_step(m, x, 1.5, 1.2), None,
           lambda: x + (x - m) / 1.5 * (1.2 - 1.5))

    # group_norm_silu
    xg, w, b, emb = r(2, 32, 8, 8), r(32), r(32), r(2, 32)
    y, mean, rstd = (torch.empty_like(xg), torch.empty(2, 8, device=device),
                     torch.empty(2, 8, device=device))
    raw = (_raw_cuda("group_norm_silu", dict(
        x=xg, weight=w, bias=b, emb=emb, scale=None, shift=None, num_groups=8, eps=1e-5,
        act="silu", y=y, mean=mean, rstd=rstd)) if cuda else
        lambda: _C.group_norm_silu_fwd(xg, w, b, emb, None, None, 8, 1e-5, "silu", y, mean, rstd))
    yield ("group_norm_silu", "no_grad", lambda: fastdiff.ops.group_norm_silu(xg, 8, w, b, emb=emb), raw,
           lambda: F.silu(F.group_norm(xg + emb[:, :, None, None], 8, w, b)))
    xgg, wg, bg, embg = r(2, 32, 8, 8, grad=True), r(32, grad=True), r(32, grad=True), r(2, 32, grad=True)
    yield ("group_norm_silu", "fwd+bwd",
           lambda: fastdiff.ops.group_norm_silu(xgg, 8, wg, bg, emb=embg).sum().backward(), None,
           lambda: F.silu(F.group_norm(xgg + embg[:, :, None, None], 8, wg, bg)).sum().backward())

    # rms_norm_silu
    yr = torch.empty(2, 8, 8, device=device)
    yield ("rms_norm_silu", "no_grad", lambda: fastdiff.ops.rms_norm_silu(xg, w),
           None if cuda else lambda: _C.rms_norm_silu_fwd(xg, w, None, None, 1e-12, "silu", y, yr),
           lambda: _eager_rms(xg, w))
    yield ("rms_norm_silu", "fwd+bwd",
           lambda: fastdiff.ops.rms_norm_silu(xgg, wg).sum().backward(), None,
           lambda: _eager_rms(xgg, wg).sum().backward())

    # attention (SDPA's CPU flash kernel is the "raw" call)
    q, k, v = r(1, 2, 16, 32), r(1, 2, 16, 32), r(1, 2, 16, 32)
    yield ("attention", "no_grad", lambda: fastdiff.ops.attention(q, k, v),
           None if cuda else
           lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False),
           lambda: F.scaled_dot_product_attention(q, k, v))
    qg, kg, vg = (r(1, 2, 16, 32, grad=True) for _ in range(3))
    yield ("attention", "fwd+bwd",
           lambda: fastdiff.ops.attention(qg, kg, vg).sum().backward(), None,
           lambda: F.scaled_dot_product_attention(qg, kg, vg).sum().backward())

    # linear_attention (no C++ kernel: the reference is the CPU path)
    lq, lk, lv = r(1, 2, 16, 16), r(1, 2, 16, 16), r(1, 2, 16, 16)
    yield ("linear_attention", "no_grad", lambda: fastdiff.ops.linear_attention(lq, lk, lv), None,
           lambda: _eager_linear_attention(lq, lk, lv))
    lqg, lkg, lvg = (r(1, 2, 16, 16, grad=True) for _ in range(3))
    yield ("linear_attention", "fwd+bwd",
           lambda: fastdiff.ops.linear_attention(lqg, lkg, lvg).sum().backward(), None,
           lambda: _eager_linear_attention(lqg, lkg, lvg).sum().backward())


def _tiny_models(device: str):
    """[(arch, impl, model)]: the e2e benchmark's U-Nets (test_bench_e2e: the 1.x and 2.x
    DDPM U-Nets, diffusers' google/ddpm-cifar10-32 UNet2DModel) with their module
    structure -- so the same op calls per forward -- at width 8 (dim 8 / channels 16-32),
    eager and ``fastdiff.optimize`` (and ``fastdiff.nn.UNet`` for 1.x), identical weights."""
    import test_bench_e2e as e2e

    from fastdiff.nn.unet import UNet

    e2e.CONFIG = dict(dim=8, dim_mults=(1, 2, 4, 8))
    e2e.DIFFUSERS_CONFIG = dict(e2e.DIFFUSERS_CONFIG, block_out_channels=(16, 32, 32, 32),
                                norm_num_groups=8)
    out = []
    for arch in ("v1", "v2", "diffusers"):
        torch.manual_seed(0)
        ref_model = e2e._new_model(arch).to(device)
        opt = e2e._new_model(arch).to(device)
        opt.load_state_dict(ref_model.state_dict())
        out += [(arch, "eager", ref_model), (arch, "optimize", fastdiff.optimize(opt))]
        if arch == "v1":
            fused = UNet(**e2e.CONFIG).to(device)
            fused.load_state_dict(ref_model.state_dict())
            out.append((arch, "fastdiff", fused))
    return out


def run_models(device: str = "cpu", rounds: int = 15, block: int = 10) -> None:
    """Host cost per model call: the e2e U-Nets at width 8 on a 1x3x8x8 batch, where the
    kernels take next to nothing, so a call's time is the Python + dispatch of its op
    calls -- what a GPU waits on when the host cannot keep ahead of it.  Rounds
    interleave the models (this shared machine's speed drifts); median and min of the
    rounds, ms per call."""
    rows = _tiny_models(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    t = torch.tensor([10], device=device)

    def calls(model):
        def sample():
            with torch.no_grad():
                model(x, t)

        def train():
            model.zero_grad(set_to_none=True)
            model(x, t).sum().backward()
        return sample, train

    fns = [(arch, impl, *calls(m)) for arch, impl, m in rows]
    times = {(arch, impl): ([], []) for arch, impl, *_ in fns}
    for _, _, sample, train in fns:
        for _ in range(3):
            sample()
            train()
    for _ in range(rounds):
        for arch, impl, sample, train in fns:
            for i, fn in enumerate((sample, train)):
                _sync()
                t0 = time.perf_counter()
                for _ in range(block):
                    fn()
                _sync()
                times[arch, impl][i].append((time.perf_counter() - t0) / block * 1e3)
    print(f"\nhost cost per model call (width-8 U-Nets, 1x3x8x8, {device}); ms, median (min) "
          f"of {rounds} interleaved rounds")
    header = f"{'model':<10} {'impl':<9} {'no_grad call':>18} {'fwd+bwd':>18}"
    print(header)
    print("-" * len(header))
    for (arch, impl), (s, b) in times.items():
        print(f"{arch:<10} {impl:<9} {statistics.median(s):9.2f} ({min(s):6.2f}) "
              f"{statistics.median(b):9.2f} ({min(b):6.2f})", flush=True)


def run(profile: bool, device: str = "cpu") -> None:
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}; µs per call (median)")
    header = (f"{'op':<20} {'mode':<8} {'public':>9} {'dispatcher':>11} {'raw kernel':>11} "
              f"{'eager torch':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, mode, fn, raw, eager in cases(device):
        ctx = torch.no_grad() if mode == "no_grad" else contextlib.nullcontext()
        with ctx:
            pub = per_call_us(fn)
            with _dispatcher():
                disp = per_call_us(fn)
            raw_us = per_call_us(raw) if raw is not None else None
            eager_us = per_call_us(eager) if eager is not None else None
        rows.append((name, mode, fn))
        raw_s = f"{raw_us:11.1f}" if raw_us is not None else f"{'-':>11}"
        eager_s = f"{eager_us:12.1f}" if eager_us is not None else f"{'-':>12}"
        print(f"{name:<20} {mode:<8} {pub:9.1f} {disp:11.1f} {raw_s} {eager_s}", flush=True)
    if profile:
        import cProfile
        import pstats

        for name, mode, fn in rows:
            if mode != "no_grad":
                continue
            print(f"\n=== cProfile: {name} ({mode}), 2000 calls ===")
            with torch.no_grad():
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(2000):
                    fn()
                pr.disable()
            pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="also print cProfile of the no_grad rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", action="store_true",
                   help="also the host cost per call of the e2e U-Nets at width 8 "
                        "(needs diffusers; denoising-diffusion-pytorch is the test copy)")
    p.add_argument("--models-only", action="store_true", help="only that table")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not a.models_only:
        run(a.profile, a.device)
    if a.models or a.models_only:
        run_models(a.device)
