"""DDPMScheduler: the ancestral sampler of Ho et al. 2020, as diffusers' class of that name."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..ops import PREDICTION_TYPES, ddpm_coefs, sampler_step
from ..reference.sampler_step import C_N
from ._spacing import spaced_timesteps
from .base import (
    CoefTable,
    Generator,
    SchedulerBase,
    SchedulerOutput,
    TIMESTEP_SPACINGS,
    check_choice,
    per_sample_index,
    register_to_config,
    rows_from,
    threshold_sample,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


class TimestepTableMixin:
    """Timestep-space schedulers (DDPM, DDIM): tables have one row per training
    timestep, so a step reads row ``t`` directly -- no search for t's position,
    and a device tensor ``t`` (or per-sample (B,) timesteps) is used as the
    op's index without any host sync."""

    def _row_for(self, timestep, sample: torch.Tensor):
        """Row ``t`` of a timestep table: a host int (Python numbers, CPU scalars and
        elements of ``self.timesteps`` -- ``for t in scheduler.timesteps`` -- read without
        a device sync), else a (B,) index on the sample's device."""
        T = self.config.num_train_timesteps
        if isinstance(timestep, torch.Tensor):
            host = self._host_timestep(timestep)
            if host is not None:
                timestep = host
            elif timestep.numel() == 1 and timestep.device.type == "cpu":
                timestep = int(timestep)
            else:
                return per_sample_index(timestep, sample.shape[0], sample.device)
        t = int(timestep)
        if not 0 <= t < T:
            raise ValueError(f"{type(self).__name__}.step: timestep must be in [0, {T}), got {timestep}")
        return t

    def _set_timesteps_tensor(self, ts: np.ndarray, device) -> None:
        """``self.timesteps`` on ``device``, with a host copy of its values."""
        self.timesteps = torch.from_numpy(ts).to(device)
        # an inference-mode tensor has no version counter: no host reads then
        self._timesteps_seen = (None if self.timesteps.is_inference() else
                                (self.timesteps, self.timesteps._version, ts.tolist()))

    def _host_timestep(self, t: torch.Tensor) -> Optional[int]:
        """The value of ``t`` without reading the device, when ``t`` is one element of
        ``self.timesteps`` (a view: ``scheduler.timesteps[i]``, or it expanded over a
        batch) and ``self.timesteps`` was not modified in place since it was built; else
        None.  The element is found from the view's storage offset."""
        seen = getattr(self, "_timesteps_seen", None)
        if seen is None or t.device.type == "cpu":
            return None
        ts, version, values = seen
        if (ts is not self.timesteps or ts._version != version or t.dtype != ts.dtype
                or any(st != 0 for st, n in zip(t.stride(), t.shape) if n != 1)
                or t.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr()):
            return None
        pos, rem = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0))
        if rem or not 0 <= pos < len(values):
            return None
        return values[pos]

    @staticmethod
    def _any_positive(row) -> bool:
        """Whether some timestep is > 0 (diffusers draws noise only then).  A host
        read: free for ints, one device sync for a device index tensor."""
        return row > 0 if isinstance(row, int) else bool((row > 0).any())

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε with per-sample t, one fused pass
        (diffusers' ``add_noise``); no host sync."""
        index = per_sample_index(torch.as_tensor(timesteps), original_samples.shape[0],
                                 original_samples.device)
        return self._fused(self._forward_table(), index, original_samples, None, noise=noise,
                           return_x0=False)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x_0 (diffusers' ``get_velocity``),
        one fused pass."""
        index = per_sample_index(torch.as_tensor(timesteps), sample.shape[0], sample.device)
        return self._fused(self._velocity_table(), index, sample, None, noise=noise, return_x0=False)

    def _forward_table(self) -> CoefTable:
        if getattr(self, "_forward", None) is None:
            ab = self.alphas_cumprod.double()
            self._forward = CoefTable(rows_from(C_X=ab.sqrt(), C_N=(1 - ab).sqrt()))
        return self._forward

    def _velocity_table(self) -> CoefTable:
        if getattr(self, "_velocity", None) is None:
            ab = self.alphas_cumprod.double()
            self._velocity = CoefTable(rows_from(C_X=-(1 - ab).sqrt(), C_N=ab.sqrt()))
        return self._velocity

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: timestep-space models take x_t unscaled."""
        return sample


class DDPMScheduler(TimestepTableMixin, SchedulerBase):
    """Drop-in for ``diffusers.DDPMScheduler``: same constructor, config, methods and numbers.

    Each ``step`` is one fused ``fastdiff.ops.sampler_step`` pass reading row t
    of a (num_train_timesteps, 9) table built in ``set_timesteps`` (x0 from the
    model output, clipping, the posterior mean of Ho et al. eq. 7 and the noise
    term together).  ``timestep`` may be an int, a 0-d tensor, or a (B,)
    tensor of per-sample timesteps (diffusers takes a scalar only).

    Noise: with ``generator`` (a ``torch.Generator`` or a list, one per
    sample) it is drawn exactly like diffusers' ``randn_tensor``, only when
    t > 0, so seeded runs match diffusers.  Deciding "t > 0" reads t on the
    host: free for ints and CPU tensors, one device sync per step for an
    accelerator-tensor timestep.  Without a generator the noise is drawn
    inside the kernel (Philox, see :meth:`manual_seed`): no sync at all, and
    a different stream from diffusers' unseeded ``torch.randn``.

    ``thresholding``: a first fused pass forms x0, dynamic thresholding runs in
    plain torch, a second pass finishes the step from the thresholded x0.

    Differences from diffusers: ``variance_type="fixed_large_log"`` is rejected
    (diffusers returns log β there and then takes its square root: NaN);
    ``learned`` / ``learned_range`` add their per-element noise scale in torch
    after the fused pass (it is not a per-sample constant); an unknown
    ``beta_schedule`` raises ValueError instead of NotImplementedError.
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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        name = type(self).__name__
        check_choice(name, "variance_type", variance_type, VARIANCE_TYPES)
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self._make_betas()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.variance_type = variance_type
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1].copy(), None, chain=False)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        """The inference timesteps (``timestep_spacing``, or custom descending
        ``timesteps``) and their coefficient table, built on ``device``."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if any(timesteps[i] >= timesteps[i - 1] for i in range(1, len(timesteps))):
                raise ValueError("set_timesteps: timesteps must be in descending order")
            if timesteps[0] >= T or timesteps[-1] < 0:
                raise ValueError(f"set_timesteps: timesteps must lie in [0, {T})")
            ts = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if not isinstance(num_inference_steps, int) or not 0 < num_inference_steps <= T:
                raise ValueError(
                    f"set_timesteps: num_inference_steps must be an int in [1, {T}] "
                    f"(num_train_timesteps), got {num_inference_steps!r}"
                )
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            ts = spaced_timesteps(type(self).__name__, self.config.timestep_spacing, T,
                                  num_inference_steps, self.config.steps_offset, np.int64)
        self._set_schedule(ts, device, chain=True)

    def _set_schedule(self, ts: np.ndarray, device, chain: bool) -> None:
        """Build the per-timestep table: row t steps from t to its successor in
        ``ts`` (``chain``) or to t - 1 (before set_timesteps, as diffusers)."""
        self._set_timesteps_tensor(ts, device)
        T = self.config.num_train_timesteps
        prev = torch.arange(T, dtype=torch.int64) - 1
        if chain:
            t = torch.from_numpy(ts)
            prev[t] = torch.cat([t[1:], t.new_full((1,), -1)])
        ab = self.alphas_cumprod.double()
        ab_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], torch.ones((), dtype=torch.float64))
        fixed = self.variance_type if self.variance_type.startswith("fixed") else "fixed_small"
        rows = ddpm_coefs(ab, ab_prev, torch.arange(T) > 0,
                          prediction_type=self.config.prediction_type, variance_type=fixed)
        if self.variance_type.startswith("learned"):
            # min_log / max_log of diffusers' learned_range, per timestep
            beta = 1 - ab / ab_prev
            small = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
            self._log_range = torch.stack([small.log(), beta.log()], dim=1).float()
            rows[:, C_N] = 0.0
        self._table = CoefTable(rows)
        self._x0_table = self._table.x0_rows() if self.config.thresholding else None
        self._given_table = self._table.x0_given_rows() if self.config.thresholding else None
        if device is not None:
            self._table.on(torch.device(device), torch.float32)

    def previous_timestep(self, timestep):
        """The timestep the chain steps to from ``timestep`` (-1 past the end), as diffusers."""
        if self.custom_timesteps or self.num_inference_steps:
            ts = self.timesteps.tolist()
            i = ts.index(int(timestep))
            return torch.tensor(ts[i + 1] if i + 1 < len(ts) else -1)
        return timestep - 1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> Union[SchedulerOutput, tuple]:
        """x_{t-1} from the model output at t (diffusers' ``DDPMScheduler.step``).

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` or, with
        ``return_dict=False``, the tuple ``(prev_sample, pred_original_sample)``.
        """
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type.startswith("learned"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        elif self.variance_type.startswith("learned"):
            raise ValueError(
                f"DDPMScheduler.step: variance_type={self.variance_type!r} needs a model output with "
                f"2 x {sample.shape[1]} channels (the prediction and the variance), "
                f"got {model_output.shape[1]}"
            )
        row = self._row_for(timestep, sample)
        noise = {}
        if generator is None or self._any_positive(row):
            noise = self._noise_kwargs(sample, generator, model_output.dtype)
        learned = predicted_variance is not None
        fused_noise = {} if learned else noise
        cfg = self.config
        if cfg.thresholding:
            x0 = self._fused(self._x0_table, row, sample, model_output, return_x0=False)
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            prev, x0 = self._fused(self._given_table, row, sample, x0, prev=model_output, **fused_noise)
        else:
            clip = (-cfg.clip_sample_range, cfg.clip_sample_range) if cfg.clip_sample else None
            prev, x0 = self._fused(self._table, row, sample, model_output, clip_range=clip, **fused_noise)
        if learned and noise:
            prev = prev + self._learned_noise(row, sample, predicted_variance, noise)
        self._after_noise(noise)
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _learned_noise(self, row, sample, predicted_variance, noise) -> torch.Tensor:
        """std z for the learned variance types (per element, zero at t = 0)."""
        z = noise.get("noise")
        if z is None:  # materialise the in-kernel Philox noise: out = 1 * n
            unit = torch.zeros(1, 9, dtype=torch.float32, device=sample.device)
            unit[0, C_N] = 1.0
            z = sampler_step(sample, None, unit, seed=noise["seed"])
        if self._log_range.device != sample.device:
            self._log_range = self._log_range.to(sample.device)
        log_range = self._log_range
        if isinstance(row, int):
            lo, hi, positive = log_range[row, 0], log_range[row, 1], float(row > 0)
        else:
            shape = (-1,) + (1,) * (sample.dim() - 1)
            lo, hi = log_range[row, 0].view(shape), log_range[row, 1].view(shape)
            positive = (row > 0).view(shape).to(sample.dtype)
        if self.variance_type == "learned":
            std = predicted_variance**0.5
        else:
            frac = (predicted_variance + 1) / 2
            std = torch.exp(0.5 * (frac * hi + (1 - frac) * lo))
        return positive * std * z
