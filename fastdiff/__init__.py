"""fastdiff: fused kernels and a PyTorch-compatible DDPM/EDM API for diffusion models."""

from . import nn, ops, sampling, schedulers, schedules, training
from ._backend import BackendNotSupportedError, backends, use_backend
from ._optimize import OptimizeReport, optimize, revert

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "OptimizeReport",
    "backends",
    "nn",
    "ops",
    "optimize",
    "revert",
    "sampling",
    "schedulers",
    "schedules",
    "training",
    "use_backend",
    "__version__",
]
