"""Drop-in replacements for diffusers' schedulers whose every step is one fused pass.

| fastdiff.schedulers             | replaces diffusers'             |
|---------------------------------|---------------------------------|
| ``DDPMScheduler``               | ``DDPMScheduler``               |
| ``DDIMScheduler``               | ``DDIMScheduler``               |
| ``EulerDiscreteScheduler``      | ``EulerDiscreteScheduler``      |
| ``HeunDiscreteScheduler``       | ``HeunDiscreteScheduler``       |
| ``EDMEulerScheduler``           | ``EDMEulerScheduler``           |
| ``DPMSolverMultistepScheduler`` | ``DPMSolverMultistepScheduler`` |

Same constructor arguments, config (``from_config`` works both ways), methods
and numbers; diffusers itself is not needed.  Every ``step`` is one (two with
dynamic thresholding) ``fastdiff.ops.sampler_step`` pass reading a row of a
coefficient table built in ``set_timesteps``.
"""

from .base import FrozenConfig, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .edm_euler import EDMEulerScheduler
from .euler import EulerDiscreteScheduler
from .heun import HeunDiscreteScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerDiscreteScheduler",
    "FrozenConfig",
    "HeunDiscreteScheduler",
    "SchedulerOutput",
]
