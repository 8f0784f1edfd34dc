"""k-diffusion, EDM and NCSN style samplers whose every update is one fused pass.

The loops below are the reference loops users run today, with each sample
update replaced by the fused op of :mod:`fastdiff.ops` (one elementwise pass
instead of four to ten eager ones):

=========================  ==================================================
fastdiff.sampling          replaces
=========================  ==================================================
``get_sigmas_karras``      k-diffusion ``get_sigmas_karras``
``sample_euler``           k-diffusion ``sample_euler`` (with churn)
``sample_euler_ancestral`` k-diffusion ``sample_euler_ancestral``
``sample_heun``            k-diffusion ``sample_heun`` (with churn)
``sample_dpmpp_2m``        k-diffusion ``sample_dpmpp_2m``
``edm_sampler``            NVlabs/edm ``generate.py``'s ``edm_sampler``
``get_sigmas_geometric``   NCSN's geometric noise levels
``annealed_langevin``      NCSN's ``anneal_Langevin_dynamics``
``CFGDenoiser``            the usual ``CFGDenoiser`` wrapper of k-diffusion scripts
=========================  ==================================================

The k-diffusion functions have k-diffusion 0.1.1's signatures (the PyPI
release) and give its results for the same inputs and torch seed: the model is
called as ``model(x, sigma * s_in, **extra_args)`` and returns the denoised
image, ``callback`` receives ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``
once per step (with the sample the step started from), noise comes from
``torch.randn_like`` in the same order, and ``disable`` turns off the tqdm bar.
``sigmas`` may be a tensor (as k-diffusion builds it) or a sequence of Python
floats; the loops read it on the host once per call (one device-to-host copy)
and pass Python floats to the ops.

Classifier-free guidance: wrap the model in :class:`CFGDenoiser`.  Called
directly it returns ``uncond + (cond - uncond) * cond_scale`` like the usual
wrapper, so it works with any sampler; the samplers of this module instead
call its ``batched`` method (one model call on ``cat([x, x])``) and hand the
(2B, ...) output with ``guidance_scale=cond_scale`` to the fused step, which
combines the halves inside the same pass as the update.

CUDA graphs: a whole fixed-step loop can be recorded once and replayed with
:func:`capture`.  The loops have no host synchronisation when ``sigmas`` is a
sequence of Python floats (``sigmas.tolist()``; a CUDA tensor would be read
on the host, which capture forbids, and is refused with that advice), the
callback is None and the noise is drawn by ``torch.randn_like`` (the default
CUDA generator is graph-safe: every replay draws new noise) or by a
:class:`PhiloxNoiseSampler` whose seed is a one-element int64 tensor on the
device (write a new seed into it before a replay).  :func:`edm_sampler` builds
its schedule on the host and is capturable for nets whose ``round_sigma``
does not touch the device (EDM, VP and VE preconditioners; iDDPM's looks up a
table on the device).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .ops import steps
from .reference import opmath_dtype
from .reference.sampler_step import C_M, C_N, C_X, NUM_COEFS
from .schedules import karras_sigmas

__all__ = [
    "CFGDenoiser",
    "CapturedSampler",
    "PhiloxNoiseSampler",
    "annealed_langevin",
    "capture",
    "edm_sampler",
    "get_sigmas_geometric",
    "get_sigmas_karras",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
]

Sigmas = Union[torch.Tensor, Sequence[float]]


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """The noise levels of Karras et al. (2022) eq. 5 with a trailing zero
    (k-diffusion's ``get_sigmas_karras``): n + 1 float32 values."""
    sigmas = karras_sigmas(n, sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)


def get_sigmas_geometric(n, sigma_min, sigma_max, device='cpu'):
    """NCSN's noise levels (Song & Ermon 2019): n float32 values from sigma_max
    down to sigma_min, equally spaced in log σ (computed in float64 as NCSN's
    ``np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), n))``); no
    trailing zero."""
    if n < 1:
        raise ValueError(f"get_sigmas_geometric: n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"get_sigmas_geometric: need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}"
        )
    logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return logs.exp().to(device=device, dtype=torch.float32)


# --------------------------------------------------------------------------
# Classifier-free guidance and noise
# --------------------------------------------------------------------------


def _cat_conditioning(uncond, cond):
    """cat([uncond, cond]) of two tensors, or key by key of two dicts of tensors."""
    if isinstance(uncond, torch.Tensor) and isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(uncond, dict) and isinstance(cond, dict) and uncond.keys() == cond.keys():
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    raise TypeError("CFGDenoiser: cond and uncond must be two tensors or two dicts of tensors "
                    "with the same keys")


def _twice(sigma, batch: int):
    """A per-sample σ (or label) tensor repeated for cat([x, x]); anything else as is."""
    if isinstance(sigma, torch.Tensor) and sigma.dim() >= 1 and sigma.shape[0] == batch:
        return torch.cat([sigma, sigma])
    return sigma


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser, score or
    EDM net: ``uncond + (cond - uncond) * cond_scale`` from one batched call.

    ``model(cat([x, x]), cat([sigma, sigma]), **{cond_key: cat([uncond, cond])},
    **extra_args)`` is evaluated once; ``cond``/``uncond`` are tensors (or dicts
    of tensors, concatenated key by key) with the batch first.  ``sigma`` is
    repeated when it has one entry per sample and passed as is otherwise (a 0-d
    σ of ``edm_sampler``).  Other ``extra_args`` are passed through unchanged.

    * ``forward(x, sigma, **extra_args)`` returns the guided output, as the
      ``CFGDenoiser`` of k-diffusion scripts does: usable with any sampler.
    * ``batched(x, sigma, **extra_args)`` returns the raw (2B, ...) output
      (uncond half first).  The samplers of this module call it and fuse the
      combination into their update (``guidance_scale`` of the ops), which
      saves the separate combine pass.

    For ``edm_sampler`` use ``cond_key="class_labels"`` and give the labels
    here, not to the sampler.  Attributes the wrapper lacks (``round_sigma``,
    ``sigma_min``, ``sigma_max``, ...) are read from the wrapped model.
    """

    def __init__(self, model: Callable, cond, uncond, cond_scale: float, cond_key: str = "cond"):
        super().__init__()
        if isinstance(cond_scale, torch.Tensor) or not isinstance(cond_scale, (int, float)):
            raise TypeError("CFGDenoiser: cond_scale must be a Python float, "
                            f"got {type(cond_scale).__name__}")
        self.inner_model = model
        self.cond, self.uncond = cond, uncond
        self.cond_scale = float(cond_scale)
        self.cond_key = cond_key

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner_model":
                raise
            return getattr(self.inner_model, name)

    def batched(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        """The model's (2B, ...) output on cat([x, x]): uncond half, then cond half."""
        cond_in = _cat_conditioning(self.uncond, self.cond)
        return self.inner_model(torch.cat([x, x]), _twice(sigma, x.shape[0]),
                                **{self.cond_key: cond_in}, **extra_args)

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        uncond, cond = self.batched(x, sigma, **extra_args).chunk(2)
        return uncond + (cond - uncond) * self.cond_scale


class PhiloxNoiseSampler:
    """A k-diffusion ``noise_sampler`` whose noise is drawn inside the fused step.

    Passed to :func:`sample_euler_ancestral` or :func:`annealed_langevin`, the
    noise of the k-th draw is generated in the update's own pass by the ops'
    Philox4x32-10 stream keyed by ``seed + k`` (no noise tensor is written or
    read).  Called like any noise sampler, ``ns(sigma, sigma_next)``, it returns
    the same noise as a tensor shaped like ``x`` (to ~1e-6), so other samplers
    can use it too.  ``seed`` is an int or a one-element int64 tensor; on the
    device, a captured CUDA graph reads it at every replay.  This stream is not
    ``torch.randn``'s: results differ from k-diffusion's default noise.
    """

    def __init__(self, x: torch.Tensor, seed: Union[int, torch.Tensor]):
        if isinstance(seed, torch.Tensor):
            if seed.dtype not in (torch.int32, torch.int64) or seed.numel() != 1:
                raise TypeError("PhiloxNoiseSampler: seed must be an int or a one-element int tensor")
        elif not isinstance(seed, int):
            raise TypeError("PhiloxNoiseSampler: seed must be an int or a tensor, "
                            f"got {type(seed).__name__}")
        self.like = x
        self.seed = seed
        self.draws = 0

    def next_seed(self) -> Union[int, torch.Tensor]:
        """The key of the next draw (seed + number of draws so far)."""
        seed = self.seed + self.draws
        self.draws += 1
        return seed

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        zeros = torch.zeros_like(self.like)
        return ops.sampler_step(zeros, None, _coef_row(zeros, C_N=1.0), seed=self.next_seed())


def _default_noise_sampler(x: torch.Tensor) -> Callable:
    """k-diffusion's ``default_noise_sampler``: ``torch.randn_like(x)`` per call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def _noise_args(noise_sampler, sigma, sigma_next) -> dict:
    """The noise of one step as keyword arguments of a fused step."""
    if isinstance(noise_sampler, PhiloxNoiseSampler):
        return {"seed": noise_sampler.next_seed()}
    return {"noise": noise_sampler(sigma, sigma_next)}


# --------------------------------------------------------------------------
# Loop helpers
# --------------------------------------------------------------------------


def _trange(n: int, disable: Optional[bool]):
    """k-diffusion's ``trange(n, disable=disable)``; a plain range without tqdm."""
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is optional: no progress bar without it
        return range(n)
    return trange(n, disable=disable)


def _coef_row(x: torch.Tensor, **cols: float) -> torch.Tensor:
    """One coefficient row (1, 9) on x's device in x's arithmetic dtype, built
    with fills only (no host-to-device copy, so it can be captured)."""
    dtype = opmath_dtype(x.dtype)
    index = {"C_X": C_X, "C_M": C_M, "C_N": C_N}
    values = [0.0] * NUM_COEFS
    for name, value in cols.items():
        values[index[name]] = value
    return steps.filled_row(values, dtype, x.device)


class _Sigmas:
    """A σ schedule read on the host once: ``values`` (Python floats) drive the
    control flow and the step coefficients; ``at`` gives σ_i · scale as
    k-diffusion exposes it to the model and the callback (a 0-d tensor when the
    schedule is a tensor)."""

    def __init__(self, sigmas: Sigmas, x: torch.Tensor):
        if isinstance(sigmas, torch.Tensor):
            if sigmas.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "reading a CUDA sigmas tensor on the host synchronises, which CUDA graph "
                    "capture forbids: pass sigmas as a list of Python floats (sigmas.tolist())"
                )
            self.values = [float(s) for s in sigmas.tolist()]
            self.tensor: Optional[torch.Tensor] = sigmas
        else:
            self.values = [float(s) for s in sigmas]
            self.tensor = None
        if len(self.values) < 2:
            raise ValueError(f"sigmas needs at least 2 values (a start and an end), got {len(self.values)}")
        self.s_in = x.new_ones([x.shape[0]])

    def __len__(self) -> int:
        return len(self.values)

    def at(self, i: int, scale: float = 1.0):
        return self.values[i] * scale if self.tensor is None else self.tensor[i] * scale


class _Denoiser:
    """``model(x, sigma, **extra_args)``; a :class:`CFGDenoiser` is called through
    ``batched`` and its scale handed to the fused steps as ``guidance_scale``."""

    def __init__(self, model: Callable, extra_args: Optional[dict]):
        self.extra_args = {} if extra_args is None else extra_args
        if isinstance(model, CFGDenoiser):
            self.fn, self.guidance_scale = model.batched, model.cond_scale
        else:
            self.fn, self.guidance_scale = model, None

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.fn(x, sigma, **self.extra_args)


def _churn(x, sig: _Sigmas, i: int, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Algorithm 2 lines 4-6 as k-diffusion 0.1.1 does them: returns
    ``(x_hat, gamma + 1)`` with σ_hat = σ_i (gamma + 1).

    k-diffusion 0.1.1 draws ``randn_like(x)`` on every step; so does this loop
    whenever ``s_churn > 0`` (step i uses the same draw under the same seed),
    and not at all without churn, where the draw is unused.
    """
    s = sig.values[i]
    gamma = min(s_churn / (len(sig) - 1), 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.
    if s_churn > 0:
        eps = torch.randn_like(x)
        if gamma > 0:
            x = ops.churn(x, s, s * (gamma + 1), s_noise=s_noise, noise=eps)
    return x, gamma + 1


# --------------------------------------------------------------------------
# k-diffusion samplers
# --------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.,
                 s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """Euler steps of Karras et al. (2022) Algorithm 2 (k-diffusion's
    ``sample_euler``): optional churn, then x + (σ_{i+1} - σ_hat) (x - D)/σ_hat
    in one fused pass (``ops.euler_step``)."""
    denoise, sig = _Denoiser(model, extra_args), _Sigmas(sigmas, x)
    for i in _trange(len(sig) - 1, disable):
        x, scale = _churn(x, sig, i, s_churn, s_tmin, s_tmax, s_noise)
        m = denoise(x, sig.at(i, scale) * sig.s_in)
        want_x0 = denoise.guided and callback is not None
        out = ops.euler_step(m, x, sig.values[i] * scale, sig.values[i + 1],
                             guidance_scale=denoise.guidance_scale, return_x0=want_x0)
        x_next, denoised = out if want_x0 else (out, m)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sig.at(i), 'sigma_hat': sig.at(i, scale),
                      'denoised': denoised})
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                           s_noise=1., noise_sampler=None):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``):
    step to σ_down, add s_noise σ_up z, in one fused pass
    (``ops.euler_ancestral_step``).  ``noise_sampler(sigma, sigma_next)`` is
    called when k-diffusion calls it (σ_{i+1} > 0); the default draws
    ``torch.randn_like(x)``; a :class:`PhiloxNoiseSampler` draws in-kernel."""
    denoise, sig = _Denoiser(model, extra_args), _Sigmas(sigmas, x)
    if noise_sampler is None:
        noise_sampler = _default_noise_sampler(x)
    for i in _trange(len(sig) - 1, disable):
        m = denoise(x, sig.at(i) * sig.s_in)
        s, s_next = sig.values[i], sig.values[i + 1]
        noise = _noise_args(noise_sampler, sig.at(i), sig.at(i + 1)) if s_next > 0 else {}
        want_x0 = denoise.guided and callback is not None
        out = ops.euler_ancestral_step(m, x, s, s_next, eta=eta, s_noise=s_noise,
                                       guidance_scale=denoise.guidance_scale,
                                       return_x0=want_x0, **noise)
        x_next, denoised = out if want_x0 else (out, m)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sig.at(i), 'sigma_hat': sig.at(i), 'denoised': denoised})
        x = x_next
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.,
                s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """Heun steps of Karras et al. (2022) Algorithm 2 (k-diffusion's ``sample_heun``):
    an Euler step to σ_{i+1}, then, unless σ_{i+1} = 0, the trapezoidal
    correction with the model evaluated there; two fused passes per step
    (``ops.euler_step`` and ``ops.heun_step``)."""
    denoise, sig = _Denoiser(model, extra_args), _Sigmas(sigmas, x)
    gs = denoise.guidance_scale
    for i in _trange(len(sig) - 1, disable):
        x, scale = _churn(x, sig, i, s_churn, s_tmin, s_tmax, s_noise)
        sigma_hat, s_next = sig.values[i] * scale, sig.values[i + 1]
        m = denoise(x, sig.at(i, scale) * sig.s_in)
        # The guided D1 comes out of the Euler pass; it is needed by the
        # correction (σ_{i+1} > 0) and by the callback.
        want_x0 = denoise.guided and (s_next > 0 or callback is not None)
        out = ops.euler_step(m, x, sigma_hat, s_next, guidance_scale=gs, return_x0=want_x0)
        x_2, denoised = out if want_x0 else (out, m)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sig.at(i), 'sigma_hat': sig.at(i, scale),
                      'denoised': denoised})
        if s_next == 0:
            x = x_2
        else:
            m_2 = denoise(x_2, sig.at(i + 1) * sig.s_in)
            x = ops.heun_step(m_2, x_2, x, denoised, sigma_hat, s_next, guidance_scale=gs)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's ``sample_dpmpp_2m``): first
    order on the first step and onto σ = 0, second order (with the previous
    step's denoised image) otherwise; one fused pass per step
    (``ops.dpmpp_2m_step``)."""
    denoise, sig = _Denoiser(model, extra_args), _Sigmas(sigmas, x)
    old_denoised = None
    for i in _trange(len(sig) - 1, disable):
        m = denoise(x, sig.at(i) * sig.s_in)
        s, s_next = sig.values[i], sig.values[i + 1]
        second_order = old_denoised is not None and s_next != 0
        want_x0 = denoise.guided
        out = ops.dpmpp_2m_step(m, x, s, s_next,
                                sigma_prev=sig.values[i - 1] if second_order else None,
                                denoised_prev=old_denoised if second_order else None,
                                guidance_scale=denoise.guidance_scale, return_x0=want_x0)
        x_next, denoised = out if want_x0 else (out, m)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sig.at(i), 'sigma_hat': sig.at(i), 'denoised': denoised})
        x, old_denoised = x_next, denoised
    return x


# --------------------------------------------------------------------------
# EDM
# --------------------------------------------------------------------------


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'),
                S_noise=1, *, disable=True):
    """Algorithm 2 of Karras et al. (2022) (NVlabs/edm ``generate.py``'s
    ``edm_sampler``): the ρ-schedule clipped to ``net.sigma_min/max`` and
    rounded by ``net.round_sigma``, float64 state, ``net(x, t, class_labels)``
    with 0-d float64 t, churn, an Euler step and Heun's correction on every
    step but the last; two fused passes per step.

    Differences that do not change results: the schedule is built on the host
    (so the loop has no host sync), and ``randn_like`` is called on every step
    only when ``S_churn > 0`` (the reference calls it always and multiplies by
    0 without churn).  ``disable`` (keyword, default True: the reference has no
    bar) shows a tqdm bar when False.  With a :class:`CFGDenoiser` as ``net``,
    give the labels to the wrapper (``cond_key="class_labels"``), not here.
    """
    if isinstance(net, CFGDenoiser):
        if class_labels is not None:
            raise ValueError("edm_sampler: with a CFGDenoiser, give the class labels to the "
                             "wrapper (cond=..., uncond=..., cond_key='class_labels')")
        denoise = _Denoiser(net, None)
    else:
        denoise = _Denoiser(lambda x, t: net(x, t, class_labels), None)
    gs = denoise.guidance_scale

    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([torch.as_tensor(net.round_sigma(t_steps)).to(torch.float64),
                         torch.zeros_like(t_steps[:1])])
    t = t_steps.tolist()
    gammas = torch.tensor([min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= tc <= S_max else 0.
                           for tc in t[:-1]], dtype=torch.float64)
    t_cur = t_steps[:-1]
    t_hat = torch.as_tensor(net.round_sigma(t_cur + gammas * t_cur)).tolist()

    def sigma(value: float) -> torch.Tensor:
        return torch.full((), value, dtype=torch.float64, device=latents.device)

    x = latents.to(torch.float64) * t[0]
    for i in _trange(num_steps, disable):
        if S_churn > 0:
            eps = randn_like(x)
            if t_hat[i] != t[i]:
                x = ops.churn(x, t[i], t_hat[i], s_noise=S_noise, noise=eps)
        m = denoise(x, sigma(t_hat[i]))
        last = i == num_steps - 1
        want_x0 = denoise.guided and not last
        out = ops.euler_step(m, x, t_hat[i], t[i + 1], guidance_scale=gs, return_x0=want_x0)
        x_next, denoised = out if want_x0 else (out, m)
        if not last:
            m_2 = denoise(x_next, sigma(t[i + 1]))
            x_next = ops.heun_step(m_2, x_next, x, denoised, t_hat[i], t[i + 1], guidance_scale=gs)
        x = x_next
    return x


# --------------------------------------------------------------------------
# NCSN
# --------------------------------------------------------------------------


@torch.no_grad()
def annealed_langevin(score_model, x, sigmas, n_steps_each=100, step_lr=2e-5, extra_args=None,
                      callback=None, disable=None, denoise=False, noise_sampler=None,
                      condition="index"):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; NCSN's
    ``anneal_Langevin_dynamics``, with NCSNv2's final ``denoise`` option).

    For each level σ_i of ``sigmas`` (decreasing, e.g. :func:`get_sigmas_geometric`)
    run ``n_steps_each`` steps x ← x + α_i s(x, i) + sqrt(2 α_i) z with
    α_i = step_lr · σ_i² / σ_L², each one fused pass (``ops.sampler_step``).
    With ``denoise``, finish with x + σ_L² s(x, L-1) (Tweedie's formula).

    ``score_model(x, c, **extra_args)`` returns the score; ``c`` is the (B,)
    int64 level index as NCSN's networks take it (``condition="index"``) or
    the (B,) σ_i in x's dtype (``condition="sigma"``).  Noise is drawn after
    the score call (NCSNv2's order) from ``torch.randn_like`` or
    ``noise_sampler(sigma, sigma)``.  ``callback`` gets ``{'x', 'i', 'step',
    'sigma', 'score'}`` per step (x before the step, i the level); ``disable``
    the tqdm bar over levels.  Returns the final sample (NCSN returns the list
    of intermediate images: use the callback).
    """
    if condition not in ("index", "sigma"):
        raise ValueError(f"condition must be one of 'index', 'sigma'; got {condition!r}")
    score, sig = _Denoiser(score_model, extra_args), _Sigmas(sigmas, x)
    if noise_sampler is None:
        noise_sampler = _default_noise_sampler(x)
    batch = x.shape[0]

    def level(c: int):
        if condition == "index":
            return torch.full((batch,), c, dtype=torch.int64, device=x.device)
        return sig.s_in * sig.values[c]

    sigma_last = sig.values[-1]
    for c in _trange(len(sig), disable):
        s = sig.values[c]
        step_size = step_lr * (s / sigma_last) ** 2
        coefs = _coef_row(x, C_X=1.0, C_M=step_size, C_N=math.sqrt(2 * step_size))
        labels = level(c)
        for step in range(n_steps_each):
            grad = score(x, labels)
            noise = _noise_args(noise_sampler, sig.at(c), sig.at(c))
            x_next = ops.sampler_step(x, grad, coefs, guidance_scale=score.guidance_scale, **noise)
            if callback is not None:
                callback({'x': x, 'i': c, 'step': step, 'sigma': sig.at(c), 'score': grad})
            x = x_next
    if denoise:
        grad = score(x, level(len(sig) - 1))
        x = ops.sampler_step(x, grad, _coef_row(x, C_X=1.0, C_M=sigma_last ** 2),
                             guidance_scale=score.guidance_scale)
    return x


# --------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------


class CapturedSampler:
    """A sampling call recorded into a CUDA graph; see :func:`capture`.

    ``sampler(*inputs)`` copies the inputs into the static input tensors,
    replays the graph and returns the static output: the same tensor(s) every
    time, overwritten by the next replay (``.clone()`` what you keep).
    """

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], warmup: int = 2):
        if not inputs or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            raise ValueError("capture: the inputs must be CUDA tensors (at least one)")
        self.static_inputs = tuple(t.clone() for t in inputs)
        device = self.static_inputs[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lazy init, autotuning, allocator
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return self.static_output


def capture(fn: Callable, *inputs: torch.Tensor, warmup: int = 2) -> CapturedSampler:
    """Record ``fn(*inputs)`` — a whole fixed-step sampling loop — into a CUDA graph.

    Example::

        sigmas = get_sigmas_karras(18, 0.002, 80.0).tolist()      # Python floats
        seed = torch.zeros(1, dtype=torch.int64, device="cuda")    # in-kernel noise key
        run = capture(lambda x: sample_euler_ancestral(
            model, x, sigmas, disable=True, noise_sampler=PhiloxNoiseSampler(x, seed)),
            torch.randn(8, 4, 64, 64, device="cuda") * sigmas[0])
        seed.fill_(1234); images = run(x_T).clone()

    ``fn`` runs ``warmup`` times on a side stream, then once under capture.
    Rules (those of CUDA graphs): σ schedules as Python floats, no callback
    that reads tensors on the host, fixed shapes, noise from the default CUDA
    generator (``torch.randn_like``: each replay draws new noise) or from a
    :class:`PhiloxNoiseSampler` created inside ``fn`` from a seed tensor on the
    device (each replay uses the keys ``seed + k`` read from that tensor: write
    a new seed into it to vary them).
    """
    return CapturedSampler(fn, inputs, warmup)
