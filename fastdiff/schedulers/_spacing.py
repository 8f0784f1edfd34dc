"""Timestep spacings and σ schedules, transcribed from diffusers.

These run once per ``set_timesteps`` on the host, in numpy with diffusers'
exact dtypes and operation order, so ``timesteps`` and ``sigmas`` come out
equal to diffusers' (rounded timesteps included).  The per-step work happens
in the fused op, from tables built out of these arrays.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .base import TIMESTEP_SPACINGS, check_choice

SIGMA_SCHEDULES = ("karras", "exponential", "beta")


def spaced_timesteps(owner: str, spacing: str, num_train_timesteps: int, n: int,
                     steps_offset: int, dtype) -> np.ndarray:
    """Table 2 of Lin et al. 2023 ("Common diffusion noise schedules and sample
    steps are flawed"), descending, as diffusers' DDPM/DDIM (``dtype=np.int64``)
    and Euler/Heun (``dtype=np.float32``: ``linspace`` is not rounded) compute it."""
    check_choice(owner, "timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T = num_train_timesteps
    if spacing == "linspace":
        if dtype == np.int64:
            ts = np.linspace(0, T - 1, n).round()[::-1]
        else:
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(dtype) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return ts.astype(dtype).copy()


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = sqrt((1-ᾱ_t)/ᾱ_t) for every training timestep (float32, ascending in t)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of σ, interpolating linearly in log σ
    (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def convert_sigmas(kind: str, in_sigmas: np.ndarray, n: int,
                   sigma_min: Optional[float] = None, sigma_max: Optional[float] = None) -> np.ndarray:
    """n σ from sigma_max down to sigma_min (defaults: the ends of ``in_sigmas``).

    ``karras``: Karras et al. 2022 eq. 5 with ρ = 7; ``exponential``: equal
    steps in log σ; ``beta``: the Beta(0.6, 0.6) quantiles of Lee et al. 2024
    (needs scipy, as diffusers).
    """
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    if kind == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho = sigma_min ** (1 / rho)
        max_inv_rho = sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    import scipy.stats

    return np.array([
        sigma_min + ppf * (sigma_max - sigma_min)
        for ppf in (scipy.stats.beta.ppf(t, 0.6, 0.6) for t in 1 - np.linspace(0, 1, n))
    ])


def sigma_schedule(owner: str, config) -> Optional[str]:
    """Which of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas is set
    (None for the plain interpolated σ); at most one may be."""
    chosen = [k for k in SIGMA_SCHEDULES if config.get(f"use_{k}_sigmas", False)]
    if len(chosen) > 1:
        raise ValueError(
            f"{owner}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
            f"can be True; got {', '.join('use_' + k + '_sigmas' for k in chosen)}"
        )
    if chosen == ["beta"]:
        try:
            import scipy.stats  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{owner}: use_beta_sigmas needs scipy") from e
    return chosen[0] if chosen else None
