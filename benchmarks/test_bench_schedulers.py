"""fastdiff.schedulers vs diffusers' schedulers vs torch.compile: a whole 50-step sampling
loop with a tiny model (one Conv2d), and the scheduler step alone.

Impls (``extra_info["impl"]``):

* ``fastdiff`` -- the fastdiff scheduler (one fused pass per step);
* ``eager``    -- the diffusers scheduler of the same name and config;
* ``compile``  -- ``torch.compile`` of the diffusers loop body (model + ``step``), only
  for the schedulers whose ``step`` dynamo can trace without recompiling every step
  (DDIM, DPM-Solver++); the others read Python-int step indices or sync on timestep
  values, so torch.compile recompiles or breaks the graph each step.

``extra_info``: device, dtype, shape, kind (``sched-loop-<name>`` / ``sched-step-<name>``),
impl, bytes (the bytes the fused passes must move: per call, x, the model output, the
multistep state read and out, x0 written; times the number of calls for a loop).
No ``copy`` impl: these rows need a table of their own in ``make_results.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from sampler_cases import DEVICES

from fastdiff import schedulers as fs

try:
    import diffusers
except ImportError:
    diffusers = None

SHAPE_NAME, SHAPE = "latent-8x4x64x64", (8, 4, 64, 64)
STEPS = 50
# kind -> (class name, tensors the fused pass reads + writes, torch.compile feasible)
KINDS = {
    "ddpm": ("DDPMScheduler", 4, False),
    "ddim": ("DDIMScheduler", 4, True),
    "euler": ("EulerDiscreteScheduler", 4, False),
    "heun": ("HeunDiscreteScheduler", 4, False),
    "edm_euler": ("EDMEulerScheduler", 4, False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", 5, True),
}
LOOP_KINDS = ("ddpm", "ddim", "euler", "dpmpp_2m")
IMPLS = ("fastdiff", "eager", "compile")


def _scheduler(kind: str, impl: str):
    name = KINDS[kind][0]
    if impl == "fastdiff":
        return getattr(fs, name)()
    if diffusers is None:
        pytest.skip("diffusers is not installed")
    if impl == "compile" and not KINDS[kind][2]:
        pytest.skip(f"torch.compile of diffusers' {name}.step recompiles or syncs every step")
    return getattr(diffusers, name)()


@functools.lru_cache(maxsize=None)
def _model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(4, 4, 3, padding=1).to(device).eval().requires_grad_(False)


def _timed(fn, device: str):
    if device != "cuda":
        return fn

    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    return timed


def _loop_fn(kind: str, impl: str, device: str):
    sched = _scheduler(kind, impl)
    model = _model(device)
    x_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device)

    def body(x, t):
        return sched.step(model(sched.scale_model_input(x, t)), t, x).prev_sample

    if impl == "compile":
        body = torch.compile(body)

    def loop():
        sched.set_timesteps(STEPS, device=device)
        x = x_init * sched.init_noise_sigma
        for t in sched.timesteps:
            x = body(x, t)
        return x

    return sched, loop


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_sampling_loop(benchmark, device, kind, impl):
    sched, loop = _loop_fn(kind, impl, device)
    with torch.no_grad():
        result = loop()  # warm-up (and compilation)
        if impl == "fastdiff" and kind != "ddpm" and diffusers is not None:
            expected = _loop_fn(kind, "eager", device)[1]()
            err = (result - expected).abs().max() / expected.abs().max()
            assert err < 1e-4, f"{kind}: fastdiff loop differs from diffusers by {err:.2e}"
        calls = len(sched.timesteps)
        benchmark.group = f"{device}-float32-{SHAPE_NAME}-sched-loop-{kind}"
        benchmark.extra_info.update(
            device=device, dtype="float32", shape=SHAPE_NAME, kind=f"sched-loop-{kind}", impl=impl,
            bytes=calls * KINDS[kind][1] * torch.Size(SHAPE).numel() * 4,
        )
        benchmark.pedantic(_timed(loop, device), rounds=5, iterations=1, warmup_rounds=1)


def _step_fn(kind: str, impl: str, device: str):
    """One step at step 10 of 50, the scheduler state reset before each call
    (multistep history present, Heun in its first-order half)."""
    sched = _scheduler(kind, impl)
    sched.set_timesteps(STEPS, device=device)
    g = torch.Generator().manual_seed(2)
    x, m = (torch.randn(SHAPE, generator=g).to(device) for _ in range(2))
    t = sched.timesteps[10]
    if hasattr(sched, "is_scale_input_called"):
        sched.is_scale_input_called = True  # no "call scale_model_input" warning per step
    step = sched.step
    if impl == "compile":
        step = torch.compile(step)

    def call():
        if hasattr(sched, "_step_index"):
            sched._step_index = 10
        if hasattr(sched, "lower_order_nums"):
            sched.lower_order_nums, sched.model_outputs = 2, [m, m]
        if hasattr(sched, "state_in_first_order"):
            sched.dt = None
        return step(m, t, x).prev_sample

    return call


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("device", DEVICES)
def test_scheduler_step(benchmark, device, kind, impl):
    call = _step_fn(kind, impl, device)
    with torch.no_grad():
        for _ in range(3):  # warm-up: compilation, allocator, table copies
            call()
        benchmark.group = f"{device}-float32-{SHAPE_NAME}-sched-step-{kind}"
        benchmark.extra_info.update(
            device=device, dtype="float32", shape=SHAPE_NAME, kind=f"sched-step-{kind}", impl=impl,
            bytes=KINDS[kind][1] * torch.Size(SHAPE).numel() * 4,
        )
        benchmark.pedantic(_timed(call, device), rounds=30 if device == "cpu" else 100,
                           iterations=1, warmup_rounds=2)
