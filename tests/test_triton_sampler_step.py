"""The Triton backend of ``fastdiff::sampler_step`` against the plain-torch backend.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (the
conftest sets TRITON_INTERPRET=1 before triton is imported), which is slow:
sizes stay small, but cover every masking path of the kernel's tiles.
"""

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402
from _sampler_inputs import make_sampler_inputs  # noqa: E402
import triton.language as tl  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import use_backend  # noqa: E402
from fastdiff.kernels import sampler_step as kernels  # noqa: E402
from fastdiff.kernels.sampler_step import box_muller, noise_words  # noqa: E402
from fastdiff.ops import NUM_COEFS, sampler_step  # noqa: E402
from fastdiff.ops.sampler_step import seed_tensor  # noqa: E402
from fastdiff.reference import sampler_step as ref  # noqa: E402
from fastdiff.reference.philox import philox4x32, philox_normal  # noqa: E402
from fastdiff.testing import assert_close, poisoned_outputs  # noqa: E402

_UNAVAILABLE = fastdiff.backends()["triton"]
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"triton backend: {_UNAVAILABLE}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK32 = 0xFFFFFFFF

# The optional inputs of each case.  Scalars are not representable in fp32
# (7.3, 0.45, ...) so that fp64 runs catch a kernel rounding them to fp32, and
# clip_min 0.0 reaches the kernel as the integer 0 in fp64 runs.
CASES = {
    "x_only": dict(),
    "model": dict(model=True),
    "prev_only": dict(prev=True, x0=True),
    "noise_tensor": dict(model=True, noise="tensor", x0=True),
    "add_noise": dict(noise="tensor"),
    "seed": dict(model=True, noise="seed", x0=True),
    "seed_no_model": dict(noise="seed"),
    "cfg": dict(model=True, cfg=True, x0=True),
    "multistep": dict(model=True, prev=True, prev2=True),
    "clip_both": dict(model=True, noise="tensor", clip=(-0.35, 0.45), x0=True),
    "clip_min": dict(model=True, clip=(0.0, None), x0=True),
    "clip_max": dict(model=True, noise="seed", clip=(None, 0.3), x0=True),
    "indexed": dict(model=True, prev=True, index=True, x0=True),
    "everything_seed": dict(model=True, cfg=True, prev=True, prev2=True, noise="seed",
                            clip=(None, 0.45), index=True, x0=True),
    "everything_noise": dict(model=True, cfg=True, prev=True, prev2=True, noise="tensor",
                             clip=(-0.35, 0.45), index=True, x0=True),
}


def make_inputs(case, shape, dtype=torch.float32, rows=None):
    """Inputs of ``case``: a coefficient row per sample, or with index a table
    of ``rows`` rows gathered per sample."""
    return make_sampler_inputs(CASES[case], shape, dtype, DEVICE, rows)


def run(backend, kw):
    with use_backend(backend):
        res = sampler_step(**kw)
    return res if isinstance(res, tuple) else (res,)


def check_against_torch(kw):
    """Triton (outputs NaN-poisoned first) vs the torch backend on the same
    inputs, with the tolerance rule of the input dtype."""
    dtype = kw["x"].dtype
    with poisoned_outputs():
        got = run("triton", kw)
    expected = run("torch", kw)
    truth = [None] * len(got)
    if dtype in (torch.float16, torch.bfloat16):
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in kw.items()}
        truth = run("torch", kw64)
    if dtype == torch.float64 and kw.get("seed") is None:
        rtol, atol = 1e-12, 1e-12
    else:
        # Seeded noise is fp32 even for fp64 x, and log / cos may differ by an
        # ulp between math libraries (numpy's in the interpreter, libdevice).
        rtol, atol = 1e-5, 1e-6
    assert len(got) == len(expected) == (2 if kw["return_x0"] else 1)
    for name, g, e, t in zip(("out", "x0"), got, expected, truth):
        assert g.stride() == e.stride(), f"{name}: strides {g.stride()} != {e.stride()}"
        assert not g.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements remain"
        assert_close(g, e, truth=t, rtol=rtol, atol=atol, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_backend(case, dtype):
    # Per-sample size 252 < BLOCK: one tile holds all 3 samples, with masked
    # elements in every row and a fully masked fourth row.
    check_against_torch(make_inputs(case, (3, 4, 9, 7), dtype))


@pytest.mark.parametrize("case", ["everything_seed", "everything_noise"])
@pytest.mark.parametrize("shape", [
    (1, 3, 37, 41),  # batch 1; 4551 elements: three BLOCK_F blocks, the last partial
    (2, kernels.BLOCK),  # samples exactly one block long
    (37, 3),  # tiny samples: 37 of them share one tile
    (5,),  # one element per sample
    (2, 3, 4, 5, 6),
], ids=str)
def test_shapes(shape, case):
    check_against_torch(make_inputs(case, shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last(dtype):
    kw = make_inputs("everything_seed", (2, 5, 6, 7), dtype)
    cl = torch.channels_last
    kw.update(x=kw["x"].to(memory_format=cl), model_output=kw["model_output"].to(memory_format=cl))
    check_against_torch(kw)
    out, x0 = run("triton", kw)
    assert out.is_contiguous(memory_format=cl) and x0.is_contiguous(memory_format=cl)


@pytest.mark.parametrize("view", ["transposed", "sliced", "batch_inner"])
def test_non_contiguous_inputs(view):
    kw = make_inputs("everything_noise", (3, 6, 5))
    base = torch.randn(3, 5, 12, device=DEVICE)
    if view == "transposed":  # dense, batch outermost: the kernel walks x's own order
        x = base[:, :, :6].contiguous().transpose(1, 2)
    elif view == "sliced":  # not dense: copied to the contiguous order first
        x = base[:, :, ::2].transpose(1, 2)
    else:  # dense with the batch innermost: copied too
        x = torch.randn(6, 5, 3, device=DEVICE).permute(2, 0, 1)
    assert x.shape == (3, 6, 5) and not x.is_contiguous()
    kw.update(x=x, prev=kw["prev"].transpose(1, 2).contiguous().transpose(1, 2))
    check_against_torch(kw)


def test_one_coefficient_row_for_the_batch():
    kw = make_inputs("everything_noise", (4, 3, 5), rows=1)
    kw["index"] = None
    check_against_torch(kw)


def test_index_into_a_one_row_table():
    kw = make_inputs("indexed", (3, 20), rows=1)
    assert kw["index"].eq(0).all()
    check_against_torch(kw)


def test_out_of_range_index_is_clamped_in_kernel():
    """The op layer rejects a bad index; the kernel alone still reads inside coefs."""
    kw = make_inputs("indexed", (3, 40), rows=4)
    index = torch.tensor([-3, 2, 9], device=DEVICE)
    out, x0 = torch.empty_like(kw["x"]), torch.empty_like(kw["x"])
    kernels.sampler_step_triton(
        out=out, x0_out=x0, x=kw["x"], model_output=kw["model_output"], coefs=kw["coefs"],
        index=index, prev=kw["prev"], prev2=None, noise=None, seed=None,
        guidance_scale=None, clip_min=None, clip_max=None)
    exp_out, exp_x0 = ref.sampler_step(kw["x"], kw["model_output"], kw["coefs"],
                                       index.clamp(0, 3), prev=kw["prev"])
    assert_close(out, exp_out)
    assert_close(x0, exp_x0)


def test_sample_tiles_beyond_the_grid_limit(monkeypatch):
    """More sample tiles than grid dimension 1 holds spill into dimension 2."""
    monkeypatch.setattr(kernels, "MAX_GRID_1", 2)  # 5 tiles -> grid (1, 2, 3)
    check_against_torch(make_inputs("everything_seed", (5, kernels.BLOCK)))


@pytest.mark.parametrize("seed", [0, 42, 2**63 + 12345, 2**64 - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_seeded_noise_is_the_reference_stream(seed, dtype):
    """out = noise: the element at memory position i is philox_normal(seed)[i]."""
    x = torch.zeros(2, 3, 5, 7, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    coefs = torch.zeros(1, NUM_COEFS, device=DEVICE, dtype=ref.opmath_dtype(dtype))
    coefs[0, ref.C_N] = 1.0
    with use_backend("triton"):
        out = sampler_step(x, None, coefs, seed=seed)
    expected = ref.noise_from_seed(seed_tensor(seed).to(DEVICE), out).to(dtype)
    assert_close(out, expected, rtol=0, atol=1e-5)


@triton.jit
def _philox_probe_kernel(offsets, seed, words, normals, n, BLOCK: tl.constexpr):
    """words[i] = the four Philox words of noise element offsets[i] (zero-extended
    to int64); normals[i] = their Box-Muller normal."""
    o_i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    b_o = tl.load(offsets + o_i, mask=m_i, other=0)
    w0, w1, w2, w3 = noise_words(b_o, tl.load(seed))
    tl.store(words + o_i * 4 + 0, w0.to(tl.int64), mask=m_i)
    tl.store(words + o_i * 4 + 1, w1.to(tl.int64), mask=m_i)
    tl.store(words + o_i * 4 + 2, w2.to(tl.int64), mask=m_i)
    tl.store(words + o_i * 4 + 3, w3.to(tl.int64), mask=m_i)
    tl.store(normals + o_i, box_muller(w0, w1), mask=m_i)


def philox_probe(seed: int, offsets: torch.Tensor):
    """(words (n, 4) int64, normals (n,) fp32) of the kernel's noise helpers."""
    n = offsets.numel()
    words = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
    normals = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _philox_probe_kernel[(triton.cdiv(n, 128),)](
        offsets.to(DEVICE), seed_tensor(seed).to(DEVICE), words, normals, n, BLOCK=128)
    return words, normals


SEEDS = [0, 987654321987, 2**63, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bit_exact_beyond_2_32(seed):
    i = torch.tensor([0, 1, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1,
                      2**33 + 7, 2**40 + 12345, 2**62 + 3, 2**63 - 1], dtype=torch.int64)
    words, _ = philox_probe(seed, i)
    zero = torch.zeros_like(i)
    expected = philox4x32(i & MASK32, (i >> 32) & MASK32, zero, zero,
                          seed & MASK32, (seed >> 32) & MASK32)
    assert torch.equal(words.cpu(), torch.stack(expected, dim=1))


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_normals_match_reference(seed):
    n = 300
    _, normals = philox_probe(seed, torch.arange(n, dtype=torch.int64))
    assert_close(normals.cpu().double(), philox_normal(seed, n, dtype=torch.float64),
                 rtol=0, atol=1e-5)
