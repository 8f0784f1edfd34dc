"""Small launches of every GPU kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 scripts/gpu_sanitize.py

Odd sizes (tails in every tiled dimension) so out-of-bounds accesses have a
chance to show; each backend is forced in turn.  Prints one line per case.
"""

import torch

import fastdiff
from fastdiff.ops import attention, group_norm_silu, linear_attention, sampler_step

dev = "cuda"


def grads(fn, *tensors):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.float().square().sum().backward()
    return [t.grad for t in tensors]


def run_sampler(backend):
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, 5, 7, 9, device=dev, dtype=dtype)
        m = torch.randn(6, 5, 7, 9, device=dev, dtype=dtype)
        coefs = torch.rand(4, fastdiff.ops.NUM_COEFS, device=dev)
        idx = torch.tensor([0, 3, 1], device=dev)
        with fastdiff.use_backend(backend):
            sampler_step(x, m, coefs, idx, guidance_scale=3.0, clip_range=(-1, 1),
                         seed=torch.tensor([7], device=dev), prev=x, prev2=x, return_x0=True)
            sampler_step(x.to(memory_format=torch.channels_last), m[:3], coefs, idx,
                         noise=torch.randn_like(x))
    print("sampler_step", backend, "ok")


def run_group_norm(backend):
    for dtype in (torch.float32, torch.bfloat16):
        for shape, groups in (((2, 12, 5, 7), 4), ((3, 64, 33), 8), ((1, 96, 3, 5, 7), 32)):
            x = torch.randn(shape, device=dev, dtype=dtype)
            c = shape[1]
            w, b = torch.randn(c, device=dev, dtype=dtype), torch.randn(c, device=dev, dtype=dtype)
            e, s, h = (torch.randn(shape[0], c, device=dev, dtype=dtype) for _ in range(3))
            with fastdiff.use_backend(backend):
                grads(lambda x, w, b, e, s, h: group_norm_silu(x, groups, w, b, emb=e, scale=s, shift=h),
                      x, w, b, e, s, h)
            if len(shape) == 4:
                with fastdiff.use_backend(backend):
                    grads(lambda x: group_norm_silu(x, groups), x.to(memory_format=torch.channels_last))
    print("group_norm_silu", backend, "ok")


def run_attention(backend):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (b, h, n, m, d) in ((2, 3, 37, 53, 40), (1, 2, 130, 77, 64), (1, 1, 17, 17, 160)):
            q = torch.randn(b, h, n, d, device=dev, dtype=dtype)
            k = torch.randn(b, h, m, d, device=dev, dtype=dtype)
            v = torch.randn(b, h, m, d, device=dev, dtype=dtype)
            with fastdiff.use_backend(backend):
                grads(attention, q, k, v)
    print("attention", backend, "ok")


def run_linear_attention(backend):
    for dtype in (torch.float16, torch.float32):
        q = torch.randn(2, 4, 32, 37, device=dev, dtype=dtype)
        k = torch.randn(2, 4, 32, 37, device=dev, dtype=dtype)
        v = torch.randn(2, 4, 32, 37, device=dev, dtype=dtype)
        with fastdiff.use_backend(backend):
            grads(linear_attention, q, k, v)
    print("linear_attention", backend, "ok")


if __name__ == "__main__":
    for backend in ("cuda", "triton"):
        run_sampler(backend)
        run_group_norm(backend)
    run_attention("triton")
    run_linear_attention("triton")
    torch.cuda.synchronize()
    print("all ok")
