"""DDIMScheduler: denoising diffusion implicit models (Song et al. 2021), as diffusers' class."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..ops import PREDICTION_TYPES, ddim_coefs
from ._spacing import spaced_timesteps
from .base import (
    TIMESTEP_SPACINGS,
    CoefTable,
    Generator,
    SchedulerBase,
    SchedulerOutput,
    check_choice,
    register_to_config,
    threshold_sample,
)
from .ddpm import TimestepTableMixin


class DDIMScheduler(TimestepTableMixin, SchedulerBase):
    """Drop-in for ``diffusers.DDIMScheduler``: same constructor, config, methods and numbers.

    Each ``step`` is one fused ``sampler_step`` pass reading row t of a
    (num_train_timesteps, 9) table: x0 and ε from the model output, clipping,
    ``use_clipped_model_output``, the DDIM update (Song et al. eq. 12) and the
    η-scaled noise.  The table depends on the step arguments ``eta`` and
    ``use_clipped_model_output``; one is built (and kept) per pair in use.
    ``timestep`` may be an int, a 0-d tensor or per-sample (B,) timesteps.

    Noise (η > 0 only, as diffusers): ``variance_noise`` if given; else with
    ``generator`` drawn exactly like diffusers' ``randn_tensor``; else inside
    the kernel (Philox, see :meth:`manual_seed`).  No host sync in ``step``.

    ``thresholding``: a first fused pass forms x0, dynamic thresholding runs
    in plain torch, a second pass finishes the step from it.  Differences from
    diffusers: an unknown ``beta_schedule`` raises ValueError (diffusers:
    NotImplementedError), and ``sigmoid`` / ``exp`` / ``laplace`` are accepted.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self._make_betas()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self._tables: dict = {}

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The inference timesteps (``timestep_spacing``) and the default (η = 0) table on ``device``."""
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 0 < num_inference_steps <= T:
            raise ValueError(
                f"set_timesteps: num_inference_steps must be an int in [1, {T}] "
                f"(num_train_timesteps), got {num_inference_steps!r}"
            )
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(type(self).__name__, self.config.timestep_spacing, T,
                              num_inference_steps, self.config.steps_offset, np.int64)
        self._set_timesteps_tensor(ts, device)
        self._tables = {}
        if device is not None:
            self._tables_for(0.0, False)[0].on(torch.device(device), torch.float32)

    def _tables_for(self, eta: float, use_clipped: bool):
        """(table, x0 table, x0-given table) of the step arguments; the last two
        only with thresholding.  Row t steps from t to t - T // num_inference_steps."""
        key = (float(eta), bool(use_clipped))
        if key not in self._tables:
            T = self.config.num_train_timesteps
            ab = self.alphas_cumprod.double()
            prev = torch.arange(T) - T // self.num_inference_steps
            final = self.final_alpha_cumprod.double()
            ab_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], final)
            table = CoefTable(ddim_coefs(ab, ab_prev, eta=float(eta),
                                         prediction_type=self.config.prediction_type,
                                         use_clipped_model_output=use_clipped))
            if self.config.thresholding:
                self._tables[key] = (table, table.x0_rows(), table.x0_given_rows())
            else:
                self._tables[key] = (table, None, None)
        return self._tables[key]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[SchedulerOutput, tuple]:
        """x at the previous inference timestep (diffusers' ``DDIMScheduler.step``).

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` or, with
        ``return_dict=False``, ``(prev_sample, pred_original_sample)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps before step")
        if eta < 0:
            raise ValueError(f"DDIMScheduler.step: eta must be >= 0, got {eta}")
        if variance_noise is not None and generator is not None:
            raise ValueError("DDIMScheduler.step: pass generator or variance_noise, not both")
        row = self._row_for(timestep, sample)
        table, x0_table, given_table = self._tables_for(eta, use_clipped_model_output)
        noise = {}
        if eta > 0:
            noise = ({"noise": variance_noise} if variance_noise is not None
                     else self._noise_kwargs(sample, generator, model_output.dtype))
        cfg = self.config
        if cfg.thresholding:
            x0 = self._fused(x0_table, row, sample, model_output, return_x0=False)
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            prev, x0 = self._fused(given_table, row, sample, x0, prev=model_output, **noise)
        else:
            clip = (-cfg.clip_sample_range, cfg.clip_sample_range) if cfg.clip_sample else None
            prev, x0 = self._fused(table, row, sample, model_output, clip_range=clip, **noise)
        self._after_noise(noise)
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
