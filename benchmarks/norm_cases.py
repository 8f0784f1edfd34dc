"""The timing body shared by the fused-norm benchmarks (GroupNorm, RMSNorm).

Each case times one of ``fastdiff`` (the fused op; ``fastdiff[cuda]``: forced onto the
CUDA C++ kernels), ``eager`` (the plain-torch
sequence it replaces), ``compile`` (torch.compile of eager) or ``copy`` (a
same-size ``copy_``: the one-read-one-write floor of the forward), forward alone
or forward + backward (grads of every input).
"""

from __future__ import annotations

import torch


def run_norm_case(benchmark, *, kind: str, group: str, shape: str, impl: str, pass_: str,
                  device: str, dtype: torch.dtype, fns: dict, inputs: tuple, rounds: int) -> None:
    """Check fastdiff against eager, then time ``impl``; ``inputs[0]`` is x, (N, C, ...)."""
    x = inputs[0]
    backward = pass_ == "fwd+bwd"
    if backward and impl != "copy":
        for t in inputs:
            t.requires_grad_()
    dy = torch.randn_like(x)
    out = torch.empty_like(x)

    if impl.startswith("fastdiff"):  # same numbers as eager before timing anything
        y_ref, y = fns["eager"](*inputs), fns[impl](*inputs)
        # relative to the largest output: bf16 outputs near 8 are 2**-5 apart
        err = (y.double() - y_ref.double()).abs().max().item() / y_ref.double().abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), err

    fn = fns.get(impl)

    def step():
        if impl == "copy":
            out.copy_(x)
            if backward:  # backward moves dy and x in, dx out: one more copy-equivalent
                out.copy_(dy)
            return
        y = fn(*inputs)
        if backward:
            torch.autograd.grad(y, inputs, dy)

    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    for _ in range(3):
        timed()
    benchmark.group = f"{group}-{device}-{str(dtype)[6:]}-{shape}-{pass_}"
    moved = x.numel() * x.element_size() * (5 if backward else 2)
    benchmark.extra_info.update(device=device, dtype=str(dtype)[6:], shape=shape,
                                kind=f"{kind} {pass_}", impl=impl, bytes=moved)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
