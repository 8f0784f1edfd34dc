"""Random inputs of ``fastdiff.ops.sampler_step`` for the tests of every backend."""

import torch

from fastdiff.ops import NUM_COEFS
from fastdiff.reference import sampler_step as ref


def make_sampler_inputs(spec, shape, dtype, device, rows=None):
    """Keyword arguments of ``sampler_step`` with the optional inputs ``spec`` asks for.

    ``spec`` keys: model, cfg, prev, prev2 (bools), noise ("tensor" | "seed"),
    clip ((lo, hi)), index (bool), x0 (return_x0).  Coefficients are uniform in
    [-1, 1): one row per sample, or with ``index`` a table of ``rows`` rows
    (default 2 x batch) gathered per sample.  The guidance scale 7.3 is not
    representable in fp32, so fp64 runs catch a kernel rounding it.
    """
    batch = shape[0]
    g = torch.Generator().manual_seed(1234)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    n_rows = rows or (2 * batch if spec.get("index") else batch)
    coefs = torch.rand(n_rows, NUM_COEFS, generator=g, dtype=torch.float64) * 2 - 1
    kw = dict(x=rnd(*shape), model_output=None,
              coefs=coefs.to(device=device, dtype=ref.opmath_dtype(dtype)))
    if spec.get("model"):
        kw["model_output"] = rnd(2 * batch if spec.get("cfg") else batch, *shape[1:])
    if spec.get("cfg"):
        kw["guidance_scale"] = 7.3
    if spec.get("prev"):
        kw["prev"] = rnd(*shape)
    if spec.get("prev2"):
        kw["prev2"] = rnd(*shape)
    if spec.get("noise") == "tensor":
        kw["noise"] = rnd(*shape)
    if spec.get("noise") == "seed":
        kw["seed"] = 987654321987
    if spec.get("clip"):
        kw["clip_range"] = spec["clip"]
    if spec.get("index"):
        kw["index"] = torch.randint(0, n_rows, (batch,), generator=g).to(device)
    kw["return_x0"] = bool(spec.get("x0"))
    return kw
