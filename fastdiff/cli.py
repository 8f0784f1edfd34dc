"""The ``python -m fastdiff`` command line.

    python -m fastdiff bench  [--full] [--device cuda] [--dtype fp16] [--no-compile]
        the fastdiff-vs-eager-vs-torch.compile table of the main ops (fused sampler
        step, group_norm_silu, attention) and, with diffusers installed, of a sampling
        and a training step of its UNet2DModel (eager vs fastdiff.optimize) on this
        machine, with a progress bar.
    python -m fastdiff sample [--sampler ddim|heun|dpmpp_2m] [--steps 50] [--n 64] [--seed 0] [--out samples.png]
        samples the demo model (a small fastdiff.nn.UNet trained on scikit-learn's
        digits, weights in fastdiff/assets/digits_unet.pt) and writes an image grid PNG.
    python -m fastdiff train  [--iters 1500] [--batch 64] [--out fastdiff/assets/digits_unet.pt]
        trains that demo model with fastdiff.training.ddpm_loss (a few minutes on a CPU).

The demo data is scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``, 1797
images shipped inside the scikit-learn wheel: nothing is downloaded), upsampled
bilinearly to 16x16 and scaled to [-1, 1].  scikit-learn is needed only by ``train``
and is imported there, never at ``import fastdiff``.  PNGs are written with zlib +
struct (no imaging library needed).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import struct
import sys
import time
import zlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ASSET = pathlib.Path(__file__).with_name("assets") / "digits_unet.pt"
DEMO_CONFIG = dict(dim=16, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=16)
DEMO_SIZE = 16
DEMO_SCHEDULE = dict(kind="linear", num_train_timesteps=1000)

# --------------------------------------------------------------------------
# progress bar (tqdm when importable)
# --------------------------------------------------------------------------


def _progress(total: int, desc: str, disable: bool = False):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or disable:
        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


# --------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------


def write_png(path, image: torch.Tensor) -> None:
    """Write a (H, W) or (3, H, W) uint8 tensor as an 8-bit grey / RGB PNG."""
    img = image.detach().cpu()
    if img.dtype != torch.uint8:
        raise TypeError("write_png: expected a uint8 image")
    if img.dim() == 3:
        h, w = img.shape[1:]
        rows = img.permute(1, 2, 0).reshape(h, w * 3)
        color_type = 2
    else:
        h, w = img.shape
        rows = img
        color_type = 0
    raw = b"".join(b"\x00" + bytes(rows[i].numpy().tobytes()) for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9))
           + chunk(b"IEND", b""))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(png)


def grid_size(n: int, h: int, w: int, *, scale: int = 4, pad: int = 2, nrow: Optional[int] = None):
    """(height, width) of the grid :func:`make_grid` builds."""
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    return pad + ncol * (h * scale + pad), pad + nrow * (w * scale + pad)


def make_grid(images: torch.Tensor, *, scale: int = 4, pad: int = 2, nrow: Optional[int] = None) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> one (H', W') (C=1) or (3, H', W') uint8 grid,
    each image upscaled ``scale`` times (nearest), ``pad`` pixels apart."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    gh, gw = grid_size(n, h, w, scale=scale, pad=pad, nrow=nrow)
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = torch.full((c, gh, gw), 64, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        grid[:, y:y + h * scale, x:x + w * scale] = imgs[i]
    return grid[0] if c == 1 else grid


# --------------------------------------------------------------------------
# the demo model
# --------------------------------------------------------------------------


def demo_model(weights=None):
    """The demo ``fastdiff.nn.UNet``; with ``weights`` (a path), its trained weights."""
    from .nn.unet import UNet

    if weights is None:
        return UNet(**DEMO_CONFIG)
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    model = UNet(**ckpt.get("config", DEMO_CONFIG))
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return model.eval()


def _alphas_cumprod() -> torch.Tensor:
    from . import schedules

    return schedules.alphas_cumprod(schedules.betas(DEMO_SCHEDULE["kind"], DEMO_SCHEDULE["num_train_timesteps"]))


def digits_dataset(size: int = DEMO_SIZE) -> torch.Tensor:
    """scikit-learn's 8x8 digits as (1797, 1, size, size) float32 in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("python -m fastdiff train needs scikit-learn (pip install scikit-learn), "
                         "whose wheel ships the digits data") from e
    x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train(iters: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0, out=ASSET,
          device: str = "cpu", ema_decay: float = 0.995, progress: bool = True) -> dict:
    """Train the demo model with :func:`fastdiff.training.ddpm_loss`; save the EMA weights
    (fp16, with the config) to ``out``.  Returns {"loss": last smoothed loss, "seconds": ...}."""
    import copy

    from .training import ddpm_loss

    torch.manual_seed(seed)
    data = digits_dataset().to(device)
    model = demo_model().to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ab = _alphas_cumprod().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * (0.5 * (1 + math.cos(math.pi * min(i / max(iters, 1), 1.0)))) + 0.05)
    g = torch.Generator(device="cpu").manual_seed(seed)
    bar = _progress(iters, "train", disable=not progress)
    smooth, t0 = None, time.perf_counter()
    for i in range(iters):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        loss = ddpm_loss(model, data[idx], ab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, min(ema_decay, (1 + i) / (10 + i)))
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.update()
        bar.set_postfix_str(f"loss {smooth:.4f}")
    bar.close()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dict(DEMO_CONFIG), "schedule": dict(DEMO_SCHEDULE), "size": DEMO_SIZE,
                "iters": iters, "state_dict": {k: v.detach().cpu().half() for k, v in ema.state_dict().items()}},
               out)
    return {"loss": smooth, "seconds": time.perf_counter() - t0}


class _EpsDenoiser:
    """k-diffusion's DiscreteEpsDDPMDenoiser: an ε-model of a discrete VP schedule as a
    σ-space denoiser D(x, σ) = x - σ ε(x / sqrt(σ² + 1), t(σ)), with t(σ) interpolated in
    log σ and the denoised image clipped to [-1, 1] (the data range)."""

    def __init__(self, model, alphas_cumprod: torch.Tensor):
        self.model = model
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma[:, None] - self.log_sigmas[None, :]
        low = dists.ge(0).cumsum(dim=1).argmax(dim=1).clamp(max=self.log_sigmas.shape[0] - 2)
        low_v, high_v = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((low_v - log_sigma) / (low_v - high_v)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        c_in = (sigma**2 + 1).rsqrt()[:, None, None, None]
        eps = self.model(x * c_in, self.sigma_to_t(sigma))
        return (x - sigma[:, None, None, None] * eps).clamp(-1, 1)


@torch.no_grad()
def sample(model=None, *, n: int = 64, steps: int = 50, sampler: str = "ddim", seed: int = 0,
           device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """(n, 1, 16, 16) samples in [-1, 1] of the demo model (loaded from the asset if not given)."""
    from . import sampling, schedulers

    model = (model if model is not None else demo_model(ASSET)).to(device).eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, model.channels, DEMO_SIZE, DEMO_SIZE)
    noise = torch.randn(shape, generator=g).to(device)
    if sampler == "ddim":
        sch = schedulers.DDIMScheduler(num_train_timesteps=DEMO_SCHEDULE["num_train_timesteps"],
                                       beta_schedule=DEMO_SCHEDULE["kind"], timestep_spacing="trailing")
        sch.set_timesteps(steps, device=device)
        x = noise
        bar = _progress(len(sch.timesteps), "sample ddim", disable=not progress)
        for t in sch.timesteps:
            eps = model(x, t.expand(n).to(device))
            x = sch.step(eps, t, x).prev_sample
            bar.update()
        bar.close()
        return x.clamp(-1, 1)
    if sampler not in ("heun", "dpmpp_2m"):
        raise ValueError(f"unknown sampler {sampler!r}; choose ddim, heun or dpmpp_2m")
    denoiser = _EpsDenoiser(model, _alphas_cumprod().to(device))
    sigma_min, sigma_max = denoiser.sigmas[0].item(), min(denoiser.sigmas[-1].item(), 80.0)
    if sampler == "heun":  # each step but the last evaluates the model twice
        n_sig = max(2, (steps + 1) // 2 + 1)
    else:
        n_sig = steps
    sigmas = sampling.get_sigmas_karras(n_sig, sigma_min, sigma_max, device=device)
    x = noise * sigmas[0]
    fn = sampling.sample_heun if sampler == "heun" else sampling.sample_dpmpp_2m
    return fn(denoiser, x, sigmas, disable=not progress).clamp(-1, 1)


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------


def _timeit(fn: Callable, device: str, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _eager_ddim(x, eps, ab_t, ab_prev):
    """diffusers DDIMScheduler.step (η = 0, ε prediction, x0 clipped) as eager ops."""
    ab_t, ab_prev = ab_t.view(-1, 1, 1, 1), ab_prev.view(-1, 1, 1, 1)
    x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


def _eager_gn_silu(x, w, b, scale, shift, groups):
    y = F.group_norm(x, groups, w, b, 1e-5)
    return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def _eager_attention(q, k, v):
    attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attn @ v


# The U-Net rows: diffusers' UNet2DModel in google/ddpm-cifar10-32's configuration (Ho et
# al.'s CIFAR-10 model, randomly initialised), or a small one for --tiny.
UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def _unet_cases(device: str, dtype: torch.dtype, size: str, rnd) -> list:
    """A sampling step (no grad) and a training step (forward + backward) of diffusers'
    UNet2DModel: eager, ``fastdiff.optimize`` of a copy with the same weights, and
    torch.compile of the eager model.  No cases where diffusers is not installed."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return []
    import copy

    from ._optimize import optimize

    config = TINY_UNET_CONFIG if size == "tiny" else UNET_CONFIG
    batch = 2 if size == "tiny" or device != "cuda" else 64
    torch.manual_seed(0)
    eager = UNet2DModel(**config).to(device)
    if dtype != torch.float32:
        eager = eager.to(dtype)
    fused = optimize(copy.deepcopy(eager))
    n = config["sample_size"]
    x, noise = rnd(batch, 3, n, n), rnd(batch, 3, n, n)
    t = torch.randint(0, 1000, (batch,)).to(device)
    label = f"{batch}x3x{n}x{n}"

    @torch.no_grad()
    def sample_step(model):
        return model(x, t, return_dict=False)[0]

    def train_step(model):
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t, return_dict=False)[0], noise).backward()

    cases = []
    for op, step in (("unet sample step", sample_step), ("unet train step", train_step)):
        cases.append((op, label, {
            "fastdiff": lambda s=step: s(fused),
            "eager": lambda s=step: s(eager),
            "compile": (eager, lambda compiled, s=step: lambda: s(compiled)),
        }))
    return cases


def bench_cases(device: str, dtype: torch.dtype, size: str):
    """[(op, shape label, {impl: fn})] for ``size`` in tiny | quick | full.  A
    ``compile`` entry is (what to compile, args) -- the compiled callable is called with
    args -- or (a model, make) -- make(compiled model) is the timed function."""
    from . import ops, schedules

    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    gpu = device == "cuda"
    if size == "tiny":
        step_shapes, gn_shapes, attn_shapes = [(2, 3, 8, 8)], [(2, 16, 8, 8)], [(1, 2, 16, 16)]
    elif size == "quick":
        step_shapes = [(64, 3, 32, 32)] if not gpu else [(64, 3, 32, 32), (16, 4, 128, 128)]
        gn_shapes = [(8, 128, 32, 32)] if not gpu else [(64, 256, 32, 32)]
        attn_shapes = [(8, 4, 256, 32)] if not gpu else [(64, 4, 256, 32), (8, 8, 1024, 64)]
    else:
        step_shapes = [(64, 3, 32, 32), (8, 4, 64, 64), (16, 4, 128, 128)]
        gn_shapes = [(8, 128, 32, 32), (16, 256, 16, 16), (4, 64, 64, 64)] if not gpu else \
            [(64, 128, 32, 32), (64, 256, 16, 16), (16, 128, 64, 64), (8, 320, 64, 64)]
        attn_shapes = [(8, 4, 256, 32), (4, 4, 1024, 32)] if not gpu else \
            [(64, 4, 256, 32), (8, 8, 1024, 64), (2, 8, 4096, 64)]

    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000)).to(device)
    cases = []
    for shape in step_shapes:
        x, eps = rnd(*shape), rnd(*shape)
        t = torch.randint(20, 1000, (shape[0],), generator=g).to(device)
        ab_t, ab_prev = ab[t], ab[t - 20]
        coefs = ops.ddim_coefs(ab_t.double(), ab_prev.double()).float()
        cases.append(("ddim step", "x".join(map(str, shape)), {
            "fastdiff": lambda x=x, e=eps, c=coefs: ops.sampler_step(x, e, c, clip_range=(-1, 1)),
            "eager": lambda x=x, e=eps, a=ab_t, p=ab_prev: _eager_ddim(x, e, a, p),
            "compile": (_eager_ddim, (x, eps, ab_t, ab_prev)),
        }))
    for shape in gn_shapes:
        x = rnd(*shape)
        c = shape[1]
        w, b, sc, sh = rnd(c), rnd(c), 0.1 * rnd(shape[0], c), 0.1 * rnd(shape[0], c)
        groups = 32 if c % 32 == 0 else 8
        cases.append(("group_norm_silu", "x".join(map(str, shape)), {
            "fastdiff": lambda x=x, w=w, b=b, sc=sc, sh=sh, gr=groups: ops.group_norm_silu(
                x, gr, w, b, scale=sc, shift=sh),
            "eager": lambda x=x, w=w, b=b, sc=sc, sh=sh, gr=groups: _eager_gn_silu(x, w, b, sc, sh, gr),
            "compile": (_eager_gn_silu, (x, w, b, sc, sh, groups)),
        }))
    try:
        from .ops.attention import attention as fd_attention
    except ImportError:
        fd_attention = None
    for shape in attn_shapes:
        q, k, v = rnd(*shape), rnd(*shape), rnd(*shape)
        fns = {
            "eager": lambda q=q, k=k, v=v: _eager_attention(q, k, v),
            "compile": (_eager_attention, (q, k, v)),
        }
        if fd_attention is not None:
            fns["fastdiff"] = lambda q=q, k=k, v=v: fd_attention(q, k, v)
        cases.append(("attention", "x".join(map(str, shape)), fns))
    return cases + _unet_cases(device, dtype, size, rnd)


def bench(device: Optional[str] = None, dtype: str = "fp32", size: str = "quick", compile: bool = True,
          reps: Optional[int] = None, progress: bool = True, file=None) -> list[dict]:
    """Time the main ops as fastdiff / eager / torch.compile and print the table."""
    from . import _backend

    file = file or sys.stdout
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    reps = reps or {"tiny": 2, "quick": 10, "full": 30}[size]
    warmup = 1 if size == "tiny" else 3
    cases = bench_cases(device, dt, size)
    compiled = {}
    rows = []
    bar = _progress(len(cases), "bench", disable=not progress)
    for op, shape, fns in cases:
        row = {"op": op, "shape": shape}
        for impl in ("fastdiff", "eager", "compile"):
            fn = fns.get(impl)
            if fn is None or (impl == "compile" and not compile):
                row[impl] = None
                continue
            if impl == "compile":
                target, args = fn
                if target not in compiled:
                    compiled[target] = torch.compile(target, dynamic=False)
                fn = (args(compiled[target]) if callable(args)
                      else (lambda c, a: lambda: c(*a))(compiled[target], args))
            try:
                row[impl] = _timeit(fn, device, reps, warmup)
            except Exception as e:  # noqa: BLE001 -- a missing backend must not kill the table
                row[impl] = None
                row.setdefault("errors", []).append(f"{impl}: {type(e).__name__}: {e}"[:200])
        rows.append(row)
        bar.update()
    bar.close()

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        import platform
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    avail = [b for b, why in _backend.backends().items() if why is None]
    print(f"fastdiff bench: {name}, {dtype}, backends available: {', '.join(avail)}", file=file)

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{b / a:.2f}x"

    header = ["op", "shape", "fastdiff ms", "eager ms", "compile ms", "vs eager", "vs compile"]
    table = [[r["op"], r["shape"], fmt(r["fastdiff"]), fmt(r["eager"]), fmt(r["compile"]),
              ratio(r["fastdiff"], r["eager"]), ratio(r["fastdiff"], r["compile"])] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)), file=file)
    for r in rows:
        for e in r.get("errors", []):
            print(f"  note: {r['op']} {r['shape']}: {e}", file=file)
    print("(vs eager / vs compile: how many times faster fastdiff is; median of "
          f"{reps} runs after {warmup} warm-up)", file=file)
    return rows


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="fastdiff vs eager vs torch.compile table of the main ops")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_const", const="full", dest="size", help="more shapes, more runs")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="tiny shapes (a smoke test)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    b.add_argument("--reps", type=int, default=None)

    s = sub.add_parser("sample", help="sample the demo model to a PNG grid")
    s.add_argument("--sampler", default="ddim", choices=("ddim", "heun", "dpmpp_2m"))
    s.add_argument("--steps", type=int, default=50, help="model evaluations (heun: about this many)")
    s.add_argument("--n", type=int, default=64, help="number of images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--weights", default=str(ASSET))
    s.add_argument("--scale", type=int, default=4, help="pixel upscaling in the PNG")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")

    t = sub.add_parser("train", help="train the demo model on scikit-learn's digits")
    t.add_argument("--iters", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=str(ASSET))
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")

    b.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    for q in (b, s, t):
        q.add_argument("--no-progress", action="store_true")

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "bench":
        bench(args.device, args.dtype, args.size or "quick", compile=not args.no_compile, reps=args.reps,
              progress=not args.no_progress)
    elif args.cmd == "sample":
        if not os.path.exists(args.weights):
            print(f"no weights at {args.weights}: run `python -m fastdiff train` first", file=sys.stderr)
            return 1
        model = demo_model(args.weights)
        t0 = time.perf_counter()
        x = sample(model, n=args.n, steps=args.steps, sampler=args.sampler, seed=args.seed,
                   device=args.device, progress=not args.no_progress)
        write_png(args.out, make_grid(x, scale=args.scale))
        print(f"wrote {args.out}: {args.n} samples, {args.sampler}, {args.steps} steps, "
              f"{time.perf_counter() - t0:.1f} s")
    elif args.cmd == "train":
        res = train(args.iters, args.batch, args.lr, args.seed, args.out, args.device,
                    progress=not args.no_progress)
        size_kb = os.path.getsize(args.out) / 1024
        print(f"wrote {args.out} ({size_kb:.0f} KiB): {args.iters} iterations, "
              f"loss {res['loss']:.4f}, {res['seconds']:.0f} s")
    return 0
