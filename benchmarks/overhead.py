"""Per-call host overhead of fastdiff's public ops at tiny sizes (CPU).

At these sizes the kernels take a few microseconds, so the time per call is
almost all Python: the op layer (validation, layout, backend choice) and, on
the dispatcher path, torch.ops + the custom-op autograd wrapper.  Each row is
the median over many blocks of back-to-back calls (time.perf_counter, after a
warm-up), in microseconds per call, next to the raw kernel call with
preallocated outputs where one exists and a trivial eager op for scale.

    python benchmarks/overhead.py            # table
    python benchmarks/overhead.py --profile  # plus a cProfile of a few rows

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

import fastdiff
from fastdiff import _backend
from fastdiff.ops import steps

_C = _backend.extension()


def per_call_us(fn, *, block: int = 200, blocks: int = 40, warmup: int = 200) -> float:
    """Median over ``blocks`` blocks of ``block`` calls, in µs per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        times.append((time.perf_counter() - t0) / block)
    return statistics.median(times) * 1e6


def _dispatcher():
    """The dispatcher path forced (None when this fastdiff has no fast path)."""
    force = getattr(_backend, "force_dispatcher", None)
    return force() if force is not None else contextlib.nullcontext()


def cases():
    """(name, mode, public fn, raw kernel fn or None)."""
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    # sampler_step: coefs table + per-sample index (a scheduler's step)
    x, m = r(2, 4, 8, 8), r(2, 4, 8, 8)
    # fp32 table, as a scheduler caches it for fp32 samples (CoefTable.on)
    coefs = torch.randn(1000, fastdiff.ops.NUM_COEFS, generator=g)
    index = torch.tensor([10, 500])
    out = torch.empty_like(x)
    yield ("sampler_step", "no_grad",
           lambda: fastdiff.ops.sampler_step(x, m, coefs, index),
           lambda: _C.sampler_step(x, m, coefs, index, None, None, None, None,
                                   None, None, None, out, None))
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    t = torch.tensor([500, 500])
    yield ("ddim_step", "no_grad",
           lambda: steps.ddim_step(m, t, x, ac, prev_timestep=torch.tensor([480, 480])), None)

    # group_norm_silu
    xg, w, b, emb = r(2, 32, 8, 8), r(32), r(32), r(2, 32)
    y, mean, rstd = torch.empty_like(xg), torch.empty(2, 8), torch.empty(2, 8)
    yield ("group_norm_silu", "no_grad",
           lambda: fastdiff.ops.group_norm_silu(xg, 8, w, b, emb=emb),
           lambda: _C.group_norm_silu_fwd(xg, w, b, emb, None, None, 8, 1e-5, "silu", y, mean, rstd))
    xgg, wg, bg, embg = r(2, 32, 8, 8, grad=True), r(32, grad=True), r(32, grad=True), r(2, 32, grad=True)
    yield ("group_norm_silu", "fwd+bwd",
           lambda: fastdiff.ops.group_norm_silu(xgg, 8, wg, bg, emb=embg).sum().backward(), None)

    # rms_norm_silu
    yr = torch.empty(2, 8, 8)
    yield ("rms_norm_silu", "no_grad",
           lambda: fastdiff.ops.rms_norm_silu(xg, w),
           lambda: _C.rms_norm_silu_fwd(xg, w, None, None, 1e-12, "silu", y, yr))
    yield ("rms_norm_silu", "fwd+bwd",
           lambda: fastdiff.ops.rms_norm_silu(xgg, wg).sum().backward(), None)

    # attention (SDPA's CPU flash kernel is the "raw" call)
    q, k, v = r(1, 2, 16, 32), r(1, 2, 16, 32), r(1, 2, 16, 32)
    yield ("attention", "no_grad",
           lambda: fastdiff.ops.attention(q, k, v),
           lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False))
    qg, kg, vg = (r(1, 2, 16, 32, grad=True) for _ in range(3))
    yield ("attention", "fwd+bwd",
           lambda: fastdiff.ops.attention(qg, kg, vg).sum().backward(), None)

    # linear_attention (no C++ kernel: the reference is the CPU path)
    lq, lk, lv = r(1, 2, 16, 16), r(1, 2, 16, 16), r(1, 2, 16, 16)
    yield ("linear_attention", "no_grad", lambda: fastdiff.ops.linear_attention(lq, lk, lv), None)
    lqg, lkg, lvg = (r(1, 2, 16, 16, grad=True) for _ in range(3))
    yield ("linear_attention", "fwd+bwd",
           lambda: fastdiff.ops.linear_attention(lqg, lkg, lvg).sum().backward(), None)

    # scale: a trivial eager op
    yield ("x.add(m) (eager)", "no_grad", lambda: x.add(m), None)


def run(profile: bool) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; µs per call (median)")
    header = f"{'op':<20} {'mode':<8} {'public':>9} {'dispatcher':>11} {'raw kernel':>11}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, mode, fn, raw in cases():
        ctx = torch.no_grad() if mode == "no_grad" else contextlib.nullcontext()
        with ctx:
            pub = per_call_us(fn)
            with _dispatcher():
                disp = per_call_us(fn)
            raw_us = per_call_us(raw) if raw is not None else None
        rows.append((name, mode, fn))
        raw_s = f"{raw_us:11.1f}" if raw_us is not None else f"{'-':>11}"
        print(f"{name:<20} {mode:<8} {pub:9.1f} {disp:11.1f} {raw_s}", flush=True)
    if profile:
        import cProfile
        import pstats

        for name, mode, fn in rows:
            if mode != "no_grad" or "eager" in name:
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run(a.profile)
