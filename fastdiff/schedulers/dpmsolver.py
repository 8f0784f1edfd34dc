"""DPMSolverMultistepScheduler: DPM-Solver++ (Lu et al. 2022), as diffusers' class of that name."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..ops import PREDICTION_TYPES
from ._spacing import convert_sigmas, sigma_schedule, sigma_to_t, train_sigmas
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
    threshold_sample,
)
from .euler import FINAL_SIGMAS_TYPES

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def _alpha_sigma_lambda(sigma: torch.Tensor):
    """VP α_t, σ_t and λ_t = log α_t - log σ_t of a VE σ (λ = +inf at σ = 0)."""
    alpha = 1 / (sigma**2 + 1).sqrt()
    sigma_vp = sigma * alpha
    return alpha, sigma_vp, alpha.log() - sigma_vp.log()


def dpm_solver_rows(sigmas: torch.Tensor, order: int, prediction_type: str, algorithm_type: str,
                    solver_type: str) -> torch.Tensor:
    """float64 rows of diffusers' DPM-Solver++ updates; row i steps σ_i -> σ_{i+1}.

    The model output is converted to x0 at σ_i in the op (a_x, a_m); the update
    is linear in x, x0 (m0), the previous x0 (m1, ``prev``) and the one before
    (m2, ``prev2``), plus noise for ``sde-dpmsolver++``.  The coefficients of
    diffusers' D0, D1 (and D2) are expanded on (m0, m1, m2).  Where the order
    asked for is undefined (no history, or σ_{i+1} = 0), the row is first order.
    """
    s = sigmas.double()
    s0, st = s[:-1], s[1:]
    s1 = torch.cat([s0[:1], s0[:-1]])
    s2 = torch.cat([s1[:1], s1[:-1]])
    a_0, sv_0, l_0 = _alpha_sigma_lambda(s0)
    a_t, sv_t, l_t = _alpha_sigma_lambda(st)
    h = l_t - l_0
    sde = algorithm_type == "sde-dpmsolver++"
    if prediction_type == "epsilon":
        x0_cols = {"A_X": 1 / a_0, "A_M": -s0}
    elif prediction_type == "v_prediction":
        x0_cols = {"A_X": a_0, "A_M": -sv_0}
    else:
        x0_cols = {"A_M": torch.ones_like(s0)}
    ratio = sv_t / sv_0
    if sde:
        phi = torch.expm1(-2.0 * h)  # e^{-2h} - 1
        c_x, c_d0 = ratio * torch.exp(-h), -a_t * phi
        extra = {"C_N": sv_t * (-phi).sqrt()}
    else:
        phi = torch.expm1(-h)
        c_x, c_d0 = ratio, -a_t * phi
        extra = {}
    first = rows_from(**x0_cols, C_X=c_x, C_0=c_d0, **extra)
    if order == 1:
        return first
    l_1 = _alpha_sigma_lambda(s1)[2]
    r0 = (l_0 - l_1) / h
    d1_0 = torch.stack([1 / r0, -1 / r0, torch.zeros_like(r0)])  # coefficients on (m0, m1, m2)
    if order == 2:
        d1, d2 = d1_0, torch.zeros_like(d1_0)
        if solver_type == "midpoint":
            c_d1 = 0.5 * c_d0
        else:
            c_d1 = a_t * (phi / (2.0 * h) + 1.0) if sde else a_t * (phi / h + 1.0)
        c_d2 = torch.zeros_like(c_d1)
    else:
        r1 = (l_1 - _alpha_sigma_lambda(s2)[2]) / h
        d1_1 = torch.stack([torch.zeros_like(r1), 1 / r1, -1 / r1])
        diff = d1_0 - d1_1
        d1 = d1_0 + r0 / (r0 + r1) * diff
        d2 = diff / (r0 + r1)
        if sde:
            c_d1 = a_t * (phi / (2.0 * h) + 1.0)
            c_d2 = a_t * ((-phi - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        else:
            c_d1 = a_t * (phi / h + 1.0)
            c_d2 = -a_t * ((phi + h) / h**2 - 0.5)
    m = c_d1 * d1 + c_d2 * d2
    rows = rows_from(**x0_cols, C_X=c_x, C_0=c_d0 + m[0], C_P=m[1], C_Q=m[2], **extra)
    defined = rows.isfinite().all(dim=1, keepdim=True)
    return torch.where(defined, rows, first)


class DPMSolverMultistepScheduler(SchedulerBase):
    """Drop-in for ``diffusers.DPMSolverMultistepScheduler`` (``dpmsolver++`` and
    ``sde-dpmsolver++``, ``solver_order`` 1-3, ``midpoint`` / ``heun``).

    Each ``step`` is one fused ``sampler_step`` pass: the model output becomes
    x0 at σ_i inside the op, and the multistep update reads the previous x0
    predictions through ``prev`` / ``prev2`` (kept as tensors in
    ``model_outputs``, as diffusers).  Which order runs (warm-up,
    ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type``) is decided
    on the host exactly like diffusers; one table per order is built in
    ``set_timesteps``.  ``thresholding``: a first pass forms x0, dynamic
    thresholding runs in torch, a second pass finishes the step.

    Noise (``sde-dpmsolver++`` only): ``variance_noise`` if given; with
    ``generator`` drawn exactly like diffusers' ``randn_tensor`` (float32);
    else inside the kernel (Philox, :meth:`manual_seed`).  No host sync in
    ``step`` (except the first step's lookup of an accelerator-tensor timestep
    without ``set_begin_index``, as diffusers).

    Differences from diffusers: ``dpmsolver`` / ``sde-dpmsolver`` (deprecated
    there), flow matching (``use_flow_sigmas``, ``flow_prediction``,
    ``use_dynamic_shifting``) are rejected with ValueError; the whole update
    runs in fp32 for half-precision inputs (diffusers forms x0 in the input
    precision); ``step`` also returns ``pred_original_sample`` (the x0 it used)
    in the output object, while ``return_dict=False`` gives ``(prev_sample,)``
    as diffusers.
    """

    order = 1
    _missing_timestep_is_last = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        name = type(self).__name__
        check_choice(name, "solver_order", solver_order, (1, 2, 3))
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice(name, "solver_type", solver_type, SOLVER_TYPES)
        check_choice(name, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice(name, "variance_type", variance_type, (None, "learned", "learned_range"))
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        for flag in ("use_flow_sigmas", "use_dynamic_shifting"):
            if self.config[flag]:
                raise ValueError(f"{name}: {flag}=True (flow matching) is not supported by fastdiff; "
                                 f"valid: False")
        sigma_schedule(name, self.config)
        self._make_betas()
        if rescale_betas_zero_snr:
            # ᾱ_T = 0 would make σ_T infinite; diffusers uses 2^-24 there
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)
        self._set_timesteps_host(torch.from_numpy(timesteps[::-1].copy()), None)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._tables: dict = {}
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      mu: Optional[float] = None, timesteps: Optional[Sequence[int]] = None) -> None:
        """Timesteps and σ as diffusers (spacing, ``lambda_min_clipped``, Karras /
        exponential / beta σ, Lu's λ, ``final_sigmas_type``; or custom
        ``timesteps``), and one table per solver order on ``device``."""
        cfg = self.config
        name = type(self).__name__
        kind = sigma_schedule(name, cfg)
        if mu is not None:
            raise ValueError("set_timesteps: mu (dynamic shifting) is not supported by fastdiff")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (kind is not None or cfg.use_lu_lambdas):
            raise ValueError("set_timesteps: timesteps cannot be set with use_karras_sigmas, "
                             "use_exponential_sigmas, use_beta_sigmas or use_lu_lambdas")
        T = cfg.num_train_timesteps
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"set_timesteps: num_inference_steps must be a positive int, "
                                 f"got {num_inference_steps!r}")
            n = num_inference_steps
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last = int(T - clipped_idx)
            check_choice(name, "timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
            if cfg.timestep_spacing == "linspace":
                ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif cfg.timestep_spacing == "leading":
                ratio = last // (n + 1)
                ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
                ts += cfg.steps_offset
            else:
                ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
        full = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(full)
        if kind == "karras" or cfg.use_lu_lambdas:
            if kind == "karras":
                sigmas = convert_sigmas("karras", np.flip(full).copy(), num_inference_steps)
            else:
                lambdas = np.flip(log_sigmas.copy())
                lam_min, lam_max = lambdas[-1].item(), lambdas[0].item()
                ramp = np.linspace(0, 1, num_inference_steps)
                sigmas = np.exp(lam_max + ramp * (lam_min - lam_max))
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif kind is not None:
            sigmas = convert_sigmas(kind, np.flip(full).copy(), num_inference_steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        else:
            sigmas = np.interp(ts, np.arange(0, len(full)), full)
        sigma_last = full[0] if cfg.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self._set_timesteps_host(torch.from_numpy(ts).to(torch.int64), device)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._tables = {}
        for order in range(1, cfg.solver_order + 1):
            table = self._table(order)
            if device is not None:
                table.on(torch.device(device), torch.float32)

    def _table(self, order: int) -> CoefTable:
        if order not in self._tables:
            cfg = self.config
            self._tables[order] = CoefTable(dpm_solver_rows(
                self.sigmas, order, cfg.prediction_type, cfg.algorithm_type, cfg.solver_type))
        return self._tables[order]

    def _thresholded(self, order: int):
        """(x0 rows, x0-given rows) of an order's table, for dynamic thresholding."""
        key = ("thresholded", order)
        if key not in self._tables:
            table = self._table(order)
            self._tables[key] = (table.x0_rows(), table.x0_given_rows())
        return self._tables[key]

    def _order_now(self) -> int:
        """The order diffusers' ``step`` would use at this step (host-side state only)."""
        cfg = self.config
        i, n = self._step_index, len(self._timesteps_host)
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        lower_second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            return 2
        return 3

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Generator = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[SchedulerOutput, tuple]:
        """x at σ_{i+1} (diffusers' ``DPMSolverMultistepScheduler.step``).

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)`` or, with
        ``return_dict=False``, ``(prev_sample,)`` as diffusers.
        """
        if self.num_inference_steps is None:
            raise ValueError("DPMSolverMultistepScheduler.step: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        if cfg.variance_type is not None and cfg.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        order = self._order_now()
        noise = {}
        if cfg.algorithm_type == "sde-dpmsolver++":
            noise = ({"noise": variance_noise.to(device=sample.device, dtype=torch.float32)}
                     if variance_noise is not None
                     else self._noise_kwargs(sample, generator, torch.float32))
        history = {"prev": self.model_outputs[-1] if order >= 2 else None,
                   "prev2": self.model_outputs[-2] if order == 3 else None}
        i = self._step_index
        if cfg.thresholding:
            x0_table, given_table = self._thresholded(order)
            x0 = self._fused(x0_table, i, sample, model_output, return_x0=False)
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            prev, x0 = self._fused(given_table, i, sample, x0, **history, **noise)
        else:
            prev, x0 = self._fused(self._table(order), i, sample, model_output, **history, **noise)
        self._after_noise(noise)
        self.model_outputs = self.model_outputs[1:] + [x0]
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The identity (the model takes x_t unscaled)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """α_t x0 + σ_t ε at the σ of each timestep, looked up like diffusers
        (timestep value, or begin / step index when set); one fused pass."""
        device = original_samples.device
        index = self._step_indices(torch.as_tensor(timesteps), device)
        index = per_sample_index(index, original_samples.shape[0], device)
        if "noising" not in self._tables:
            alpha, sigma_vp, _ = _alpha_sigma_lambda(self.sigmas.double())
            self._tables["noising"] = CoefTable(rows_from(C_X=alpha, C_N=sigma_vp))
        return self._fused(self._tables["noising"], index, original_samples, None, noise=noise,
                           return_x0=False)
