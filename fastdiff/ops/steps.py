"""Sampler updates as coefficient rows for the one fused ``sampler_step`` pass.

Each ``*_coefs`` function maps schedule values (per-sample tensors of shape
(B,), or whole tables of shape (T,)) to coefficient rows (..., 9) in the
column order of :mod:`fastdiff.reference.sampler_step`.  Built for a whole
table once (a scheduler's ``set_timesteps``), a step costs one gather inside
the kernel (``index``); the ``*_step`` functions build rows for the batch and
launch the pass.  All of it stays on the device: no ``.item()``, no host sync.
``add_noise`` and the DDPM / DDIM steps with per-sample timesteps and the default
previous timestep (t - 1) make that whole table once per ᾱ tensor (kept while the
tensor lives unmodified), so a call is the index arithmetic and the pass.

Formulas are those of the reference implementations users compare with:
diffusers' DDPMScheduler / DDIMScheduler (timestep space) and k-diffusion's
samplers (σ space, ``model_output`` = the denoised image for
``prediction_type="sample"``).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional, Union

import torch

from ..reference import opmath_dtype
from ..reference.sampler_step import A_M, A_N, A_X, C_0, C_M, C_N, C_P, C_Q, C_X, NUM_COEFS
from .sampler_step import sampler_step

__all__ = [
    "PREDICTION_TYPES",
    "add_noise",
    "churn",
    "ddim_coefs",
    "ddim_step",
    "ddpm_coefs",
    "ddpm_step",
    "dpmpp_2m_coefs",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "euler_coefs",
    "euler_step",
    "heun_coefs",
    "heun_step",
    "sigma_x0_coefs",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

Scalar = Union[float, int, torch.Tensor]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
        )


def _coef_dtype(device: torch.device) -> torch.dtype:
    # Coefficient math is O(B) and runs in float64 where the device has it:
    # it costs nothing and keeps ratios of nearly equal ᾱ exact.
    return torch.float32 if device.type == "mps" else torch.float64


_COLUMNS = {"A_X": A_X, "A_M": A_M, "A_N": A_N, "C_X": C_X, "C_M": C_M, "C_0": C_0,
            "C_P": C_P, "C_Q": C_Q, "C_N": C_N}


def _rows(shape, like: torch.Tensor, **cols: torch.Tensor) -> torch.Tensor:
    """A zero (…, 9) table with the named columns (A_X=..., C_0=...) filled."""
    by_index = [None] * NUM_COEFS
    for name, value in cols.items():
        by_index[_COLUMNS[name]] = value
    shape = torch.Size(shape)
    if all(v is None or (isinstance(v, torch.Tensor) and v.shape == shape and v.dtype == like.dtype
                         and v.device == like.device) for v in by_index):
        # One stack instead of a zero table and a write per column (the
        # common case: every column computed at the table's shape).
        zero = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return torch.stack([zero if v is None else v for v in by_index], dim=-1)
    rows = torch.zeros(*shape, NUM_COEFS, dtype=like.dtype, device=like.device)
    for i, value in enumerate(by_index):
        if value is not None:
            rows[..., i] = value
    return rows


def _per_sample(name: str, v: Scalar, batch: int, device: torch.device) -> torch.Tensor:
    """A float or a 0-d / (B,) tensor as a (B,) tensor in the coefficient dtype."""
    dtype = _coef_dtype(device)
    if isinstance(v, torch.Tensor):
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
        return v.to(device=device, dtype=dtype).reshape(-1).expand(batch)
    if not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(v).__name__}")
    return torch.full((batch,), float(v), dtype=dtype, device=device)


def _timesteps(name: str, t, batch: int, device: torch.device) -> torch.Tensor:
    """An int or a 0-d / (B,) integer tensor as a (B,) int64 tensor."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if t.dtype == torch.int64 and t.device == device and t.shape == (batch,):
            return t  # already what the steps take (the usual per-sample tensor)
        return t.to(device=device, dtype=torch.int64).reshape(-1).expand(batch)
    if not isinstance(t, int):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    return torch.full((batch,), t, dtype=torch.int64, device=device)


def _clip_range(clip_sample_range: Optional[float]):
    return None if clip_sample_range is None else (-clip_sample_range, clip_sample_range)


# --------------------------------------------------------------------------
# One row for a step given as Python numbers (σ, or int timesteps and a CPU ᾱ table)
# --------------------------------------------------------------------------

class _Kept:
    """Device tensors made from Python numbers or from a tensor (an ᾱ table), kept for the
    next call that asks for the same thing; the least recently used are dropped past
    ``size``.  Keys are (what, device, opmath dtype[, source id, source version]); a
    sampling run that comes again costs one lookup per step."""

    def __init__(self, size: int):
        self.size = size
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, key: tuple, like: torch.Tensor, make,
            source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``make()``'s tensor for ``key``, kept unless it was made while a CUDA graph
        was being captured (graph-pool memory).  One made from ``source`` is kept for
        that tensor object as long as it lives unmodified (an inference-mode tensor has
        no version counter: nothing made from it is kept)."""
        keep = source is None or not source.is_inference()
        if source is not None and keep:
            key += (id(source), source._version)
        entry = self.entries.get(key) if keep else None
        if entry is not None and (entry[1] is None or entry[1]() is source):
            try:
                self.entries.move_to_end(key)
            except KeyError:  # dropped meanwhile by another thread
                pass
            return entry[0]
        made = make()
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return made
        if keep:
            self.entries[key] = (made, None if source is None else weakref.ref(source))
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return made


# (1, 9) rows of steps given as numbers: one per step of the schedules in use.
_ROWS = _Kept(4096)
# (T + 1, 9) tables of add_noise and of the per-sample DDPM / DDIM steps, and the (T + 1,)
# ᾱ tables those steps gather from: a few per ᾱ table in use, <= ~72 KB each for T = 1000.
_TABLES = _Kept(32)


def _kept_table(key: tuple, like: torch.Tensor, make, source: torch.Tensor) -> torch.Tensor:
    """``make()``'s table, kept in ``_TABLES`` while ``source`` (the ᾱ tensor it is made
    from) lives unmodified; made afresh under torch.compile, which traces it as device ops
    (the kept tables' bookkeeping would break the graph)."""
    if torch.compiler.is_compiling():
        return make()
    return _TABLES.get(key, like, make, source=source)


def _table_row(t: torch.Tensor) -> torch.Tensor:
    """The row of timesteps t in the (T + 1)-row tables: t + 1, and row 0 for any t < 0."""
    return t.clamp(min=-1) + 1


def _kept_alphas(alphas_cumprod: torch.Tensor, final, device: torch.device,
                 like: torch.Tensor) -> torch.Tensor:
    """The :func:`_alphas_from_minus_one` table, kept while ``alphas_cumprod`` lives
    unmodified (made afresh for a tensor ``final`` and under torch.compile)."""
    def make():
        return _alphas_from_minus_one(alphas_cumprod, final, device)

    if not _host_numbers(final):
        return make()
    return _kept_table(("alphas", float(final), device), like, make, alphas_cumprod)


def _host_numbers(*values) -> bool:
    """All plain Python numbers, and not under torch.compile (which traces the rows as
    device ops: the host rows' bookkeeping would break the graph)."""
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            and not torch.compiler.is_compiling())


def _host(*values: float) -> list[torch.Tensor]:
    """σ values as (1,) float64 CPU tensors: the ``*_coefs`` formulas then run on the
    host (microseconds, no device launch) and give a (1, 9) row."""
    return [torch.tensor([float(v)], dtype=torch.float64) for v in values]


def filled_row(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (1, 9) row with these values on ``device``, written with fills: no
    host-to-device copy (which would synchronize, and which a CUDA graph would
    replay from a stale host buffer)."""
    row = torch.zeros(1, NUM_COEFS, dtype=dtype, device=device)
    for i, v in enumerate(values):
        if v != 0:
            row[0, i] = v
    return row


def _row_for_numbers(sample: torch.Tensor, key: tuple, build,
                     table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The coefficient row of a step given as Python numbers: ``build()`` gives it as a
    (1, 9) float64 CPU tensor; the result is in the sample's opmath dtype on its device
    (what sampler_step reads without a conversion), kept in ``_ROWS`` (for ``table``,
    the CPU ᾱ table it was read from, while that table lives unmodified)."""
    acc = opmath_dtype(sample.dtype)

    def make():
        host = build()
        if sample.device.type == "cpu":
            return host.to(acc)
        return filled_row(host[0].tolist(), acc, sample.device)

    return _ROWS.get((key, sample.device, acc), sample, make, source=table)


# --------------------------------------------------------------------------
# Timestep space (diffusers)
# --------------------------------------------------------------------------


def _vp_x0_cols(ab_t: torch.Tensor, prediction_type: str) -> dict:
    """x0 = a_x x + a_m m for a VP model output at ᾱ_t."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return {"A_X": ab_t.rsqrt(), "A_M": -((1 - ab_t) / ab_t).sqrt()}
    if prediction_type == "sample":
        return {"A_M": torch.ones_like(ab_t)}
    return {"A_X": ab_t.sqrt(), "A_M": -(1 - ab_t).sqrt()}


def ddpm_coefs(
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    add_noise: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
) -> torch.Tensor:
    """Rows of the DDPM ancestral step (Ho et al. eq. 6-7, diffusers' DDPMScheduler.step).

    x_prev = c0 x0 + cx x + std z with c0 = sqrt(ᾱ_prev) β_t / (1-ᾱ_t),
    cx = sqrt(α_t) (1-ᾱ_prev) / (1-ᾱ_t); std = sqrt(β̃_t) (fixed_small) or sqrt(β_t)
    (fixed_large), zero where ``add_noise`` is False (t = 0).
    """
    _check_choice("variance_type", variance_type, DDPM_VARIANCE_TYPES)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_prev = 1 - alpha_prod_t_prev
    current_alpha = alpha_prod_t / alpha_prod_t_prev
    current_beta = 1 - current_alpha
    if variance_type == "fixed_large":
        variance = current_beta
    else:
        variance = (beta_prod_prev / beta_prod_t * current_beta).clamp(min=1e-20)
    std = torch.where(add_noise, variance.sqrt(), torch.zeros_like(variance))
    return _rows(
        alpha_prod_t.shape, alpha_prod_t,
        **_vp_x0_cols(alpha_prod_t, prediction_type),
        C_0=alpha_prod_t_prev.sqrt() * current_beta / beta_prod_t,
        C_X=current_alpha.sqrt() * beta_prod_prev / beta_prod_t,
        C_N=std,
    )


def ddim_coefs(
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Rows of the DDIM step (Song et al. eq. 12 and 16, diffusers' DDIMScheduler.step).

    x_prev = sqrt(ᾱ_prev) x0 + sqrt(1-ᾱ_prev-σ²) ε + σ z with
    σ = η sqrt((1-ᾱ_prev)/(1-ᾱ_t) (1-ᾱ_t/ᾱ_prev)); ε is read from the model
    output (or re-derived from the clipped x0 when ``use_clipped_model_output``).
    """
    beta_prod_t = 1 - alpha_prod_t
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance.sqrt()
    direction = (1 - alpha_prod_t_prev - std**2).clamp(min=0).sqrt()
    cols = _vp_x0_cols(alpha_prod_t, prediction_type)
    c_0 = alpha_prod_t_prev.sqrt()
    zero = torch.zeros_like(alpha_prod_t)
    if use_clipped_model_output:  # ε = (x - sqrt(ᾱ) x0_clipped) / sqrt(1-ᾱ)
        c_x = direction / beta_prod_t.sqrt()
        c_m = zero
        c_0 = c_0 - direction * (alpha_prod_t / beta_prod_t).sqrt()
    elif prediction_type == "epsilon":
        c_x, c_m = zero, direction
    elif prediction_type == "sample":  # ε from the unclipped x0 = m
        c_x = direction / beta_prod_t.sqrt()
        c_m = -direction * (alpha_prod_t / beta_prod_t).sqrt()
    else:  # v: ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x
        c_x = direction * beta_prod_t.sqrt()
        c_m = direction * alpha_prod_t.sqrt()
    return _rows(alpha_prod_t.shape, alpha_prod_t, **cols, C_X=c_x, C_M=c_m, C_0=c_0, C_N=std)


def _check_alphas(step: str, alphas_cumprod) -> None:
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 \
            or not alphas_cumprod.is_floating_point() or alphas_cumprod.numel() == 0:
        raise TypeError(f"{step}: alphas_cumprod must be a non-empty 1-D floating-point tensor")


def _check_below(step: str, name: str, t: torch.Tensor, length: int) -> None:
    """CPU timesteps past the ᾱ table raise here, naming the argument (on other devices
    the gather's or sampler_step's device-side index check catches them, without a sync)."""
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        top = int(t.max())
        if top >= length:
            raise IndexError(f"{step}: {name} must be < {length} (the length of alphas_cumprod), got {top}")


def _alphas_from_minus_one(alphas_cumprod: torch.Tensor, final, device: torch.device) -> torch.Tensor:
    """(T + 1,) [final, ᾱ_0, ..., ᾱ_{T-1}] in the coefficient dtype on ``device``: entry
    t + 1 is ᾱ at timestep t, entry 0 the step past t = 0 (t < 0)."""
    dtype = _coef_dtype(device)
    ab = alphas_cumprod.to(device=device, dtype=dtype)
    if isinstance(final, torch.Tensor):
        head = final.to(device=device, dtype=dtype).reshape(1)
    else:
        head = torch.full((1,), float(final), dtype=dtype, device=device)
    return torch.cat([head, ab])


def _alphas_at(ab: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor) -> torch.Tensor:
    """(ᾱ_t, ᾱ_prev), a (2, B) tensor, in one gather from an
    :func:`_alphas_from_minus_one` table (any t < 0 reads its ``final``)."""
    return ab[_table_row(torch.stack((t, prev_t)))]


def _timestep_step(coefs_fn, key, model_output, timestep, sample, alphas_cumprod, prev_timestep,
                   final_alpha_cumprod, clip_sample_range, noise, seed, guidance_scale, return_x0):
    """One step from ``coefs_fn(ab_t, ab_prev, t)``; ``key`` names the step and its
    parameters (for the kept rows and tables).

    * int timesteps and a CPU ᾱ table: the row is read on the host and kept (no device
      op for it, and no copy of the table to the device);
    * per-sample timesteps with the default ``prev_timestep`` (t - 1): the rows depend on
      t alone, so all T + 1 of them (t = -1 .. T-1) are made once per ᾱ tensor and kept
      while it lives unmodified, and the kernel reads row t + 1 (as ``add_noise``);
    * per-sample ``prev_timestep``: ᾱ_t and ᾱ_prev in one gather from a kept
      [final, ᾱ_0, ...] table, then the coefficient formulas on the (B,) values.
    """
    step = f"{key[0]}_step"
    _check_alphas(step, alphas_cumprod)
    if (_host_numbers(timestep, final_alpha_cumprod) and isinstance(timestep, int)
            and (prev_timestep is None or (isinstance(prev_timestep, int) and _host_numbers(prev_timestep)))
            and alphas_cumprod.device.type == "cpu"):
        t_prev = timestep - 1 if prev_timestep is None else prev_timestep

        def build():
            t, prev_t = torch.tensor([timestep]), torch.tensor([t_prev])
            ab = _alphas_from_minus_one(alphas_cumprod, final_alpha_cumprod, t.device)
            return coefs_fn(*_alphas_at(ab, t, prev_t), t)

        coefs = _row_for_numbers(sample, key + (timestep, t_prev, float(final_alpha_cumprod)),
                                 build, table=alphas_cumprod)
        index = None
    else:
        batch, device = sample.shape[0], sample.device
        length = alphas_cumprod.shape[0]
        t = _timesteps("timestep", timestep, batch, device)
        _check_below(step, "timestep", t, length)
        # Under torch.compile the tables are traced as device ops (the kept tables'
        # bookkeeping would break the graph); so is a tensor final_alpha_cumprod's.
        keep = _host_numbers(final_alpha_cumprod)
        acc = opmath_dtype(sample.dtype)
        if prev_timestep is None:
            def make():
                ab = _alphas_from_minus_one(alphas_cumprod, final_alpha_cumprod, device)
                ab_prev = torch.cat([ab[:1], ab[:-1]])  # entry t + 1: ᾱ at t - 1
                return coefs_fn(ab, ab_prev, torch.arange(-1, length, device=device)).to(acc)

            coefs = make() if not keep else _kept_table(
                key + ("rows", float(final_alpha_cumprod), device, acc), sample, make, alphas_cumprod)
            index = _table_row(t)
        else:
            prev_t = _timesteps("prev_timestep", prev_timestep, batch, device)
            _check_below(step, "prev_timestep", prev_t, length)
            ab = _kept_alphas(alphas_cumprod, final_alpha_cumprod, device, sample)
            coefs, index = coefs_fn(*_alphas_at(ab, t, prev_t), t), None
    return sampler_step(sample, model_output, coefs, index, noise=noise, seed=seed,
                        guidance_scale=guidance_scale, clip_range=_clip_range(clip_sample_range),
                        return_x0=return_x0)


def ddpm_step(
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prev_timestep=None,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample_range: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    guidance_scale: Optional[float] = None,
    return_x0: bool = False,
):
    """x_{t-1} of the DDPM ancestral sampler, fused (diffusers' DDPMScheduler.step).

    ``timestep`` and ``prev_timestep`` (default t-1; <0 means ᾱ_prev = 1) are
    ints or per-sample integer tensors.  Noise: ``noise`` tensor, in-kernel
    Philox from ``seed``, or neither (the mean).  ``guidance_scale`` combines
    the halves of a (2B, ...) model output.
    """
    return _timestep_step(
        lambda ab_t, ab_prev, t: ddpm_coefs(ab_t, ab_prev, t > 0, prediction_type=prediction_type,
                                            variance_type=variance_type),
        ("ddpm", prediction_type, variance_type), model_output, timestep, sample, alphas_cumprod, prev_timestep, 1.0,
        clip_sample_range, noise, seed, guidance_scale, return_x0,
    )


def ddim_step(
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prev_timestep=None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
    use_clipped_model_output: bool = False,
    final_alpha_cumprod: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    guidance_scale: Optional[float] = None,
    return_x0: bool = False,
):
    """x_prev of the DDIM sampler, fused (diffusers' DDIMScheduler.step).

    ``final_alpha_cumprod`` is ᾱ_prev for prev_timestep < 0 (1.0 for
    ``set_alpha_to_one``, else ᾱ_0).  With eta = 0 the step is deterministic.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _timestep_step(
        lambda ab_t, ab_prev, t: ddim_coefs(ab_t, ab_prev, eta=eta, prediction_type=prediction_type,
                                            use_clipped_model_output=use_clipped_model_output),
        ("ddim", float(eta), prediction_type, bool(use_clipped_model_output)), model_output, timestep, sample, alphas_cumprod, prev_timestep, final_alpha_cumprod,
        clip_sample_range, noise if eta > 0 else None, seed if eta > 0 else None,
        guidance_scale, return_x0,
    )


def _forward_rows(ab: torch.Tensor) -> torch.Tensor:
    """(T + 1, 9) rows of q(x_t | x_0) from the (T + 1,) [1, ᾱ_0, ...] table: row t + 1 is
    timestep t, row 0 the t < 0 case (ᾱ = 1: x_0 itself)."""
    return _rows(ab.shape, ab, C_X=ab.sqrt(), C_N=(1 - ab).sqrt())


def add_noise(
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The forward process q(x_t | x_0): sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε, per-sample t
    (t < 0: x0).  One pass reading row t of a table made from ``alphas_cumprod`` once
    and kept while that tensor lives unmodified."""
    _check_alphas("add_noise", alphas_cumprod)
    x = original_samples
    t = _timesteps("timesteps", timesteps, x.shape[0], x.device)
    # Under torch.compile the timesteps are left to sampler_step's index check.
    _check_below("add_noise", "timesteps", t, alphas_cumprod.shape[0])
    acc = opmath_dtype(x.dtype)

    def make():
        return _forward_rows(_alphas_from_minus_one(alphas_cumprod, 1.0, x.device)).to(acc)

    table = _kept_table(("add_noise", x.device, acc), x, make, alphas_cumprod)
    return sampler_step(x, None, table, _table_row(t), noise=noise)


# --------------------------------------------------------------------------
# σ space (k-diffusion / EDM: x = x0 + σ ε)
# --------------------------------------------------------------------------


def sigma_x0_coefs(sigma: torch.Tensor, prediction_type: str = "sample") -> dict:
    """x0 = a_x x + a_m m for a model output at noise level σ (x = x0 + σ ε).

    ``sample``: m is the denoised image (k-diffusion / EDM ``D``);
    ``epsilon``: x0 = x - σ m; ``v_prediction``: x0 = x/(σ²+1) - σ m/sqrt(σ²+1)
    (diffusers' EulerDiscreteScheduler).
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "sample":
        return {"A_M": torch.ones_like(sigma)}
    if prediction_type == "epsilon":
        return {"A_X": torch.ones_like(sigma), "A_M": -sigma}
    return {"A_X": 1 / (sigma**2 + 1), "A_M": -sigma / (sigma**2 + 1).sqrt()}


def euler_coefs(sigma: torch.Tensor, sigma_next: torch.Tensor, *,
                prediction_type: str = "sample", clip: bool = False) -> torch.Tensor:
    """Rows of the Euler step x + (σ_next - σ) (x - x0)/σ.

    For ε-prediction without clipping the step reads ε directly (x + dt ε),
    which avoids the cancellation of (x - x0)/σ at large σ.
    """
    dt = sigma_next - sigma
    cols = sigma_x0_coefs(sigma, prediction_type)
    if prediction_type == "epsilon" and not clip:
        return _rows(sigma.shape, sigma, **cols, C_X=torch.ones_like(sigma), C_M=dt)
    return _rows(sigma.shape, sigma, **cols, C_X=1 + dt / sigma, C_0=-dt / sigma)


def heun_coefs(sigma: torch.Tensor, sigma_next: torch.Tensor, *,
               prediction_type: str = "sample") -> torch.Tensor:
    """Rows of Heun's correction x + dt/2 ((x - D1)/σ + (x_mid - D2)/σ_next).

    Kernel inputs: x = x_mid (the Euler prediction at σ_next, converted to D2
    with the model output), prev = x, prev2 = D1.
    """
    dt = sigma_next - sigma
    return _rows(sigma.shape, sigma, **sigma_x0_coefs(sigma_next, prediction_type),
                 C_X=dt / (2 * sigma_next), C_0=-dt / (2 * sigma_next),
                 C_P=1 + dt / (2 * sigma), C_Q=-dt / (2 * sigma))


def dpmpp_2m_coefs(sigma: torch.Tensor, sigma_next: torch.Tensor,
                   sigma_prev: Optional[torch.Tensor] = None, *,
                   prediction_type: str = "sample") -> torch.Tensor:
    """Rows of DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's sample_dpmpp_2m).

    With t = -log σ, h = t_next - t:
    x_next = (σ_next/σ) x - expm1(-h) ((1 + 1/2r) D - (1/2r) D_prev), r = h_last / h,
    reading D_prev from ``prev``.  First order (D only) without ``sigma_prev``
    and, per sample, where σ_next = 0 (the final denoise).
    """
    h = sigma.log() - sigma_next.log()
    phi = torch.expm1(-h)  # -1 where σ_next = 0
    ratio = sigma_next / sigma
    c_0, c_p = -phi, torch.zeros_like(sigma)
    if sigma_prev is not None:
        half_inv_r = 0.5 * h / (sigma_prev.log() - sigma.log())
        second = sigma_next > 0
        c_0 = torch.where(second, -phi * (1 + half_inv_r), c_0)
        c_p = torch.where(second, phi * half_inv_r, c_p)
    return _rows(sigma.shape, sigma, **sigma_x0_coefs(sigma, prediction_type),
                 C_X=ratio, C_0=c_0, C_P=c_p)


def _sigmas(sample: torch.Tensor, **named: Scalar) -> list[torch.Tensor]:
    return [_per_sample(k, v, sample.shape[0], sample.device) for k, v in named.items()]


def euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    prediction_type: str = "sample",
    clip_range=None,
    guidance_scale: Optional[float] = None,
    return_x0: bool = False,
):
    """Euler step from σ to σ_next (k-diffusion ``sample_euler``'s update).

    σ may carry churn already (σ_hat = σ (1 + γ), the model evaluated at the
    churned sample; see :func:`churn`).  σ values are floats or per-sample
    tensors.
    """
    clip = clip_range is not None
    if _host_numbers(sigma, sigma_next):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        coefs = _row_for_numbers(
            sample, ("euler", float(sigma), float(sigma_next), prediction_type, clip),
            lambda: euler_coefs(*_host(sigma, sigma_next), prediction_type=prediction_type, clip=clip))
    else:
        s, sn = _sigmas(sample, sigma=sigma, sigma_next=sigma_next)
        coefs = euler_coefs(s, sn, prediction_type=prediction_type, clip=clip)
    return sampler_step(sample, model_output, coefs, guidance_scale=guidance_scale,
                        clip_range=clip_range, return_x0=return_x0)


def churn(
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_hat: Scalar,
    *,
    s_noise: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    seed=None,
) -> torch.Tensor:
    """Raise the noise level from σ to σ_hat >= σ: x + s_noise sqrt(σ_hat² - σ²) z
    (EDM Algorithm 2, lines 5-6)."""
    def rows(s, s_hat):
        return _rows(s.shape, s, C_X=torch.ones_like(s),
                     C_N=s_noise * (s_hat**2 - s**2).clamp(min=0).sqrt())

    if _host_numbers(sigma, sigma_hat, s_noise):
        coefs = _row_for_numbers(sample, ("churn", float(sigma), float(sigma_hat), float(s_noise)),
                                 lambda: rows(*_host(sigma, sigma_hat)))
    else:
        coefs = rows(*_sigmas(sample, sigma=sigma, sigma_hat=sigma_hat))
    return sampler_step(sample, None, coefs, noise=noise, seed=seed)


def euler_ancestral_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: Optional[torch.Tensor] = None,
    seed=None,
    prediction_type: str = "sample",
    guidance_scale: Optional[float] = None,
    return_x0: bool = False,
):
    """Ancestral Euler step (k-diffusion ``sample_euler_ancestral``):
    σ_up = min(σ_next, η sqrt(σ_next² (σ² - σ_next²) / σ²)), σ_down = sqrt(σ_next² - σ_up²),
    x_next = x + (σ_down - σ) (x - x0)/σ + s_noise σ_up z."""
    def rows(s, sn):
        sigma_up = torch.minimum(sn, eta * (sn**2 * (s**2 - sn**2) / s**2).clamp(min=0).sqrt())
        sigma_down = (sn**2 - sigma_up**2).clamp(min=0).sqrt()
        coefs = euler_coefs(s, sigma_down, prediction_type=prediction_type)
        coefs[:, C_N] = s_noise * sigma_up
        return coefs

    if _host_numbers(sigma, sigma_next, eta, s_noise):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        coefs = _row_for_numbers(
            sample, ("euler_ancestral", float(sigma), float(sigma_next), float(eta), float(s_noise),
                     prediction_type),
            lambda: rows(*_host(sigma, sigma_next)))
    else:
        coefs = rows(*_sigmas(sample, sigma=sigma, sigma_next=sigma_next))
    return sampler_step(sample, model_output, coefs, noise=noise, seed=seed,
                        guidance_scale=guidance_scale, return_x0=return_x0)


def heun_step(
    model_output: torch.Tensor,
    sample_mid: torch.Tensor,
    sample: torch.Tensor,
    denoised: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    prediction_type: str = "sample",
    guidance_scale: Optional[float] = None,
    return_x0: bool = False,
):
    """Heun's second-order correction (EDM Algorithm 2 lines 9-11, k-diffusion ``sample_heun``).

    ``sample`` and ``denoised`` are x and D1 at σ; ``sample_mid`` is the Euler
    prediction at σ_next (``euler_step(..., return_x0=True)`` gives both it and
    D1) and ``model_output`` the model evaluated there.  σ_next must be > 0
    (at σ_next = 0 the Euler step is final).
    """
    if _host_numbers(sigma, sigma_next):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        coefs = _row_for_numbers(
            sample, ("heun", float(sigma), float(sigma_next), prediction_type),
            lambda: heun_coefs(*_host(sigma, sigma_next), prediction_type=prediction_type))
    else:
        s, sn = _sigmas(sample, sigma=sigma, sigma_next=sigma_next)
        coefs = heun_coefs(s, sn, prediction_type=prediction_type)
    return sampler_step(sample_mid, model_output, coefs, prev=sample, prev2=denoised,
                        guidance_scale=guidance_scale, return_x0=return_x0)


def dpmpp_2m_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    sigma_prev: Optional[Scalar] = None,
    denoised_prev: Optional[torch.Tensor] = None,
    prediction_type: str = "sample",
    guidance_scale: Optional[float] = None,
    return_x0: bool = True,
):
    """DPM-Solver++(2M) step (k-diffusion ``sample_dpmpp_2m``).

    Pass the previous step's denoised image and σ (``denoised_prev``,
    ``sigma_prev``) for the second-order update; without them the step is first
    order.  Returns ``(x_next, denoised)`` by default: denoised is the next
    step's ``denoised_prev``.
    """
    if (sigma_prev is None) != (denoised_prev is None):
        raise ValueError("dpmpp_2m_step: give both sigma_prev and denoised_prev, or neither")
    if _host_numbers(sigma, sigma_next) and (sigma_prev is None or _host_numbers(sigma_prev)):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        prev = None if sigma_prev is None else float(sigma_prev)
        coefs = _row_for_numbers(
            sample, ("dpmpp_2m", float(sigma), float(sigma_next), prev, prediction_type),
            lambda: dpmpp_2m_coefs(*_host(sigma, sigma_next),
                                   None if prev is None else _host(prev)[0],
                                   prediction_type=prediction_type))
    else:
        s, sn = _sigmas(sample, sigma=sigma, sigma_next=sigma_next)
        sp = None if sigma_prev is None else _sigmas(sample, sigma_prev=sigma_prev)[0]
        coefs = dpmpp_2m_coefs(s, sn, sp, prediction_type=prediction_type)
    return sampler_step(sample, model_output, coefs, prev=denoised_prev,
                        guidance_scale=guidance_scale, return_x0=return_x0)
