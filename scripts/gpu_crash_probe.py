"""Raise one argument-check error from fastdiff._C (a direct call with a bad
group count); prints what was raised.  Under a debugger this shows where a
throw that crashes the process goes wrong."""

import torch

import fastdiff._C as C

x = torch.randn(2, 6, 4)
y = torch.empty_like(x)
mean, rstd = torch.empty(2, 4), torch.empty(2, 4)
try:
    C.group_norm_silu_fwd(x, None, None, None, None, None, 4, 1e-5, "silu", y, mean, rstd)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
