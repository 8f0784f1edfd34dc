"""fastdiff::sampler_step on every backend that can run here, against its reference."""

import math

import pytest
import torch
from _sampler_inputs import make_sampler_inputs

import fastdiff
from fastdiff import BackendNotSupportedError, use_backend
from fastdiff.ops import NUM_COEFS, sampler_step
from fastdiff.ops.sampler_step import seed_tensor
from fastdiff.reference import sampler_step as ref
from fastdiff.reference.philox import philox_normal
from fastdiff.testing import assert_close, device_backends, poisoned_outputs

DEVICE_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in device_backends()]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Which optional inputs each case passes.  Together they cover every input,
# both noise sources, CFG, one- and two-sided clipping and the index gather.
CASES = {
    "ddpm": dict(model=True, noise="tensor", clip=(-1.0, 1.0), x0=True),
    "seeded": dict(model=True, noise="seed"),
    "cfg_multistep": dict(model=True, cfg=True, prev=True, x0=True),
    "heun_indexed": dict(model=True, prev=True, prev2=True, index=True),
    "add_noise": dict(model=False, noise="tensor"),
    "everything": dict(model=True, cfg=True, prev=True, prev2=True, noise="seed",
                       clip=(None, 0.5), index=True, x0=True),
}


def make_inputs(case, shape, dtype, device, rows=None):
    return make_sampler_inputs(CASES[case], shape, dtype, device, rows)


def run(backend, kw):
    with use_backend(backend):
        res = sampler_step(**kw)
    return res if isinstance(res, tuple) else (res,)


def float64_truth(kw):
    """The reference on float64 copies of the inputs (the 'truth' of the 2x rule)."""
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}
    return run("torch", kw64)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(device, backend, dtype, case):
    # 5 x 3 x 7 x 9: per-sample size 189, not a multiple of any block size.
    kw = make_inputs(case, (5, 3, 7, 9), dtype, device)
    with poisoned_outputs():
        got = run(backend, kw)
    expected = run("torch", kw)
    truth = float64_truth(kw)
    assert len(got) == len(expected) == (2 if kw["return_x0"] else 1)
    # fp64 is exact to rounding, except that seeded noise is drawn in fp32 and
    # log/cos of different math libraries differ by an ulp of fp32.
    fp64_tol = 1e-6 if kw.get("seed") is not None else 1e-12
    for name, g, e, t in zip(("out", "x0"), got, expected, truth):
        assert not g.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements remain"
        assert_close(g, e, truth=t, rtol=fp64_tol if dtype == torch.float64 else 1e-5,
                     atol=fp64_tol if dtype == torch.float64 else 1e-6, name=name)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4, 33, 17), (3, 1000), (2, 3, 4, 5, 6), (7,)], ids=str)
def test_shapes(device, backend, shape):
    kw = make_inputs("everything", shape, torch.float32, device)
    with poisoned_outputs():
        got = run(backend, kw)
    for g, e in zip(got, run("torch", kw)):
        assert_close(g, e)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_layouts_and_mixed_dtypes(device, backend):
    """channels_last in -> channels_last out; strided views and other dtypes are
    converted to x's layout and dtype first."""
    kw = make_inputs("everything", (3, 5, 6, 7), torch.float32, device)
    x_cl = kw["x"].to(memory_format=torch.channels_last)
    strided = torch.randn(3, 5, 7, 14, device=device)[:, :, :6, ::2]  # (3, 5, 6, 7), not dense
    kw_odd = dict(kw, x=x_cl, prev=strided, prev2=kw["prev2"].double(),
                  model_output=kw["model_output"].to(memory_format=torch.channels_last))
    out, x0 = run(backend, kw_odd)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x0.is_contiguous(memory_format=torch.channels_last)
    # Seeded noise follows memory order, so the reference runs on the same
    # channels_last x; the other inputs are given to it plain.
    exp_out, exp_x0 = run("torch", dict(kw, x=x_cl, prev=strided.contiguous()))
    assert_close(out, exp_out)
    assert_close(x0, exp_x0)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_empty_batch(device, backend):
    kw = make_inputs("ddpm", (0, 3, 4, 4), torch.float32, device, rows=1)
    out, x0 = run(backend, kw)
    assert out.shape == x0.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_seeded_noise(device, backend):
    """In-kernel noise: the Philox stream of the reference, reproducible per
    seed, different across seeds, and standard normal."""
    n = 1 << 14
    x = torch.zeros(4, n // 4, device=device)
    coefs = torch.zeros(1, NUM_COEFS, device=device)
    coefs[0, ref.C_N] = 1.0  # out = noise
    with use_backend(backend):
        a = sampler_step(x, None, coefs, seed=42)
        b = sampler_step(x, None, coefs, seed=42)
        c = sampler_step(x, None, coefs, seed=43)
        d = sampler_step(x, None, coefs, seed=torch.tensor([42], device=device))
    assert torch.equal(a, b) and torch.equal(a, d)
    assert (a != c).float().mean() > 0.99
    assert_close(a.flatten().double(), philox_normal(42, n, device=device, dtype=torch.float64), atol=1e-5)
    z = a.double().flatten().cpu()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 0.03
    # Kolmogorov-Smirnov distance to N(0, 1); the 99.9% critical value is 1.95/sqrt(n).
    zs = z.sort().values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n)


def test_philox_known_answer():
    """Philox4x32-10 known-answer vectors from the Random123 distribution (kat_vectors)."""
    from fastdiff.reference.philox import philox4x32

    def words(c, k):
        t = [torch.tensor([v], dtype=torch.int64) for v in c]
        return [int(w) for w in philox4x32(*t, k[0], k[1])]

    assert words([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradients_match_reference_autograd(device, backend):
    kw = make_inputs("everything", (2, 3, 4, 5), torch.float32, device)
    kw["clip_range"] = (-0.7, 0.7)
    kw["seed"] = None
    kw["noise"] = torch.randn_like(kw["x"])
    names = ["x", "model_output", "prev", "prev2", "noise"]
    g_out, g_x0 = torch.randn_like(kw["x"]), torch.randn_like(kw["x"])

    def grads(fn):
        leaves = {k: kw[k].detach().clone().requires_grad_() for k in names}
        out, x0 = fn(dict(kw, **leaves))
        torch.autograd.backward([out, x0], [g_out, g_x0])
        return [leaves[k].grad for k in names]

    def reference(a):
        args = {k: v for k, v in a.items() if k not in ("clip_range", "return_x0")}
        lo, hi = a["clip_range"]
        args["seed"] = None
        return ref.sampler_step(**args, clip_min=lo, clip_max=hi)

    with use_backend(backend):
        got = grads(lambda a: sampler_step(**a))
    for name, g, e in zip(names, got, grads(reference)):
        assert_close(g, e, name=f"grad {name}")


@pytest.mark.parametrize("backend", [b for d, b in device_backends() if d == "cpu" and b != "triton"])
def test_gradcheck_float64(backend):
    kw = make_inputs("cfg_multistep", (2, 3, 4), torch.float64, "cpu")
    kw["clip_range"] = (-0.9, 0.9)
    inputs = [kw[k].clone().requires_grad_() for k in ("x", "model_output", "prev")]
    noise = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, m, p, n):
        with use_backend(backend):
            return sampler_step(x, m, kw["coefs"], prev=p, noise=n, guidance_scale=2.0,
                                clip_range=kw["clip_range"], return_x0=True)

    assert torch.autograd.gradcheck(f, (*inputs, noise))


def _op_args(kw):
    lo, hi = kw.get("clip_range") or (None, None)
    return (kw["x"], kw["model_output"], kw["coefs"], kw.get("index"), kw.get("prev"),
            kw.get("prev2"), kw.get("noise"), seed_tensor(kw.get("seed")),
            kw.get("guidance_scale"), lo, hi, kw["return_x0"])


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", ["ddpm", "seeded", "everything"])
def test_opcheck(device, backend, case):
    kw = make_inputs(case, (2, 3, 5), torch.float32, device)
    for k in ("x", "model_output", "prev", "prev2", "noise"):
        if kw.get(k) is not None:
            kw[k].requires_grad_()
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, _op_args(kw))


def test_compiled_sampling_loop_has_no_graph_break():
    """A DDIM loop with a tiny model under torch.compile(fullgraph=True) equals eager."""
    ab = fastdiff.schedules.alphas_cumprod(fastdiff.schedules.betas("linear", 1000))
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    timesteps = list(range(999, -1, -100))

    def loop(x):
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
            eps = net(x)
            x = fastdiff.ops.ddim_step(eps, t, x, ab, prev_timestep=t_prev, eta=1.0, seed=t)
        return x

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eager = loop(x)
        compiled = torch.compile(loop, fullgraph=True, backend="inductor")(x)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


class TestValidation:
    def setup_method(self):
        self.x = torch.randn(2, 3, 4)
        self.m = torch.randn(2, 3, 4)
        self.c = torch.zeros(2, NUM_COEFS)

    @pytest.mark.parametrize("kwargs, err, match", [
        (dict(model_output=torch.randn(2, 3, 5)), ValueError, r"model_output must have shape \(2, 3, 4\)"),
        (dict(model_output=torch.randn(2, 3, 4), guidance_scale=3.0), ValueError,
         r"model_output must have shape \(4, 3, 4\)"),
        (dict(model_output=None, guidance_scale=3.0), ValueError, "guidance_scale needs model_output"),
        (dict(prev=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "prev must be float16"),
        (dict(noise=torch.randn(2, 3, 4), seed=1), ValueError, "noise or seed, not both"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=torch.tensor([1.0])), TypeError, "seed must be a one-element int"),
        (dict(coefs=torch.zeros(2, 8)), ValueError, r"coefs must have shape \(rows, 9\)"),
        (dict(coefs=torch.zeros(3, NUM_COEFS)), ValueError, "coefs needs 1 or 2"),
        (dict(coefs=torch.zeros(2, NUM_COEFS, dtype=torch.float16)), TypeError, "coefs must be a float32"),
        (dict(index=torch.tensor([0, 2])), IndexError, r"index values must be in \[0, 2\)"),
        (dict(index=torch.tensor([0, -1])), IndexError, "index values"),
        (dict(index=torch.tensor([0.0, 1.0])), TypeError, "index must be an int32/int64"),
        (dict(index=torch.tensor([0])), ValueError, r"index must have shape \(2,\)"),
        (dict(clip_range=(1.0, -1.0)), ValueError, "clip_min"),
        (dict(guidance_scale="7"), TypeError, "guidance_scale must be a Python float"),
    ])
    def test_bad_input(self, kwargs, err, match):
        args = dict(x=self.x, model_output=self.m, coefs=self.c)
        args.update(kwargs)
        with pytest.raises(err, match=match):
            sampler_step(**args)

    def test_integer_x(self):
        with pytest.raises(TypeError, match="x must be float16"):
            sampler_step(torch.ones(2, 3, dtype=torch.int32), None, self.c)

    def test_forced_backend_that_cannot_run_says_why(self):
        with use_backend("cuda"):
            with pytest.raises(BackendNotSupportedError, match="'cuda' cannot run fastdiff::sampler_step"):
                sampler_step(self.x, self.m, self.c)


@pytest.mark.cuda
def test_cuda_graph_capture_of_a_50_step_loop():
    """A whole fixed-step sampling loop replays from a CUDA graph with fresh noise."""
    device = "cuda"
    ab = fastdiff.schedules.alphas_cumprod(fastdiff.schedules.betas("linear", 1000)).to(device)
    steps = list(range(980, -1, -20))
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(device)
    x_in = torch.randn(4, 3, 16, 16, device=device)
    seed = torch.tensor([7], device=device)

    def loop():
        x = x_in
        for i, t in enumerate(steps):
            x = fastdiff.ops.ddpm_step(net(x), t, x, ab, prev_timestep=t - 20, seed=seed + i)
        return x

    with torch.no_grad():
        eager = loop()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            loop()  # warm up (Triton compiles, allocator pools) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = loop()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_out, eager)
        seed.fill_(8)
        graph.replay()
        torch.cuda.synchronize()
        assert (static_out != eager).float().mean() > 0.9
