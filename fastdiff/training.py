"""Training objectives: DDPM's L_simple and EDM's preconditioners and losses.

=========================  ==================================================
fastdiff.training          replaces
=========================  ==================================================
``ddpm_loss``              L_simple of Ho et al. (2020) as diffusers' training
                           scripts compute it (ε / x0 / v targets, min-SNR-γ
                           weighting of Hang et al. (2023), offset noise)
``VPPrecond``              NVlabs/edm ``training/networks.py`` ``VPPrecond``
``VEPrecond``              NVlabs/edm ``VEPrecond``
``iDDPMPrecond``           NVlabs/edm ``iDDPMPrecond``
``EDMPrecond``             NVlabs/edm ``EDMPrecond``
``VPLoss``                 NVlabs/edm ``training/loss.py`` ``VPLoss``
``VELoss``                 NVlabs/edm ``VELoss``
``EDMLoss``                NVlabs/edm ``EDMLoss``
=========================  ==================================================

The elementwise parts go through the fused op: the forward process
(x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε, and with it the v target, in one pass), the
EDM noising y + σ n and the preconditioned output D = c_skip x + c_out F.  All
of it is differentiable (the op has an autograd formula), has no host sync,
and works unchanged under DistributedDataParallel: wrap the network in DDP and
pass the wrapper (the losses only call it).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import ops
from .ops.steps import (_alphas_from_minus_one, _check_below, _kept_alphas, _kept_table, _rows,
                         _table_row, _timesteps)
from .reference import opmath_dtype

__all__ = [
    "EDMLoss",
    "EDMPrecond",
    "VELoss",
    "VEPrecond",
    "VPLoss",
    "VPPrecond",
    "ddpm_loss",
    "iDDPMPrecond",
]


# --------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------

_OBJECTIVES = {"eps": "eps", "epsilon": "eps", "x0": "x0", "sample": "x0",
               "v": "v", "v_prediction": "v"}


def _alphas_cumprod(scheduler_or_tables) -> torch.Tensor:
    table = getattr(scheduler_or_tables, "alphas_cumprod", scheduler_or_tables)
    if not isinstance(table, torch.Tensor):
        table = torch.as_tensor(table)
    if table.dim() != 1 or not table.is_floating_point():
        raise ValueError("ddpm_loss: scheduler_or_tables must be a 1-D float tensor of alphas_cumprod "
                         "or an object with an .alphas_cumprod attribute (a scheduler)")
    return table


def _model_output(out) -> torch.Tensor:
    """A tensor from a model's return value: itself, ``.sample`` (diffusers'
    UNet outputs) or the first element of a tuple (``return_dict=False``)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"ddpm_loss: the model returned {type(out).__name__}, expected a tensor")


def _sample_rows(**cols: torch.Tensor) -> torch.Tensor:
    """(n, 9) coefficient rows of the fused op from per-sample columns holding n values
    each (σ-shaped (B, 1, ..., 1) or (B,))."""
    first = next(iter(cols.values()))
    return _rows((first.numel(),), first, **{k: v.reshape(-1) for k, v in cols.items()})


def _v_rows(ab: torch.Tensor) -> torch.Tensor:
    """(T + 1, 9) rows of x_t = a x0 + s ε and v = a ε - s x0 from the (T + 1,) ᾱ table."""
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return _rows(ab.shape, ab, C_X=a, C_N=s, A_X=-s, A_N=a)


def ddpm_loss(
    model: Callable,
    x0: torch.Tensor,
    scheduler_or_tables,
    objective: str = "eps",
    min_snr_gamma: Optional[float] = None,
    offset_noise: float = 0.0,
    *,
    noise: Optional[torch.Tensor] = None,
    timesteps: Optional[Union[int, torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    model_kwargs: Optional[dict] = None,
    return_per_sample: bool = False,
):
    """L_simple of Ho et al. (2020): E_t,ε ||target - model(x_t, t)||², as the
    diffusers training scripts compute it.

    Args:
        model: called as ``model(x_t, t, **model_kwargs)`` with x_t like x0 and
            t the (B,) int64 timesteps; returns the prediction (a tensor, an
            object with ``.sample`` such as a diffusers UNet output, or a tuple
            whose first element is the prediction).
        x0: clean samples (B, C, ...).
        scheduler_or_tables: the ᾱ table (T,) or an object with
            ``.alphas_cumprod`` (a diffusers or fastdiff scheduler).
        objective: what the model predicts: ``"eps"`` (target ε), ``"x0"``
            (target x0) or ``"v"`` (target sqrt(ᾱ) ε - sqrt(1-ᾱ) x0, Salimans &
            Ho 2022); diffusers' names ``epsilon``/``sample``/``v_prediction``
            are accepted too.
        min_snr_gamma: weight each sample by the min-SNR-γ rule of Hang et al.
            (2023) with SNR = ᾱ/(1-ᾱ): min(SNR, γ)/SNR for ε, min(SNR, γ) for x0,
            min(SNR, γ)/(SNR+1) for v (diffusers' ``snr_gamma``).  None: weight 1.
        offset_noise: add ``offset_noise * randn(B, C, 1, ..., 1)`` to the noise
            (Guttenberg's offset noise, diffusers' ``noise_offset``).
        noise, timesteps: use these instead of drawing them (a timestep may be
            an int or a (B,) integer tensor, below T: on CPU a larger one raises
            IndexError; t < 0 means ᾱ = 1, x_t = x0, as in ``ops.add_noise``).
        generator: the ``torch.Generator`` the draws use (on x0's device), in
            diffusers' order: noise ``randn``, the offset ``randn``, then
            ``randint(0, T, (B,))`` timesteps.  None: torch's global RNG.
        return_per_sample: also return the (B,) weighted per-sample losses.

    Returns the scalar loss (the mean of the weighted per-sample MSEs, in
    float32 or float64), or ``(loss, per_sample)``.  x_t (and the v target)
    come from one fused pass with per-sample ᾱ_t.
    """
    if objective not in _OBJECTIVES:
        raise ValueError("objective must be one of " + ", ".join(repr(k) for k in _OBJECTIVES)
                         + f"; got {objective!r}")
    objective = _OBJECTIVES[objective]
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
    ab = _alphas_cumprod(scheduler_or_tables)
    batch, device = x0.shape[0], x0.device
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    if offset_noise:
        shape = x0.shape[:2] + (1,) * (x0.dim() - 2)
        noise = noise + offset_noise * torch.randn(shape, generator=generator, device=device,
                                                   dtype=x0.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, ab.shape[0], (batch,), generator=generator, device=device)
    elif isinstance(timesteps, int):
        timesteps = torch.full((batch,), timesteps, dtype=torch.int64, device=device)
    timesteps = timesteps.to(device)
    # Schedule values come from (T + 1)-row tables made once per ᾱ tensor and kept while
    # it lives unmodified (shared with add_noise and the steps): row t + 1 is timestep t,
    # row 0 ᾱ = 1 (t < 0, as add_noise).  No copy of ᾱ to the device per call.
    t = _timesteps("timesteps", timesteps, batch, device)
    _check_below("ddpm_loss", "timesteps", t, ab.shape[0])
    if objective == "v" or min_snr_gamma is not None:
        row = _table_row(t)
    if objective == "v":
        acc = opmath_dtype(x0.dtype)
        # One pass, two outputs: out = a x0 + s ε (x_t) and "x0" = a ε - s x0 (v), with
        # a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t).
        table = _kept_table(("v_noise", device, acc), x0,
                            lambda: _v_rows(_alphas_from_minus_one(ab, 1.0, device)).to(acc), ab)
        x_t, target = ops.sampler_step(x0, None, table, row, noise=noise, return_x0=True)
    else:
        x_t = ops.add_noise(x0, noise, t, ab)
        target = noise if objective == "eps" else x0

    pred = _model_output(model(x_t, timesteps, **({} if model_kwargs is None else model_kwargs)))
    acc = opmath_dtype(pred.dtype)
    per_sample = (pred.to(acc) - target.to(acc)).square().flatten(1).mean(1)
    if min_snr_gamma is not None:
        # ᾱ_t in the ops' coefficient dtype (float64; float32 on MPS)
        ab_t = _kept_alphas(ab, 1.0, device, x0)[row]
        snr = ab_t / (1 - ab_t)
        if objective == "eps":
            weight = (min_snr_gamma / snr).clamp(max=1.0)  # min(SNR, γ)/SNR, 1 at SNR = 0
        elif objective == "x0":
            weight = snr.clamp(max=min_snr_gamma)
        else:
            weight = snr.clamp(max=min_snr_gamma) / (snr + 1)
        per_sample = per_sample * weight.to(acc)
    loss = per_sample.mean()
    return (loss, per_sample) if return_per_sample else loss


# --------------------------------------------------------------------------
# EDM preconditioners
# --------------------------------------------------------------------------


class _Precond(nn.Module):
    """D(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)) around an inner
    model F (EDM paper, eq. 7 and Table 1), with NVlabs/edm's conventions.

    ``forward(x, sigma, class_labels=None, force_fp32=False, **model_kwargs)``:
    x is cast to float32, σ (a tensor with 1 or B entries) is shaped to
    broadcast over x, labels are zero (1, label_dim) when missing and the model
    has labels, and F runs in float16 when ``use_fp16`` on CUDA.  F is called
    as ``model(c_in x, c_noise.flatten(), class_labels=class_labels,
    **model_kwargs)`` and must return its input's dtype.  The output
    combination is one fused pass; it passes gradients to x and F (not to σ).
    """

    def __init__(self, model: nn.Module, img_resolution=None, img_channels=None, label_dim=0,
                 use_fp16=False):
        super().__init__()
        self.model = model
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at σ, as tensors shaped like σ."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _output(self, F_x: torch.Tensor) -> torch.Tensor:
        return F_x

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        sigma = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') \
            else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         **model_kwargs)
        if F_x.dtype != dtype:
            raise TypeError(f"{type(self).__name__}: the model returned {F_x.dtype}, expected {dtype}")
        return ops.sampler_step(x, self._output(F_x), _sample_rows(C_X=c_skip, C_M=c_out))


class VPPrecond(_Precond):
    """Preconditioning of the VP formulation (Song et al. 2021; NVlabs/edm
    ``VPPrecond``): c_skip = 1, c_out = -σ, c_in = 1/sqrt(σ²+1),
    c_noise = (M-1) σ⁻¹(σ) with σ(t) = sqrt(exp(β_d t²/2 + β_min t) - 1).
    ``model`` replaces EDM's ``model_type``/``model_kwargs``."""

    def __init__(self, model, img_resolution=None, img_channels=None, label_dim=0, use_fp16=False,
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
                - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Preconditioning of the VE formulation (Song et al. 2021; NVlabs/edm
    ``VEPrecond``): c_skip = 1, c_out = σ, c_in = 1, c_noise = log(σ/2)."""

    def __init__(self, model, img_resolution=None, img_channels=None, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(_Precond):
    """Preconditioning of improved DDPM (Nichol & Dhariwal 2021; NVlabs/edm
    ``iDDPMPrecond``): c_skip = 1, c_out = -σ, c_in = 1/sqrt(σ²+1),
    c_noise = M - 1 - j(σ) with j the index of the nearest of the M+1 discrete
    levels u_j (``round_sigma``).  F returns 2·img_channels channels (ε and the
    variance); the first img_channels are used, so ``img_channels`` is required."""

    def __init__(self, model, img_resolution=None, img_channels=None, label_dim=0, use_fp16=False,
                 C_1=0.001, C_2=0.008, M=1000):
        if img_channels is None:
            raise ValueError("iDDPMPrecond: img_channels is required "
                             "(F returns 2 * img_channels channels)")
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):  # M, ..., 1
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def _output(self, F_x):
        return F_x[:, :self.img_channels]

    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(_Precond):
    """EDM's preconditioning (Karras et al. 2022, Table 1; NVlabs/edm ``EDMPrecond``):
    c_skip = σ_d²/(σ²+σ_d²), c_out = σ σ_d/sqrt(σ²+σ_d²), c_in = 1/sqrt(σ_d²+σ²),
    c_noise = log(σ)/4."""

    def __init__(self, model, img_resolution=None, img_channels=None, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float('inf'), sigma_data=0.5):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


# --------------------------------------------------------------------------
# EDM losses
# --------------------------------------------------------------------------


def _per_sample_shape(images: torch.Tensor) -> list[int]:
    return [images.shape[0]] + [1] * (images.dim() - 1)


def _denoising_loss(net, images, sigma, weight, labels, augment_pipe):
    """weight · (D(y + σ n, σ) - y)² with y, augment_labels = augment_pipe(images);
    y + σ n is one fused pass (n = randn_like(y), drawn as EDM draws it)."""
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y)
    noisy = ops.sampler_step(y, None, _sample_rows(C_X=torch.ones_like(sigma), C_N=sigma), noise=n)
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    D_yn = net(noisy, sigma, labels, **kwargs)
    return weight * ((D_yn - y) ** 2)


class VPLoss:
    """NVlabs/edm's ``VPLoss``: t ~ U(ε_t, 1), σ = σ_VP(t), weight 1/σ².

    ``loss(net, images, labels=None, augment_pipe=None)`` returns the
    elementwise loss (reduce it yourself, as EDM's training loop does with
    ``loss.sum()``); the net is called as ``net(y + n, sigma, labels)`` (with
    ``augment_labels=`` when an augment pipe gives them).
    """

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand(_per_sample_shape(images), device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, sigma, weight, labels, augment_pipe)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


class VELoss:
    """NVlabs/edm's ``VELoss``: σ log-uniform in [σ_min, σ_max], weight 1/σ²
    (call convention as :class:`VPLoss`)."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand(_per_sample_shape(images), device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, sigma, weight, labels, augment_pipe)


class EDMLoss:
    """NVlabs/edm's ``EDMLoss``: ln σ ~ N(P_mean, P_std²), weight
    (σ² + σ_d²)/(σ σ_d)² (call convention as :class:`VPLoss`)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn(_per_sample_shape(images), device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, sigma, weight, labels, augment_pipe)
