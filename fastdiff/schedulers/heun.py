"""HeunDiscreteScheduler: Heun's 2nd-order method in σ space (Karras et al. 2022,
Algorithm 1), as diffusers' class of that name."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..ops import PREDICTION_TYPES, euler_coefs, heun_coefs
from ._spacing import convert_sigmas, sigma_schedule, sigma_to_t, spaced_timesteps, train_sigmas
from .base import (
    TIMESTEP_SPACINGS,
    CoefTable,
    SchedulerBase,
    SchedulerOutput,
    check_choice,
    register_to_config,
)
from .euler import SigmaSchedulerMixin


class HeunDiscreteScheduler(SigmaSchedulerMixin, SchedulerBase):
    """Drop-in for ``diffusers.HeunDiscreteScheduler``: same constructor, config, methods and numbers.

    As diffusers, ``timesteps`` / ``sigmas`` repeat every interior level, and
    ``step`` alternates an Euler predictor (first order) and Heun's corrector
    (second order); each is one fused ``sampler_step`` pass.  The predictor
    keeps the sample x and its denoised D1 = x0 (clipped when ``clip_sample``)
    as tensors; the corrector reads them through the op's ``prev`` / ``prev2``
    inputs: x + dt/2 ((x - D1)/σ + (x_mid - D2)/σ_next) in one pass.  No host
    sync in ``step`` (except the first step's lookup of an accelerator-tensor
    timestep without ``set_begin_index``, as diffusers).

    Differences from diffusers: the first-order state is kept as ``sample`` and
    the denoised D1 (diffusers keeps ``prev_derivative``); an unknown
    ``beta_schedule`` raises ValueError.
    """

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        sigma_schedule(name, self.config)
        self._make_betas()
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        num_train_timesteps: Optional[int] = None,
        timesteps: Optional[Sequence[float]] = None,
    ) -> None:
        """σ schedule and (repeated) timesteps as diffusers, and the predictor /
        corrector tables on ``device``."""
        cfg = self.config
        name = type(self).__name__
        kind = sigma_schedule(name, cfg)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and kind is not None:
            raise ValueError(f"set_timesteps: timesteps cannot be set with use_{kind}_sigmas=True")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int)
                                                or num_inference_steps < 1):
            raise ValueError(f"set_timesteps: num_inference_steps must be a positive int, "
                             f"got {num_inference_steps!r}")
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps
        T = num_train_timesteps or cfg.num_train_timesteps
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.float32)
        else:
            ts = spaced_timesteps(name, cfg.timestep_spacing, T, num_inference_steps,
                                  cfg.steps_offset, np.float32)
        full = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(full)
        sigmas = np.interp(ts, np.arange(0, len(full)), full)
        if kind is not None:
            sigmas = convert_sigmas(kind, sigmas, num_inference_steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        ts_t = torch.from_numpy(ts)
        ts_t = torch.cat([ts_t[:1], ts_t[1:].repeat_interleave(2)]).to(torch.float32)
        self._set_timesteps_host(ts_t, device)
        self.sample = None
        self.dt = None
        self._denoised = None
        self._step_index = None
        self._begin_index = None
        self._build_tables(device)

    def _build_tables(self, device) -> None:
        """Predictor rows i: Euler σ_i -> σ_{i+1}; corrector rows i - 1: Heun
        over σ_{i-1} -> σ_i (x0 at σ_i), for steps i that run them."""
        s = self.sigmas.double()
        pred = self.config.prediction_type
        self._tables = {
            "predictor": CoefTable(euler_coefs(s[:-1], s[1:], prediction_type=pred,
                                               clip=self.config.clip_sample)),
            "corrector": CoefTable(heun_coefs(s[:-2], s[1:-1], prediction_type=pred)),
        }
        if device is not None:
            for table in self._tables.values():
                table.on(torch.device(device), torch.float32)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is an Euler predictor (diffusers' property)."""
        return self.dt is None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[SchedulerOutput, tuple]:
        """One half of a Heun step (diffusers' ``HeunDiscreteScheduler.step``).

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` or, with
        ``return_dict=False``, ``(prev_sample, pred_original_sample)``.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        cfg = self.config
        clip = (-cfg.clip_sample_range, cfg.clip_sample_range) if cfg.clip_sample else None
        if self.state_in_first_order:
            prev, x0 = self._fused(self._tables["predictor"], i, sample, model_output, clip_range=clip)
            self.dt = self.sigmas[i + 1] - self.sigmas[i]
            self.sample, self._denoised = sample, x0
        else:
            prev, x0 = self._fused(self._tables["corrector"], i - 1, sample, model_output,
                                   prev=self.sample, prev2=self._denoised, clip_range=clip)
            self.sample = self._denoised = self.dt = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
