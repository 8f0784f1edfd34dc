"""Where the end-to-end time goes: kernels (device time) vs the host, per implementation.

For the CIFAR-sized U-Net of ``test_bench_e2e.py`` (the same models and weights) this
runs one training step (forward + backward of the DDPM loss) and one sampling step
(a model call + the scheduler update) of each implementation under
``torch.profiler`` and prints

* the wall time per step (synchronized), the device time summed over kernels and the
  host time spent in Python + the op layer until the last launch -- where wall is
  much larger than device time, the GPU waits on the host;
* the kernels (or, on CPU, the ops) with the most self time, with their counts, so
  a slow fused kernel or a host-bound op shows up by name next to eager's.

    python benchmarks/profile_e2e.py                          # CPU, batch 2
    python benchmarks/profile_e2e.py --device cuda --batch 64 # what GPU_NOTES asks for

Numbers are for reading, not for RESULTS.md (profiling adds host cost per op).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from test_bench_e2e import NAMES, _models, eager_train_step, fastdiff_train_step

from fastdiff import schedules
from fastdiff.schedulers import DDIMScheduler


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _steps(impl: str, model, device: str, batch: int):
    """{"train": fn, "sample": fn} for one implementation, on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, 3, 32, 32)
    x0 = torch.randn(shape, generator=g).clamp(-1, 1).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000)).to(device)
    fused = impl != "eager"
    step = fastdiff_train_step if fused else eager_train_step

    def train():
        model.zero_grad(set_to_none=True)
        step(model, x0, ab, noise, t)

    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(100, device=device)
    t_s = scheduler.timesteps[50]
    t_b = t_s.expand(batch)
    t_prev = int(t_s) - 10

    @torch.no_grad()
    def sample():
        eps = model(noise, t_b)
        if fused:
            return scheduler.step(eps, t_s, noise).prev_sample
        a, a_prev = ab[int(t_s)], ab[t_prev]
        x0_hat = ((noise - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps

    return {"train": train, "sample": sample}


def _wall_ms(fn, device: str, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def _profile(fn, device: str, reps: int):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    _sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    return prof


def _device_rows(prof, device: str, reps: int):
    """[(name, calls per step, self µs per step)] of kernels (CUDA) or ops (CPU)."""
    rows = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        us = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
        if us <= 0:
            continue
        rows[e.key][0] += e.count
        rows[e.key][1] += us
    return sorted(((k, c / reps, us / reps) for k, (c, us) in rows.items()), key=lambda r: -r[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 2 on CPU")
    p.add_argument("--arch", choices=("v1", "v2", "diffusers"), default="v1")
    p.add_argument("--impls", default="eager,optimize,fastdiff")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    device = a.device
    batch = a.batch or (64 if device == "cuda" else 2)
    models = _models(device, a.arch)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; U-Net {NAMES[a.arch]}, batch {batch}")
    for kind in ("train", "sample"):
        for impl in a.impls.split(","):
            if impl not in models:
                continue
            fn = _steps(impl, models[impl], device, batch)[kind]
            wall = _wall_ms(fn, device, a.reps)
            prof = _profile(fn, device, a.reps)
            rows = _device_rows(prof, device, a.reps)
            busy = sum(us for _, _, us in rows) / 1e3
            what = "kernel" if device == "cuda" else "op self"
            print(f"\n== {kind} / {impl}: wall {wall:.2f} ms per step, {what} time {busy:.2f} ms "
                  f"({busy / wall:.0%} of wall)")
            for name, calls, us in rows[:a.top]:
                print(f"  {us / 1e3:8.3f} ms {calls:6.0f}x  {name[:100]}")


if __name__ == "__main__":
    main()
