"""Noise schedules as tensors.

Beta schedules follow diffusers' definitions exactly (same float32 arithmetic),
so tables built here equal ``DDPMScheduler(...).betas`` / ``.alphas_cumprod``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "BETA_SCHEDULES",
    "alphas_cumprod",
    "betas",
    "karras_sigmas",
    "rescale_zero_terminal_snr",
    "sigmas_from_alphas_cumprod",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")


def _cosine_betas(n: int, max_beta: float) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (GLIDE's squaredcos_cap_v2), in float64
    Python math then rounded to float32, as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
        dtype=torch.float32,
    )


def betas(
    kind: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    *,
    max_beta: float = 0.999,
    rescale_zero_snr: bool = False,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The (num_train_timesteps,) float32 beta table of a named schedule.

    ``kind``: ``linear`` (Ho et al.), ``scaled_linear`` (latent diffusion:
    linear in sqrt(beta)), ``squaredcos_cap_v2`` / ``cosine`` (improved DDPM,
    betas capped at ``max_beta``), ``sigmoid`` (GeoDiff).
    ``rescale_zero_snr`` applies :func:`rescale_zero_terminal_snr`.
    """
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    n = num_train_timesteps
    if kind == "linear":
        b = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        b = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif kind in ("squaredcos_cap_v2", "cosine"):
        b = _cosine_betas(n, max_beta)
    elif kind == "sigmoid":
        b = torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(
            f"betas: unknown schedule kind {kind!r}; valid kinds are "
            + ", ".join(repr(k) for k in BETA_SCHEDULES)
        )
    if rescale_zero_snr:
        b = rescale_zero_terminal_snr(b)
    return b.to(device) if device is not None else b


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = prod_{s<=t} (1 - β_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first is unchanged.
    """
    abar_sqrt = alphas_cumprod(betas).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): the VE noise level equivalent to a VP timestep."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: n noise levels from sigma_max down to sigma_min,
    equally spaced in sigma**(1/rho).  No trailing zero (``fastdiff.sampling``'s
    ``get_sigmas_karras`` appends it, as k-diffusion does)."""
    if n < 1:
        raise ValueError(f"karras_sigmas: n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"karras_sigmas: need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}"
        )
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
