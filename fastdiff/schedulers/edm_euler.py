"""EDMEulerScheduler: Euler steps with EDM preconditioning (Karras et al. 2022), as
diffusers' class of that name."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..ops import euler_coefs
from ..reference.sampler_step import A_M, A_X
from .base import Generator, SchedulerBase, SchedulerOutput, check_choice, register_to_config
from .euler import FINAL_SIGMAS_TYPES, SigmaSchedulerMixin, churn_table


class EDMEulerScheduler(SigmaSchedulerMixin, SchedulerBase):
    """Drop-in for ``diffusers.EDMEulerScheduler``: same constructor, config, methods and numbers.

    Each ``step`` is one fused ``sampler_step`` pass reading row ``step_index``
    of a table: churn noise (added before x0 is formed, through the op's a_n),
    the EDM denoiser D = c_skip(σ̂) x + c_out(σ̂) F (``precondition_outputs``),
    and the Euler step to σ_{i+1}.  One table per (s_churn, s_tmin, s_tmax,
    s_noise) in use.  Passing ``pred_original_sample`` uses it as D instead
    (a table with a_x = 0, a_m = 1).

    Noise (steps with γ > 0 only): with ``generator`` drawn exactly like
    diffusers' ``randn_tensor``, else in the kernel (Philox,
    :meth:`manual_seed`).  No host sync in ``step`` (except the first step's
    lookup of an accelerator-tensor timestep without ``set_begin_index``, as
    diffusers).  Difference from diffusers: fp16/bf16 ``pred_original_sample``
    comes back in the sample's dtype.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        name = type(self).__name__
        check_choice(name, "sigma_schedule", sigma_schedule, ("karras", "exponential"))
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        self.num_inference_steps = None
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self._set_sigmas(ramp, None)
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> float:
        """sqrt(σ_max² + 1)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _set_sigmas(self, ramp: torch.Tensor, device) -> None:
        sigmas = (self._compute_karras_sigmas(ramp) if self.config.sigma_schedule == "karras"
                  else self._compute_exponential_sigmas(ramp)).to(torch.float32)
        self._set_timesteps_host(self.precondition_noise(sigmas), device)
        sigma_last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.cat([sigmas, torch.full((1,), float(sigma_last))])
        self._tables = {}
        self._step_index = None
        self._begin_index = None
        if device is not None:
            self._table_for(0.0, 0.0, float("inf"), 1.0)[0].on(torch.device(device), torch.float32)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[Union[torch.Tensor, Sequence[float]]] = None) -> None:
        """σ from the ``sigma_schedule`` over a ramp in [0, 1] (``sigmas`` is that
        ramp when given, as diffusers), and the default step table on ``device``."""
        if sigmas is None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"set_timesteps: num_inference_steps must be a positive int, "
                                 f"got {num_inference_steps!r}")
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas).to(torch.float64).reshape(-1)
        self.num_inference_steps = num_inference_steps
        self._set_sigmas(ramp, device)

    def _compute_karras_sigmas(self, ramp: torch.Tensor, sigma_min: Optional[float] = None,
                               sigma_max: Optional[float] = None) -> torch.Tensor:
        """Karras et al. eq. 5 over ``ramp`` (0 -> sigma_max, 1 -> sigma_min)."""
        sigma_min = sigma_min or self.config.sigma_min
        sigma_max = sigma_max or self.config.sigma_max
        rho = self.config.rho
        min_inv_rho = sigma_min ** (1 / rho)
        max_inv_rho = sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _compute_exponential_sigmas(self, ramp: torch.Tensor, sigma_min: Optional[float] = None,
                                    sigma_max: Optional[float] = None) -> torch.Tensor:
        """len(ramp) σ equally spaced in log σ, descending."""
        sigma_min = sigma_min or self.config.sigma_min
        sigma_max = sigma_max or self.config.sigma_max
        return torch.linspace(math.log(sigma_min), math.log(sigma_max), len(ramp)).exp().flip(0)

    def _get_conditioning_c_in(self, sigma):
        return 1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5)

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """c_in(σ) x = x / sqrt(σ² + σ_data²)."""
        return sample * self._get_conditioning_c_in(sigma)

    def precondition_noise(self, sigma) -> torch.Tensor:
        """c_noise(σ) = log(σ) / 4 (the model's timestep input)."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def _c_skip_out(self, sigma):
        sd = self.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        return c_skip, (c_out if self.config.prediction_type == "epsilon" else -c_out)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """D = c_skip(σ) x + c_out(σ) F (plain torch; ``step`` fuses the same math)."""
        c_skip, c_out = self._c_skip_out(sigma)
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """c_in(σ_i) x at the current step (diffusers' ``scale_model_input``)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[self._step_index])

    def _table_for(self, s_churn, s_tmin, s_tmax, s_noise, x0_given: bool = False):
        """(table, noisy steps) for the churn arguments; row i steps σ_i -> σ_{i+1}."""
        key = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise), x0_given)
        if key not in self._tables:
            def rows_at(sigma, sigma_hat, sigma_next):
                # "sample" rows read D from the model-output slot (x0_given); else D = c_skip x + c_out F
                rows = euler_coefs(sigma_hat, sigma_next, prediction_type="sample")
                if not x0_given:
                    rows[:, A_X], rows[:, A_M] = self._c_skip_out(sigma_hat)
                return rows

            self._tables[key] = churn_table(self.sigmas, s_churn, s_tmin, s_tmax, s_noise, rows_at)
        return self._tables[key]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generator = None,
        return_dict: bool = True,
        pred_original_sample: Optional[torch.Tensor] = None,
    ) -> Union[SchedulerOutput, tuple]:
        """x at σ_{i+1} (diffusers' ``EDMEulerScheduler.step``).

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` or, with
        ``return_dict=False``, ``(prev_sample, pred_original_sample)``.
        """
        given = pred_original_sample is not None
        return self._churn_step(timestep, sample, pred_original_sample if given else model_output,
                                model_output.dtype, (s_churn, s_tmin, s_tmax, s_noise, given),
                                generator, return_dict)
