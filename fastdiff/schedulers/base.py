"""Shared machinery of fastdiff's diffusers-compatible schedulers.

diffusers is an optional dependency, so nothing here imports it.  What this
module rebuilds of diffusers' ``ConfigMixin`` / ``SchedulerMixin`` is what
pipelines and users touch:

* ``scheduler.config``: an immutable dict with attribute access
  (:class:`FrozenConfig`), holding every constructor argument plus
  ``_class_name`` and ``_use_default_values`` (the arguments left at their
  defaults), so ``diffusers.DDIMScheduler.from_config(fastdiff_sched.config)``
  treats it exactly like one of its own configs.  Pipelines that rewrite
  ``scheduler._internal_dict`` (as Stable Diffusion's does for
  ``steps_offset``) keep working: the config is read from there.
* ``from_config(config, return_unused_kwargs=False, **kwargs)``: accepts any
  mapping (a diffusers ``FrozenDict`` included); keys listed in
  ``_use_default_values`` fall back to this class's defaults, keyword
  arguments override, private keys (``_class_name``, ``_diffusers_version``,
  ...) are tolerated silently, arguments of the other fastdiff schedulers are
  kept in the config (diffusers' "hidden" compatible-class keys), and any other
  key is ignored with a logged warning.
* :class:`SchedulerOutput` (``.prev_sample``, ``.pred_original_sample``,
  indexable like diffusers' ``BaseOutput``).

and the step plumbing every scheduler shares: coefficient tables kept per
device (:class:`CoefTable`), noise drawn either exactly like diffusers'
``randn_tensor`` (with a ``generator``) or inside the fused kernel (Philox,
seeded from a device tensor advanced in place), dynamic thresholding, and the
diffusers-style step-index bookkeeping.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .. import schedules
from ..ops import sampler_step
from ..reference import opmath_dtype
from ..reference import sampler_step as _columns
from ..reference.sampler_step import A_M, A_N, A_X, C_0, C_M, C_P, NUM_COEFS

__all__ = [
    "BETA_SCHEDULES",
    "CoefTable",
    "FrozenConfig",
    "SchedulerBase",
    "SchedulerOutput",
    "TIMESTEP_SPACINGS",
    "check_choice",
    "randn_tensor",
    "register_to_config",
    "threshold_sample",
]

logger = logging.getLogger("fastdiff.schedulers")

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp", "laplace")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def check_choice(owner: str, name: str, value, choices) -> None:
    """ValueError naming the argument and its valid values unless ``value in choices``."""
    if value not in choices:
        raise ValueError(
            f"{owner}: {name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
        )


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


class FrozenConfig(dict):
    """An immutable dict whose keys are also attributes (diffusers' ``FrozenDict``).

    A ``dict`` subclass, so diffusers' ``from_config`` accepts it.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no attribute {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("a scheduler config is immutable; build a new scheduler with from_config")

    __setattr__ = __setitem__ = __delitem__ = _frozen
    setdefault = pop = popitem = update = clear = _frozen

    def __reduce__(self):
        return (self.__class__, (dict(self),))


def register_to_config(init):
    """Decorate a scheduler's ``__init__`` so its arguments become ``self.config``.

    Like diffusers' decorator of the same name: every argument (defaults
    filled in) is recorded, with ``_use_default_values`` listing the ones the
    caller did not pass and ``_class_name`` the class.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        passed = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        self._internal_dict = FrozenConfig(
            _class_name=type(self).__name__,
            **values,
            _use_default_values=[k for k in values if k not in passed],
        )
        init(self, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


@dataclass
class SchedulerOutput:
    """What ``step`` returns: the next sample and the predicted clean sample.

    Indexable like diffusers' ``BaseOutput``: ``out[0]`` is ``prev_sample``,
    ``out["pred_original_sample"]`` works, ``to_tuple()`` drops ``None`` fields.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


# --------------------------------------------------------------------------
# Noise and thresholding (plain torch, as diffusers)
# --------------------------------------------------------------------------


def randn_tensor(shape, generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """Normal noise drawn exactly as diffusers' ``randn_tensor``.

    CPU generators draw on the CPU and the result moves to ``device``; a list
    of generators draws one sample of the batch from each (a one-element list
    is a single generator); a generator on another accelerator than ``device``
    is an error.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen = generator[0] if isinstance(generator, (list, tuple)) else generator
        if gen.device.type != device.type:
            if gen.device.type != "cpu":
                raise ValueError(f"Cannot generate a {device} tensor from a generator of type "
                                 f"{gen.device.type}.")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        return torch.cat(
            [torch.randn(one, generator=generator[i], device=rand_device, dtype=dtype)
             for i in range(shape[0])]
        ).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022), as diffusers' ``_threshold_sample``.

    Per sample, s = clamp(quantile(|x0|, ratio), 1, max_value); x0 is clamped
    to [-s, s] and divided by s.  Not an elementwise map with per-sample
    constants known in advance (s depends on x0), so it runs in plain torch
    between the fused pass that forms x0 and the one that uses it.
    """
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    flat = x0.float() if dtype not in (torch.float32, torch.float64) else x0
    flat = flat.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _alpha_bar_betas(n: int, kind: str, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``betas_for_alpha_bar`` for the ``exp`` and ``laplace`` transforms
    (``squaredcos_cap_v2`` comes from :func:`fastdiff.schedules.betas`)."""
    if kind == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
        dtype=torch.float32,
    )


# --------------------------------------------------------------------------
# Coefficient tables
# --------------------------------------------------------------------------


class CoefTable:
    """A (R, 9) coefficient table built once in float64 (on the CPU), with a
    copy per (device, dtype) made on first use and kept: a step reads a row of
    the copy on the sample's device, so it moves nothing between host and device.
    """

    def __init__(self, rows: torch.Tensor):
        if rows.dim() != 2 or rows.shape[1] != NUM_COEFS:
            raise ValueError(f"a coefficient table has shape (R, {NUM_COEFS}), got {tuple(rows.shape)}")
        self.rows = rows.to(torch.float64)
        self._copies: dict = {}

    def __len__(self) -> int:
        return self.rows.shape[0]

    def on(self, device: torch.device, sample_dtype: torch.dtype) -> torch.Tensor:
        """The table in the dtype the op computes in for ``sample_dtype``, on ``device``."""
        dtype = opmath_dtype(sample_dtype)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # set_timesteps(device="cuda") and a sample on cuda:0 must share one
            # copy: a second (lazy) copy would be a synchronizing host -> device move.
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        if key not in self._copies:
            self._copies[key] = self.rows.to(device=device, dtype=dtype).contiguous()
        return self._copies[key]

    def x0_rows(self) -> "CoefTable":
        """Rows whose output is x0 itself (before clipping): the first pass of thresholding."""
        rows = torch.zeros_like(self.rows)
        rows[:, [A_X, A_M, A_N]] = self.rows[:, [A_X, A_M, A_N]]
        rows[:, C_0] = 1.0
        return CoefTable(rows)

    def x0_given_rows(self) -> "CoefTable":
        """The same update with x0 read from the model-output slot (a_x = a_n = 0,
        a_m = 1) and the update's use of the raw model output moved to ``prev``:
        call with ``model_output=x0`` and ``prev=model_output``.  Only for
        tables that do not use ``prev`` themselves, or whose c_m is zero."""
        rows = self.rows.clone()
        rows[:, [A_X, A_N]] = 0.0
        rows[:, A_M] = 1.0
        rows[:, C_P] = rows[:, C_P] + self.rows[:, C_M]
        rows[:, C_M] = 0.0
        return CoefTable(rows)


def rows_from(**cols: torch.Tensor) -> torch.Tensor:
    """A float64 (R, 9) table from named (R,) columns (``A_X=...``, ``C_0=...``); others zero."""
    length = max(v.shape[0] for v in cols.values())
    rows = torch.zeros(length, NUM_COEFS, dtype=torch.float64)
    for name, value in cols.items():
        rows[:, getattr(_columns, name)] = value.to(torch.float64)
    return rows


# --------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------


class SchedulerBase:
    """Config handling, noise, tables and step-index bookkeeping shared by the schedulers.

    Subclasses decorate ``__init__`` with :func:`register_to_config`.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                    "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]
    _registry: list = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SchedulerBase._registry.append(cls)

    # -- config -------------------------------------------------------------

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    @classmethod
    def _init_keys(cls) -> set:
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, return_unused_kwargs: bool = False,
                    **kwargs):
        """Build this scheduler from a config mapping (a fastdiff or diffusers config).

        Keys in the config's ``_use_default_values`` take this class's
        defaults; ``kwargs`` override config values.  Returns the scheduler,
        or ``(scheduler, unused)`` with ``return_unused_kwargs``.
        """
        if not isinstance(config, Mapping):
            raise ValueError(
                f"{cls.__name__}.from_config: config must be a dict-like scheduler config "
                f"(e.g. another scheduler's .config); got {type(config).__name__}"
            )
        defaults = set(config.get("_use_default_values", ()))
        public = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaults}
        expected = cls._init_keys()
        init = {k: v for k, v in public.items() if k in expected}
        init.update({k: kwargs.pop(k) for k in list(kwargs) if k in expected})
        hidden = {k: v for k, v in public.items() if k not in expected}
        known = set().union(*(c._init_keys() for c in SchedulerBase._registry))
        unexpected = sorted(k for k in hidden if k not in known)
        if unexpected:
            logger.warning("%s.from_config: ignoring unexpected config keys %s",
                           cls.__name__, ", ".join(unexpected))
        scheduler = cls(**init)
        if hidden:
            scheduler._internal_dict = FrozenConfig({**scheduler.config, **hidden})
        return (scheduler, {**hidden, **kwargs}) if return_unused_kwargs else scheduler

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
        return f"{type(self).__name__}({items})"

    # -- schedules ----------------------------------------------------------

    def _make_betas(self) -> None:
        """betas / alphas / alphas_cumprod from the config, as diffusers' constructors."""
        cfg = self.config
        name = type(self).__name__
        if cfg.trained_betas is not None:
            betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
        else:
            check_choice(name, "beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
            if cfg.beta_schedule in ("exp", "laplace"):
                betas = _alpha_bar_betas(cfg.num_train_timesteps, cfg.beta_schedule)
            else:
                betas = schedules.betas(cfg.beta_schedule, cfg.num_train_timesteps,
                                        cfg.beta_start, cfg.beta_end)
        if cfg.get("rescale_betas_zero_snr", False):
            betas = schedules.rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    # -- noise ----------------------------------------------------------------

    _seed: Optional[torch.Tensor] = None
    _seed_value: Optional[int] = None

    def manual_seed(self, seed: int) -> "SchedulerBase":
        """Seed the in-kernel noise used when ``step`` gets no generator.

        Without it, the stream's first seed is drawn from torch's default
        generator of the sample's device on first use (so ``torch.manual_seed``
        makes runs reproducible).  Each noisy step then advances the seed
        tensor in place on the device.  Returns ``self``.
        """
        if not isinstance(seed, int):
            raise ValueError(f"manual_seed: seed must be an int, got {type(seed).__name__}")
        self._seed_value = seed
        self._seed = None
        return self

    def _noise_kwargs(self, sample: torch.Tensor, generator: Generator, dtype: torch.dtype) -> dict:
        """``noise=`` drawn like diffusers (a generator is given), else ``seed=`` for Philox."""
        if generator is not None:
            return {"noise": randn_tensor(sample.shape, generator=generator,
                                          device=sample.device, dtype=dtype)}
        device = sample.device
        if self._seed is None or self._seed.device != device:
            if self._seed is not None:
                self._seed = self._seed.to(device)
            elif self._seed_value is not None:
                value = self._seed_value & (2**64 - 1)
                value = value - 2**64 if value >= 2**63 else value
                # a fill, not a host-to-device copy (no sync; allowed while capturing)
                self._seed = torch.full((1,), value, dtype=torch.int64, device=device)
            else:
                self._seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        return {"seed": self._seed}

    def _after_noise(self, noise_kwargs: dict) -> None:
        """Advance the in-kernel seed after the op that used it (in place: no host sync,
        and a replayed CUDA graph advances it too)."""
        if "seed" in noise_kwargs:
            self._seed.add_(1)

    # -- the fused pass -------------------------------------------------------

    @staticmethod
    def _fused(table: CoefTable, row, sample: torch.Tensor, model_output: Optional[torch.Tensor],
               return_x0: bool = True, **kwargs):
        """One ``sampler_step`` reading row ``row`` (a host int, or a (B,) device
        index tensor) of ``table``; returns ``(out, x0)``, or ``out``."""
        coefs = table.on(sample.device, sample.dtype)
        if isinstance(row, int):
            return sampler_step(sample, model_output, coefs[row:row + 1], return_x0=return_x0, **kwargs)
        return sampler_step(sample, model_output, coefs, row, return_x0=return_x0, **kwargs)

    # -- step index (σ-space schedulers, as diffusers) -----------------------

    _step_index: Optional[int] = None
    _begin_index: Optional[int] = None
    _missing_timestep_is_last = False

    @property
    def step_index(self) -> Optional[int]:
        """The index of the current step into ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The first step index, when a pipeline set it with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img pipelines call this)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Position of ``timestep`` in the schedule, as diffusers: the second match
        when it occurs twice (Heun's repeated timesteps).

        Reads the timestep's value on the host: free for Python numbers and CPU
        tensors, one device sync for an accelerator tensor (diffusers syncs here too).
        """
        schedule = (self._timesteps_host if schedule_timesteps is None
                    else schedule_timesteps.detach().cpu().numpy())
        value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        matches = np.flatnonzero(schedule == np.asarray(value, dtype=schedule.dtype))
        if len(matches) == 0:
            if self._missing_timestep_is_last:
                return len(schedule) - 1
            raise ValueError(f"{type(self).__name__}: timestep {value} is not in the schedule")
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None \
            else self.index_for_timestep(timestep)

    def _set_timesteps_host(self, timesteps: torch.Tensor, device) -> None:
        """``self.timesteps`` on ``device`` and a host (numpy) mirror for index lookups."""
        self._timesteps_host = timesteps.numpy().copy()
        self.timesteps = timesteps.to(device) if device is not None else timesteps

    def _step_indices(self, timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Schedule positions of a (B,) tensor of timesteps, as a (B,) int64 tensor on
        ``device``, with diffusers' rules for ``add_noise`` (begin/step index when set)."""
        timesteps = timesteps.reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timesteps.detach().cpu()]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)
        return torch.tensor(idx, dtype=torch.int64).to(device)


def per_sample_index(index: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) integer tensor as the (B,) int64 index the op takes."""
    index = index.reshape(-1).to(device=device, dtype=torch.int64)
    if index.numel() == 1:
        return index.expand(batch)
    if index.numel() != batch:
        raise ValueError(f"timesteps must be a scalar or have one entry per sample ({batch}), "
                         f"got {index.numel()}")
    return index
