"""EulerDiscreteScheduler: Euler steps in σ space (Karras et al. 2022, Algorithm 2 without
the Heun correction), as diffusers' class of that name."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..ops import PREDICTION_TYPES, euler_coefs, sigma_x0_coefs
from ..reference.sampler_step import A_M, A_N, A_X, C_N, C_X
from ._spacing import convert_sigmas, sigma_schedule, sigma_to_t, spaced_timesteps, train_sigmas
from .base import (
    TIMESTEP_SPACINGS,
    CoefTable,
    Generator,
    SchedulerBase,
    SchedulerOutput,
    check_choice,
    per_sample_index,
    register_to_config,
    rows_from,
)

logger = logging.getLogger("fastdiff.schedulers")

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def churn_gammas(sigmas: torch.Tensor, s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """EDM's γ_i of each step (diffusers' rule: min(s_churn / (len(sigmas) - 1), √2 - 1)
    where s_tmin <= σ_i <= s_tmax, else 0), on the host."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1)
    return [gamma if s_tmin <= s <= s_tmax else 0.0 for s in sigmas[:-1].tolist()]


def with_churn(rows: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor,
               s_noise: float) -> torch.Tensor:
    """Rows for x' = x + s_noise sqrt(σ̂² - σ²) n substituted for x (EDM churn in one pass):
    a_n += k a_x and c_n += k c_x, with k the churn noise scale."""
    k = s_noise * (sigma_hat**2 - sigma**2).clamp(min=0).sqrt()
    rows = rows.clone()
    rows[:, A_N] += k * rows[:, A_X]
    rows[:, C_N] += k * rows[:, C_X]
    return rows


def churn_table(sigmas: torch.Tensor, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
                rows_at) -> tuple[CoefTable, list[bool]]:
    """(table, noisy steps) of an Euler-type step with EDM churn: ``rows_at(σ, σ̂, σ_next)``
    (float64 (T,) each) gives the rows of the step from σ̂ to σ_next before the churn;
    row i of the table steps σ_i -> σ_{i+1} with the churn noise folded in."""
    sigma = sigmas[:-1].double()
    gammas = churn_gammas(sigmas, s_churn, s_tmin, s_tmax)
    sigma_hat = (sigmas[:-1] * (torch.tensor(gammas) + 1)).double()
    rows = rows_at(sigma, sigma_hat, sigmas[1:].double())
    return CoefTable(with_churn(rows, sigma, sigma_hat, s_noise)), [g > 0 for g in gammas]


class SigmaSchedulerMixin:
    """σ-space schedulers (Euler, Heun, EDM Euler): the model takes x / sqrt(σ²+1),
    the step index advances per step (diffusers' ``_step_index``), and tables
    are indexed by it -- a step is a host-int row slice, no device sync."""

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(σ² + 1) at the current step (diffusers' ``scale_model_input``)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    @property
    def init_noise_sigma(self):
        """The std of the initial noise: σ_max (``linspace`` / ``trailing``) or sqrt(σ_max² + 1)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + σ ε, σ looked up like diffusers (by timestep value, or the
        begin / step index when set), one fused pass.  Looking up timestep
        values reads them on the host (one sync for accelerator tensors, as diffusers)."""
        index = self._step_indices(torch.as_tensor(timesteps), original_samples.device)
        index = per_sample_index(index, original_samples.shape[0], original_samples.device)
        return self._fused(self._noising_table(), index, original_samples, None, noise=noise,
                           return_x0=False)

    def _churn_step(self, timestep, sample: torch.Tensor, model_input: torch.Tensor,
                    noise_dtype: torch.dtype, table_args: tuple, generator: Generator,
                    return_dict: bool):
        """The body of the Euler-type ``step`` (EulerDiscrete, EDMEuler): one fused
        pass on row ``step_index`` of the churn table ``self._table_for(*table_args)``,
        noise drawn only on the steps where diffusers draws it."""
        name = type(self).__name__
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                f"{name}.step: timestep must be one of scheduler.timesteps, not an "
                "integer index (e.g. from enumerate(timesteps))"
            )
        if not self.is_scale_input_called:
            logger.warning(f"{name}: call scale_model_input before step "
                           "to scale the model input correctly")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        table, noisy = self._table_for(*table_args)
        noise = self._noise_kwargs(sample, generator, noise_dtype) if noisy[i] else {}
        prev, x0 = self._fused(table, i, sample, model_input, **noise)
        self._after_noise(noise)
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _noising_table(self) -> CoefTable:
        """Row i: x0 + σ_i ε (kept until the next set_timesteps)."""
        if "noising" not in self._tables:
            sigma = self.sigmas.double()
            self._tables["noising"] = CoefTable(rows_from(C_X=torch.ones_like(sigma), C_N=sigma))
        return self._tables["noising"]


class EulerDiscreteScheduler(SigmaSchedulerMixin, SchedulerBase):
    """Drop-in for ``diffusers.EulerDiscreteScheduler``: same constructor, config, methods and numbers.

    Each ``step`` is one fused ``sampler_step`` pass reading row ``step_index``
    of a table built from ``sigmas``: churn (``s_churn`` > 0 adds
    s_noise sqrt(σ̂² - σ²) z to the sample *before* x0 is formed -- the op's
    a_n column carries that into x0, c_n into the update), x0 from the model
    output (ε: x' - σ̂ m; v: diffusers' form at σ), and the Euler step to
    σ_{i+1}.  One table is built (and kept) per (s_churn, s_tmin, s_tmax,
    s_noise) in use.

    Noise (only on steps where γ > 0, decided on the host from the CPU
    ``sigmas`` as diffusers): with ``generator`` drawn exactly like diffusers'
    ``randn_tensor``, else inside the kernel (Philox, :meth:`manual_seed`).
    Host syncs: none in ``step``, except the first step's lookup of an
    accelerator-tensor timestep in ``timesteps`` when ``set_begin_index`` was
    not called (diffusers syncs there too).

    Differences from diffusers: the update is computed as x + dt m for ε
    prediction (no cancellation in (x - x0)/σ at large σ); fp16/bf16 samples
    are computed in fp32 like diffusers but ``pred_original_sample`` comes back
    in the sample's dtype (diffusers: fp32); an unknown ``beta_schedule``
    raises ValueError.
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
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice(name, "timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        sigma_schedule(name, self.config)
        self._make_betas()
        if rescale_betas_zero_snr:
            # ᾱ_T = 0 would make σ_T infinite; diffusers uses 2^-24 there
            self.alphas_cumprod[-1] = 2**-24
        sigmas = torch.from_numpy(train_sigmas(self.alphas_cumprod)).flip(0)
        timesteps = torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        ).to(torch.float32)
        self.num_inference_steps = None
        if self._continuous_v():
            timesteps = 0.25 * sigmas.log()
        self._set_timesteps_host(timesteps, None)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._tables: dict = {}
        self._step_index = None
        self._begin_index = None

    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
    ) -> None:
        """σ schedule and timesteps as diffusers (spacing, interpolation, Karras /
        exponential / beta σ, ``final_sigmas_type``; or custom ``timesteps`` or
        ``sigmas``), and the default step table on ``device``."""
        cfg = self.config
        name = type(self).__name__
        kind = sigma_schedule(name, cfg)
        if timesteps is not None and sigmas is not None:
            raise ValueError("set_timesteps: pass only one of timesteps or sigmas")
        given = [v is not None for v in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and kind is not None:
            raise ValueError(f"set_timesteps: timesteps cannot be set with use_{kind}_sigmas=True")
        if timesteps is not None and self._continuous_v():
            raise ValueError("set_timesteps: timesteps cannot be set with timestep_type='continuous' "
                             "and prediction_type='v_prediction'")
        T = cfg.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        elif not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"set_timesteps: num_inference_steps must be a positive int, "
                             f"got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        full = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(full)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
        else:
            if timesteps is not None:
                ts = np.array(timesteps).astype(np.float32)
            else:
                ts = spaced_timesteps(name, cfg.timestep_spacing, T, num_inference_steps,
                                      cfg.steps_offset, np.float32)
            if cfg.interpolation_type == "linear":
                sigmas = np.interp(ts, np.arange(0, len(full)), full)
            else:
                sigmas = torch.linspace(np.log(full[-1]), np.log(full[0]),
                                        num_inference_steps + 1).exp().numpy()
            if kind is not None:
                sigmas = convert_sigmas(kind, sigmas, num_inference_steps, cfg.sigma_min, cfg.sigma_max)
                ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            sigma_last = full[0] if cfg.final_sigmas_type == "sigma_min" else 0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas).to(torch.float32)
        if self._continuous_v():
            ts_t = 0.25 * sigmas[:-1].log()
        else:
            ts_t = torch.from_numpy(ts.astype(np.float32))
        self._set_timesteps_host(ts_t, device)
        self.sigmas = sigmas
        self._tables = {}
        self._step_index = None
        self._begin_index = None
        if device is not None:
            self._table_for(0.0, 0.0, float("inf"), 1.0)[0].on(torch.device(device), torch.float32)

    def _table_for(self, s_churn, s_tmin, s_tmax, s_noise):
        """(table, noisy steps) for the churn arguments; row i steps σ_i -> σ_{i+1}."""
        key = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        if key not in self._tables:
            pred = self.config.prediction_type

            def rows_at(sigma, sigma_hat, sigma_next):
                rows = euler_coefs(sigma_hat, sigma_next, prediction_type=pred)
                if pred == "v_prediction":  # diffusers forms x0 at σ, the step at σ̂
                    x0_cols = sigma_x0_coefs(sigma, pred)
                    rows[:, A_X], rows[:, A_M] = x0_cols["A_X"], x0_cols["A_M"]
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
    ) -> Union[SchedulerOutput, tuple]:
        """x at σ_{i+1} from the model output at σ_i (diffusers' ``EulerDiscreteScheduler.step``).

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` or, with
        ``return_dict=False``, ``(prev_sample, pred_original_sample)``.
        """
        return self._churn_step(timestep, sample, model_output, model_output.dtype,
                                (s_churn, s_tmin, s_tmax, s_noise), generator, return_dict)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 with ᾱ indexed by each timestep's *step index*
        -- diffusers' ``EulerDiscreteScheduler.get_velocity`` does exactly that, and
        this matches it.  One fused pass."""
        if isinstance(timesteps, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "EulerDiscreteScheduler.get_velocity: timesteps must be values of "
                "scheduler.timesteps, not integer indices"
            )
        idx = [self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1).cpu()]
        ab = self.alphas_cumprod.double()[idx]
        table = CoefTable(rows_from(C_X=-(1 - ab).sqrt(), C_N=ab.sqrt()))
        index = per_sample_index(torch.arange(len(idx), device=sample.device), sample.shape[0],
                                 sample.device)
        return self._fused(table, index, sample, None, noise=noise, return_x0=False)
