"""Fused sampler step vs eager vs torch.compile, per step kind and shape."""

import pytest
import torch
from sampler_cases import (
    CUDA_CPP,
    DEVICES,
    IMPLS,
    KINDS,
    SHAPES,
    build,
    check_agreement,
    cuda_cpp_skip_reason,
    on_backend,
)

# fp32 everywhere; fp16 too on GPU, where samplers often keep latents in half.
PARAMS = [
    pytest.param(dev, dtype, shape, id=f"{dev}-{str(dtype)[6:]}-{shape}")
    for dev in DEVICES
    for dtype in ([torch.float32] if dev == "cpu" else [torch.float32, torch.float16])
    for shape in SHAPES
]


@pytest.mark.parametrize("impl", IMPLS + (CUDA_CPP,))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device, dtype, shape", PARAMS)
def test_sampler_step(benchmark, device, dtype, shape, kind, impl):
    if impl == CUDA_CPP and cuda_cpp_skip_reason(device):
        pytest.skip(cuda_cpp_skip_reason(device))
    case = build(kind, SHAPES[shape], device, dtype)
    if impl == CUDA_CPP:
        case.fns[CUDA_CPP] = on_backend(case.fns["fastdiff"], "cuda")
    if impl in ("fastdiff", CUDA_CPP):
        check_agreement(case, kind, impl)
    fn = case.fns[impl]
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    for _ in range(3):  # warm-up: compilation, allocator, caches
        timed()
    benchmark.group = f"{device}-{str(dtype)[6:]}-{shape}-{kind}"
    benchmark.extra_info.update(device=device, dtype=str(dtype)[6:], shape=shape, kind=kind,
                                impl=impl, bytes=case.bytes_moved)
    benchmark.pedantic(timed, rounds=20 if device == "cpu" else 100, iterations=1, warmup_rounds=2)
