"""Tests specific to the C++ extension ``fastdiff._C`` (its CPU kernels).

The backend-generic tests of ``sampler_step`` live elsewhere; these check what
only the extension can get wrong: its Philox words, its kernel against the
plain-torch backend over every combination of optional inputs, dtypes and
layouts, and its own argument checks.
"""

import itertools

import pytest
import torch

_C = pytest.importorskip("fastdiff._C")

import fastdiff  # noqa: E402
from fastdiff.ops import sampler_step  # noqa: E402
from fastdiff.reference import philox  # noqa: E402
from fastdiff.reference import sampler_step as ref  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEEDS = (0, 1, 12345, 2**32 - 1, 2**32 + 7, 2**63 - 1, 2**63 + 5, 2**64 - 1)
MASK64 = 2**64 - 1


def test_has_cuda_is_bool():
    assert isinstance(_C.has_cuda(), bool)


# --------------------------------------------------------------------------
# Philox
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 2**32 - 3, 2**40 + 11])
def test_philox_words_match_reference(seed, offset):
    numel = 1000
    i = torch.arange(numel, dtype=torch.int64) + offset
    zero = torch.zeros_like(i)
    want = torch.stack(
        philox.philox4x32(i & 0xFFFFFFFF, (i >> 32) & 0xFFFFFFFF, zero, zero,
                          seed & 0xFFFFFFFF, seed >> 32),
        dim=1,
    )
    got = _C._philox_words_cpu(seed, numel, offset)
    assert got.dtype == torch.int64 and got.shape == (numel, 4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_normal_matches_reference(seed):
    numel = 100_000
    got = _C._philox_normal_cpu(seed, numel)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    want = philox.philox_normal(seed, numel, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_philox_normal_offset_continues_stream():
    full = _C._philox_normal_cpu(7, 300)
    assert torch.equal(_C._philox_normal_cpu(7, 100, 200), full[200:])


# --------------------------------------------------------------------------
# sampler_step: CPU kernel vs the torch backend
# --------------------------------------------------------------------------

# Each combination: (prev, prev2, clip_range, index, return_x0).
CLIPS = (None, (-0.5, 0.7), (-0.3, None), (None, 0.4))
REST = list(itertools.product([False, True], [False, True], CLIPS, [False, True], [False, True]))


def _inputs(shape, dtype, model, noise, prev, prev2, index, channels_last, gen):
    """Random inputs of one call (model: None/'plain'/'cfg', noise: None/'tensor'/'seed')."""
    batch = shape[0]

    def t(b=batch):
        v = torch.randn((b,) + tuple(shape[1:]), generator=gen).to(dtype)
        return v.to(memory_format=torch.channels_last) if channels_last else v

    kw = {}
    if prev:
        kw["prev"] = t()
    if prev2:
        kw["prev2"] = t()
    if noise == "tensor":
        kw["noise"] = t()
    elif noise == "seed":
        # Negative int64 seeds exercise the upper key bits.
        kw["seed"] = torch.randint(-(2**62), 2**62, (1,), generator=gen) * 2 + 1
    rows = 11 if index else batch
    coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    coefs = torch.rand(rows, ref.NUM_COEFS, generator=gen, dtype=torch.float64) * 4 - 2
    coefs = coefs.to(coef_dtype)
    if index:
        kw["index"] = torch.randint(0, rows, (batch,), generator=gen)
    if model == "cfg":
        kw["guidance_scale"] = 2.5
        m = t(2 * batch)
    else:
        m = t() if model == "plain" else None
    return t(), m, coefs, kw


def _run(backend, x, m, coefs, kw, clip, return_x0):
    with fastdiff.use_backend(backend):
        res = sampler_step(x, m, coefs, **kw, clip_range=clip, return_x0=return_x0)
    return res if return_x0 else (res,)


def _as64(t):
    return None if t is None else t.to(torch.float64)


def _reference64(x, m, coefs, kw, clip):
    """The reference in float64 on the (already rounded) low-precision inputs."""
    kw64 = {k: (_as64(v) if k in ("prev", "prev2", "noise") else v) for k, v in kw.items()}
    lo, hi = (None, None) if clip is None else clip
    return ref.sampler_step(_as64(x), _as64(m), coefs.double(), clip_min=lo, clip_max=hi, **kw64)


def _noise_as_kernel(x, kw):
    """For fp32 / fp64, the seed replaced by the kernel's own normals as a noise tensor.

    The kernel's Philox normals are float32 from its own log/cos, within a few
    ulps of the reference's (test_philox_normal_matches_reference bounds that);
    with the same normals, everything else is fp32 / fp64 arithmetic that must
    agree to the tight tolerances of _check.  The noise element at memory
    position i is normal i of the stream.
    """
    if x.dtype not in (torch.float32, torch.float64) or "seed" not in kw:
        return kw
    kw = dict(kw)
    seed = int(kw.pop("seed")) & MASK64
    noise = torch.empty_like(x, dtype=torch.float32)
    noise.as_strided((x.numel(),), (1,)).copy_(_C._philox_normal_cpu(seed, x.numel()))
    kw["noise"] = noise.to(torch.float64)
    return kw


def _check(got, want, x, m, coefs, kw, clip, what):
    dtype = x.dtype
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == x.shape, what
        assert g.stride() == w.stride(), what
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda s: f"{what}: {s}")
        elif dtype == torch.float64:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda s: f"{what}: {s}")
        else:
            # fp16/bf16: elementwise no worse than twice the torch backend's
            # error against a float64 computation, plus one rounding of the
            # output (Philox normals may differ by an ulp) and a small atol.
            exact = _reference64(x, m, coefs, kw, clip)[k]
            err = (g.double() - exact).abs()
            err_torch = (w.double() - exact).abs()
            slack = torch.finfo(dtype).eps * exact.abs() + 1e-6
            assert bool((err <= 2 * err_torch + slack).all()), (
                f"{what}: output {k} max error {err.max():.3g}, "
                f"torch backend's {err_torch.max():.3g}"
            )


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("noise", [None, "tensor", "seed"], ids=["no_noise", "noise", "seed"])
@pytest.mark.parametrize("model", [None, "plain", "cfg"], ids=["no_model", "model", "cfg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_matches_torch_backend(dtype, model, noise, channels_last):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 7)  # F = 140: runs and blocks end off any vector width
    for prev, prev2, clip, index, return_x0 in REST:
        x, m, coefs, kw = _inputs(shape, dtype, model, noise, prev, prev2, index, channels_last,
                                  gen)
        got = _run("cpu", x, m, coefs, kw, clip, return_x0)
        want = _run("torch", x, m, coefs, _noise_as_kernel(x, kw), clip, return_x0)
        what = f"prev={prev} prev2={prev2} clip={clip} index={index} return_x0={return_x0}"
        _check(got, want, x, m, coefs, kw, clip, what)


@pytest.mark.parametrize("shape", [(5, 3, 37, 41), (2, 70_001), (50_000,), (1, 3, 8, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_large_and_odd_shapes(shape, dtype):
    """Several parallel tasks whose bounds fall inside samples; F = 1; B = 1."""
    gen = torch.Generator().manual_seed(1)
    x, m, coefs, kw = _inputs(shape, dtype, "cfg", "seed", True, False, True, False, gen)
    got = _run("cpu", x, m, coefs, kw, (-1.0, 1.0), True)
    want = _run("torch", x, m, coefs, _noise_as_kernel(x, kw), (-1.0, 1.0), True)
    _check(got, want, x, m, coefs, kw, (-1.0, 1.0), f"shape={shape}")


def test_cpu_kernel_keeps_nan_through_clip():
    x = torch.tensor([[float("nan"), 0.5, -3.0, 3.0]])
    coefs = torch.tensor([[1.0, 0, 0, 0, 0, 1.0, 0, 0, 0]])
    with fastdiff.use_backend("cpu"):
        out, x0 = sampler_step(x, None, coefs, clip_range=(-1.0, 1.0), return_x0=True)
    expected = torch.tensor([[float("nan"), 0.5, -1.0, 1.0]])
    torch.testing.assert_close(out, expected, equal_nan=True)
    torch.testing.assert_close(x0, expected, equal_nan=True)


# --------------------------------------------------------------------------
# The extension's own checks (direct calls, bypassing the Python validation)
# --------------------------------------------------------------------------


def _direct_args(batch=2, rows=2):
    gen = torch.Generator().manual_seed(batch * 100 + rows)
    x = torch.randn(batch, 3, 4, generator=gen)
    coefs = torch.randn(rows, ref.NUM_COEFS, generator=gen)
    return dict(x=x, model_output=torch.randn(batch, 3, 4, generator=gen), coefs=coefs,
                index=None, prev=None,
                prev2=None, noise=None, seed=None, guidance_scale=None, clip_min=None,
                clip_max=None, out=torch.empty_like(x), x0_out=None)


@pytest.mark.parametrize("bad", [4, 100, -1])
def test_index_out_of_range_raises(bad):
    a = _direct_args(rows=4)
    a["index"] = torch.tensor([0, bad])
    with pytest.raises(IndexError, match="out of range"):
        _C.sampler_step(**a)


def test_index_in_range_runs():
    a = _direct_args(rows=4)
    a["index"] = torch.tensor([3, 0])
    _C.sampler_step(**a)
    want, _ = ref.sampler_step(a["x"], a["model_output"], a["coefs"], a["index"])
    torch.testing.assert_close(a["out"], want)


def test_one_row_without_index_serves_every_sample():
    """A single coefficient row (what the kept-row steps pass) is read for every
    sample; another row count that is not the batch is refused."""
    a = _direct_args(batch=3, rows=1)
    _C.sampler_step(**a)
    want, _ = ref.sampler_step(a["x"], a["model_output"], a["coefs"].expand(3, -1), None)
    torch.testing.assert_close(a["out"], want)
    a = _direct_args(batch=3, rows=2)
    with pytest.raises(RuntimeError, match="coefs needs 1 or 3"):
        _C.sampler_step(**a)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(prev=torch.randn(2, 3, 4, dtype=torch.float64)), "dtype"),
        (lambda a: a.update(prev=torch.randn(2, 4, 3).transpose(1, 2)), "memory order"),
        (lambda a: a.update(noise=torch.randn(2, 3, 5)), "memory order"),
        (lambda a: a.update(guidance_scale=2.0), "memory order"),
        (lambda a: a.update(coefs=torch.randn(4, ref.NUM_COEFS, dtype=torch.float64)), "coefs"),
        (lambda a: a.update(noise=torch.randn(2, 3, 4), seed=torch.tensor([1])), "not both"),
        (lambda a: a.update(index=torch.tensor([0, 1], dtype=torch.int32)), "index"),
    ],
    ids=["dtype", "strides", "shape", "cfg_halves", "coefs_dtype", "noise_and_seed", "index_dtype"],
)
def test_direct_call_rejects_bad_arguments(change, match):
    a = _direct_args()
    change(a)
    with pytest.raises(RuntimeError, match=match):
        _C.sampler_step(**a)


def test_unsupported_device_is_a_clear_error():
    a = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _direct_args().items()}
    with pytest.raises(RuntimeError, match="unsupported device meta"):
        _C.sampler_step(**a)
