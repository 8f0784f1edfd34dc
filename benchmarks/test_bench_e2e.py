"""End to end: whole DDPM sampling runs and a training step of a CIFAR-sized U-Net.

The model is the DDPM U-Net of denoising-diffusion-pytorch 1.11.1 (dim 64,
dim_mults 1-2-4-8, GroupNorm blocks), 3x32x32 images:

* ``eager``            -- the transcribed 1.11.1 ``Unet`` (tests/_ddpm_unet.py with its
                          1.x blocks) + the sampler update written as diffusers /
                          k-diffusion write it (plain torch ops);
* ``optimize``         -- that same model after ``fastdiff.optimize`` (fused attention
                          and GroupNorm+scale-shift+SiLU) + fastdiff's fused sampler;
* ``fastdiff``         -- ``fastdiff.nn.UNet`` with the same weights + fastdiff's
                          scheduler / sampler (fused steps);
* ``compile``          -- ``torch.compile`` of the eager model + the eager update;
* ``fastdiff+compile`` -- ``torch.compile`` of ``fastdiff.nn.UNet`` + fastdiff's sampler;
* ``optimize+compile`` -- ``torch.compile`` of the optimized model + fastdiff's sampler
                          (both, as a user who adopts fastdiff.optimize and compiles would);
* ``fastdiff+graph``   -- (CUDA, sampling) the ``fastdiff`` run recorded once into a CUDA
                          graph by :func:`fastdiff.sampling.capture` and replayed: no host
                          work per step.

Rows ``unet64v2-*``: the same U-Net with denoising-diffusion-pytorch 2.x's own blocks
(RMSNorm over channels in every ``Block``): ``eager``, ``optimize`` (fused RMSNorm +
scale-shift + SiLU, attention), ``compile`` and ``optimize+compile``.

Rows ``diffusers-cifar10-*``: diffusers' ``UNet2DModel`` in the configuration of
google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 model, 35.7M parameters, randomly
initialised): ``eager``, ``optimize`` (fused GroupNorm+SiLU (+ time embedding) in every
ResnetBlock2D and the output head, fastdiff attention processor), ``compile`` and
``optimize+compile``.

Kinds: ``ddim`` (100 DDIM steps on GPU), ``heun`` (18 EDM/Karras Heun steps, 35 model
calls, on GPU), ``train`` (one forward + backward of the DDPM loss).  On CPU the
runs are shrunk so they finish (batch 2, 5 DDIM / 3 Heun steps).  ``bytes`` is the
lower bound "parameters read once per model call" (activations excluded).
"""

import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from sampler_cases import DEVICES
from test_bench_sampling import kd_sample_heun

import fastdiff
from fastdiff import schedules
from fastdiff.cli import UNET_CONFIG as DIFFUSERS_CONFIG  # google/ddpm-cifar10-32
from fastdiff.cli import _EpsDenoiser
from fastdiff.nn.unet import UNet
from fastdiff.sampling import capture, get_sigmas_karras, sample_heun
from fastdiff.schedulers import DDIMScheduler
from fastdiff.testing import max_rel_error
from fastdiff.training import ddpm_loss

_DDPM_MODULE = "denoising_diffusion_pytorch.denoising_diffusion_pytorch"


def _ddpm():
    """tests/_ddpm_unet.py under the package's module name (so fastdiff.optimize matches it)."""
    if _DDPM_MODULE in sys.modules:
        return sys.modules[_DDPM_MODULE]
    path = pathlib.Path(__file__).parent.parent / "tests" / "_ddpm_unet.py"
    spec = importlib.util.spec_from_file_location(_DDPM_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_DDPM_MODULE] = module
    spec.loader.exec_module(module)
    return module


CONFIG = dict(dim=64, dim_mults=(1, 2, 4, 8))
IMPLS = ("eager", "optimize", "fastdiff", "compile", "fastdiff+compile", "optimize+compile")
IMPLS_V2 = ("eager", "optimize", "compile", "optimize+compile")
NAMES = {"v1": "unet64", "v2": "unet64v2", "diffusers": "diffusers-cifar10"}
KINDS = ("ddim", "heun", "train")
CHECK_STEPS = 3  # sampler steps of the agreement check before timing


def _sizes(device):
    if device == "cuda":
        return dict(batch=64, ddim_steps=100, heun_steps=18, rounds=3)
    return dict(batch=2, ddim_steps=5, heun_steps=3, rounds=5)


_MODELS = {}


class _Eps(torch.nn.Module):
    """A diffusers UNet2DModel called as model(x, t) -> ε, as the samplers here call it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t, return_dict=False)[0]


def _new_model(arch):
    if arch == "diffusers":
        from diffusers import UNet2DModel

        return _Eps(UNet2DModel(**DIFFUSERS_CONFIG))
    D = _ddpm()
    blocks = {} if arch == "v2" else {"resnet_block": D.v1_blocks()[1]}
    return D.Unet(**CONFIG, **blocks)


def _models(device, arch="v1"):
    """{"eager", "optimize"[, "fastdiff"]} models with identical weights (built once per
    device and architecture: "v1" 1.11.1 GroupNorm blocks, "v2" 2.x RMSNorm blocks,
    "diffusers" UNet2DModel)."""
    if (device, arch) not in _MODELS:
        torch.manual_seed(0)
        ref = _new_model(arch)
        opt = _new_model(arch)
        opt.load_state_dict(ref.state_dict(), strict=True)
        fastdiff.optimize(opt)
        models = [("eager", ref), ("optimize", opt)]
        if arch == "v1":
            ours = UNet(**CONFIG)
            ours.load_state_dict(ref.state_dict(), strict=True)
            models.append(("fastdiff", ours))
        _MODELS[device, arch] = {k: m.to(device).eval() for k, m in models}
    return _MODELS[device, arch]


_COMPILED = {}


def _model_for(impl, device, arch="v1"):
    models = _models(device, arch)
    if impl == "fastdiff+graph":
        return models["fastdiff"]
    if impl == "compile":
        key = (device, arch, "eager")
    elif impl == "fastdiff+compile":
        key = (device, arch, "fastdiff")
    elif impl == "optimize+compile":
        key = (device, arch, "optimize")
    else:
        return models[impl]
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(models[key[2]])
    return _COMPILED[key]


def _fused_sampler(impl):
    return impl in ("optimize", "fastdiff", "fastdiff+compile", "optimize+compile", "fastdiff+graph")


@torch.no_grad()
def eager_ddim(model, x, ab, timesteps):
    """diffusers DDIMScheduler.step (η = 0, ε prediction, clip_sample, set_alpha_to_one) as torch ops."""
    for i, t in enumerate(timesteps):
        eps = model(x, torch.full((x.shape[0],), t, device=x.device))
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab_t = ab[t]
        ab_prev = ab[prev] if prev >= 0 else torch.ones((), device=x.device)
        x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


@torch.no_grad()
def fastdiff_ddim(model, x, scheduler):
    for t in scheduler.timesteps:
        eps = model(x, t.expand(x.shape[0]))
        x = scheduler.step(eps, t, x).prev_sample
    return x


def eager_train_step(model, x0, ab, noise, t):
    ab_t = ab[t].view(-1, 1, 1, 1)
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise
    loss = F.mse_loss(model(x_t, t), noise)
    loss.backward()
    return loss


def fastdiff_train_step(model, x0, ab, noise, t):
    loss = ddpm_loss(model, x0, ab, noise=noise, timesteps=t)
    loss.backward()
    return loss


PARAMS = [pytest.param(dev, kind, impl, arch, id=f"{dev}-{kind}-{impl}" + ("" if arch == "v1" else f"-{arch}"))
          for arch, impls in (("v1", IMPLS), ("v2", IMPLS_V2), ("diffusers", IMPLS_V2))
          for dev in DEVICES for kind in KINDS for impl in impls]
PARAMS += [pytest.param(dev, kind, "fastdiff+graph", "v1", id=f"{dev}-{kind}-fastdiff+graph")
           for dev in DEVICES if dev == "cuda" for kind in ("ddim", "heun")]


@pytest.mark.parametrize("device, kind, impl, arch", PARAMS)
def test_e2e(benchmark, device, kind, impl, arch):
    sz = _sizes(device)
    shape = (sz["batch"], 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g).to(device)
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000)).to(device)
    model = _model_for(impl, device, arch)
    n_params = sum(p.numel() * p.element_size() for p in _models(device, arch)["eager"].parameters())

    if kind == "ddim":
        scheduler = DDIMScheduler(timestep_spacing="trailing")
        scheduler.set_timesteps(sz["ddim_steps"], device=device)
        timesteps = [int(t) for t in scheduler.timesteps]
        if _fused_sampler(impl):
            fn = lambda: fastdiff_ddim(model, x_T, scheduler)  # noqa: E731
        else:
            fn = lambda: eager_ddim(model, x_T, ab, timesteps)  # noqa: E731
        calls = sz["ddim_steps"]
    elif kind == "heun":
        den = _EpsDenoiser(model, ab)
        sigmas = get_sigmas_karras(sz["heun_steps"], den.sigmas[0].item(), 80.0, device=device)
        x = x_T * sigmas[0]
        if _fused_sampler(impl):
            fn = lambda: sample_heun(den, x, sigmas, disable=True)  # noqa: E731
        else:
            fn = lambda: kd_sample_heun(den, x, sigmas)  # noqa: E731
        calls = 2 * sz["heun_steps"] - 1
    else:
        x0 = torch.randn(shape, generator=g).clamp(-1, 1).to(device)
        noise = torch.randn(shape, generator=g).to(device)
        t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
        train_model = model
        step = fastdiff_train_step if _fused_sampler(impl) else eager_train_step

        def fn():
            train_model.zero_grad(set_to_none=True)
            return step(train_model, x0, ab, noise, t)
        calls = 3  # forward + backward (~2 forwards)

    if impl == "fastdiff+graph":  # same kernels as ``fastdiff``, replayed from a graph
        sampler = fn
        if kind == "heun":  # capture wants the σ schedule as Python floats
            sampler = lambda: sample_heun(den, x, sigmas.tolist(), disable=True)  # noqa: E731
        run = capture(lambda _: sampler(), x_T)
        assert max_rel_error(run(x_T).clone(), sampler()) < 1e-3
        fn = lambda: run(x_T)  # noqa: E731

    # same numbers as the eager run, checked on a short run: a randomly initialised
    # U-Net's 100-step clipped DDIM trajectory is chaotic, and TF32 convolutions
    # (torch.compile's too) flip pixels between -1 and +1 by the end
    if impl not in ("eager", "fastdiff+graph") and kind != "train":
        check_model = _model_for(impl, device, arch)
        eager_model = _models(device, arch)["eager"]
        if kind == "ddim":
            short = DDIMScheduler(timestep_spacing="trailing")
            short.set_timesteps(CHECK_STEPS, device=device)
            short_ts = [int(t) for t in short.timesteps]
            got = (fastdiff_ddim(check_model, x_T, short) if _fused_sampler(impl)
                   else eager_ddim(check_model, x_T, ab, short_ts))
            ref = eager_ddim(eager_model, x_T, ab, short_ts)
        else:
            short_sigmas = get_sigmas_karras(CHECK_STEPS, den.sigmas[0].item(), 80.0, device=device)
            check_den = _EpsDenoiser(check_model, ab)
            x_short = x_T * short_sigmas[0]
            got = (sample_heun(check_den, x_short, short_sigmas, disable=True) if _fused_sampler(impl)
                   else kd_sample_heun(check_den, x_short, short_sigmas))
            ref = kd_sample_heun(_EpsDenoiser(eager_model, ab), x_short, short_sigmas)
        # a sanity check against gross errors (tests/test_optimize.py checks the model
        # outputs to 1e-4): at t = 999 DDIM divides by sqrt(ᾱ) = 0.0064, so 1e-5
        # differences in ε become ~1e-2 in x0 after three steps
        assert max_rel_error(got, ref) < 5e-2

    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()  # warm-up (and compilation)
    name = NAMES[arch]
    benchmark.group = f"{device}-float32-{name}-b{shape[0]}-e2e_{kind}"
    benchmark.extra_info.update(device=device, dtype="float32", shape=f"{name}-{'x'.join(map(str, shape))}",
                                kind=f"e2e_{kind}", impl=impl, bytes=calls * n_params)
    benchmark.pedantic(timed, rounds=sz["rounds"], iterations=1, warmup_rounds=0)
