"""The sampler updates built on sampler_step, against diffusers and k-diffusion's math."""

import math

import pytest
import torch

import fastdiff
from fastdiff import ops, schedules, use_backend
from fastdiff.testing import assert_close, backends_for, max_rel_error, no_cuda_sync

CPU_BACKENDS = [b for b in backends_for("cpu") if b != "triton"]  # triton: see test_sampler_step


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------
# Timestep space: diffusers
# --------------------------------------------------------------------------

def _diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(backend, prediction_type, variance_type, clip):
    sched = _diffusers().DDPMScheduler(prediction_type=prediction_type,
                                       variance_type=variance_type, clip_sample=clip)
    x, m = _randn(3, 3, 8, 8, seed=1), _randn(3, 3, 8, 8, seed=2)
    for t in (999, 500, 1, 0):
        expected = sched.step(m, t, x, generator=torch.Generator().manual_seed(5))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        out, x0 = ops.ddpm_step(m, t, x, sched.alphas_cumprod, prediction_type=prediction_type,
                                variance_type=variance_type,
                                clip_sample_range=1.0 if clip else None,
                                noise=noise, return_x0=True)
        # diffusers computes 1 - ᾱ_t/ᾱ_{t-1} in fp32 (cancellation near t = 0):
        # its own error is up to ~7e-5 relative, hence 1e-4 here.
        assert max_rel_error(out, expected.prev_sample) < 1e-4, t
        assert max_rel_error(x0, expected.pred_original_sample) < 1e-4, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip, use_clipped", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_step_matches_diffusers(backend, prediction_type, eta, clip, use_clipped, set_alpha_to_one):
    sched = _diffusers().DDIMScheduler(prediction_type=prediction_type, clip_sample=clip,
                                       set_alpha_to_one=set_alpha_to_one)
    sched.set_timesteps(50)
    x, m = _randn(3, 3, 8, 8, seed=1), _randn(3, 3, 8, 8, seed=2)
    for t in sched.timesteps[[0, 25, -1]].tolist():
        expected = sched.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped,
                              generator=torch.Generator().manual_seed(5))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        out, x0 = ops.ddim_step(m, t, x, sched.alphas_cumprod, prev_timestep=t - 20, eta=eta,
                                prediction_type=prediction_type,
                                clip_sample_range=1.0 if clip else None,
                                use_clipped_model_output=use_clipped,
                                final_alpha_cumprod=float(sched.final_alpha_cumprod),
                                noise=noise, return_x0=True)
        assert max_rel_error(out, expected.prev_sample) < 1e-5, t
        assert max_rel_error(x0, expected.pred_original_sample) < 1e-5, t


def test_ddpm_step_is_exact_in_float64(backend):
    """Against the closed form of Ho et al. eq. 7 evaluated in float64."""
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000).double())
    x, m, z = (_randn(4, 2, 5, 5, seed=s, dtype=torch.float64) for s in (1, 2, 3))
    t = torch.tensor([999, 400, 1, 0])
    out = ops.ddpm_step(m, t, x, ab, noise=z)
    ab_t = ab[t].view(-1, 1, 1, 1)
    ab_p = torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones(())).view(-1, 1, 1, 1)
    beta = 1 - ab_t / ab_p
    x0 = (x - (1 - ab_t).sqrt() * m) / ab_t.sqrt()
    mean = ab_p.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_p) / (1 - ab_t) * x
    std = ((1 - ab_p) / (1 - ab_t) * beta).sqrt() * (t > 0).view(-1, 1, 1, 1)
    assert_close(out, mean + std * z, rtol=1e-12, atol=1e-12)


def test_per_sample_timesteps_equal_separate_calls(backend):
    ab = schedules.alphas_cumprod(schedules.betas("scaled_linear", 1000, 0.00085, 0.012))
    x, m = _randn(3, 4, 6, 6, seed=1), _randn(3, 4, 6, 6, seed=2)
    t = torch.tensor([900, 450, 3])
    batched = ops.ddim_step(m, t, x, ab, prev_timestep=t - 50)
    for i, ti in enumerate(t.tolist()):
        single = ops.ddim_step(m[i:i + 1], ti, x[i:i + 1], ab, prev_timestep=ti - 50)
        assert_close(batched[i:i + 1], single)


def test_guidance_equals_combining_first(backend):
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    x = _randn(2, 3, 5, 5, seed=1)
    eps_u, eps_c = _randn(2, 3, 5, 5, seed=2), _randn(2, 3, 5, 5, seed=3)
    w = 7.5
    fused = ops.ddpm_step(torch.cat([eps_u, eps_c]), 500, x, ab, guidance_scale=w, seed=3)
    plain = ops.ddpm_step(eps_u + w * (eps_c - eps_u), 500, x, ab, seed=3)
    assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_add_noise_matches_diffusers(backend):
    sched = _diffusers().DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = _randn(4, 3, 8, 8, seed=1), _randn(4, 3, 8, 8, seed=2)
    t = torch.tensor([0, 10, 500, 999])
    assert_close(ops.add_noise(x0, noise, t, sched.alphas_cumprod),
                 sched.add_noise(x0, noise, t), rtol=1e-6)


def test_add_noise_gradient_reaches_x0(backend):
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    x0 = _randn(2, 3, 4, 4, seed=1).requires_grad_()
    noise = _randn(2, 3, 4, 4, seed=2)
    ops.add_noise(x0, noise, torch.tensor([0, 999]), ab).sum().backward()
    expected = ab[[0, 999]].sqrt().view(2, 1, 1, 1).expand_as(x0)
    assert_close(x0.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_noise_matches_its_formula(backend, dtype):
    """Per-sample t (negative: x0 itself), an int t, fp64 and bf16 samples: the kept
    (T + 1)-row table read at t + 1 is sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
    ab = schedules.alphas_cumprod(schedules.betas("scaled_linear", 50))
    x0, noise = _randn(4, 3, 5, 7, seed=1, dtype=dtype), _randn(4, 3, 5, 7, seed=2, dtype=dtype)
    t = torch.tensor([-1, 0, 17, 49])
    ab_t = torch.cat([torch.ones(1, dtype=torch.float64), ab.double()])[t + 1].view(-1, 1, 1, 1)
    truth = ab_t.sqrt() * x0.double() + (1 - ab_t).sqrt() * noise.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    with use_backend(backend):
        got = ops.add_noise(x0, noise, t, ab)
        assert torch.equal(got[0], x0[0])
        assert_close(got, truth.to(dtype), truth=truth, rtol=tol, atol=tol)
        assert torch.equal(ops.add_noise(x0, noise, t, ab), got)  # the kept table
        assert torch.equal(ops.add_noise(x0, noise, 17, ab), ops.add_noise(x0, noise, torch.full((4,), 17), ab))


def test_add_noise_table_follows_its_alphas(monkeypatch):
    """The kept table belongs to the ᾱ tensor as it was: an in-place change builds a new
    one; an inference-mode ᾱ's table is not kept."""
    from fastdiff.ops import steps

    monkeypatch.setattr(steps, "_TABLES", steps._Kept(16))
    ab = schedules.alphas_cumprod(schedules.betas("linear", 100))
    x0, noise, t = _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2), torch.tensor([10, 60])
    first = ops.add_noise(x0, noise, t, ab)
    assert len(steps._TABLES.entries) == 1
    with torch.no_grad():
        ab[60] = 0.5
    changed = ops.add_noise(x0, noise, t, ab)
    assert torch.equal(changed[0], first[0]) and not torch.equal(changed[1], first[1])
    assert_close(changed[1], 0.5**0.5 * (x0[1] + noise[1]))
    with torch.inference_mode():
        table = ab.clone()
        size = len(steps._TABLES.entries)
        assert torch.equal(ops.add_noise(x0, noise, t, table), changed)
        assert len(steps._TABLES.entries) == size


def test_add_noise_argument_errors():
    ab = schedules.alphas_cumprod(schedules.betas("linear", 10))
    x = torch.zeros(2, 3)
    with pytest.raises(IndexError, match=r"add_noise: timesteps must be < 10 \(the length of alphas_cumprod\), got 10"):
        ops.add_noise(x, x, torch.tensor([3, 10]), ab)
    with pytest.raises(TypeError, match="add_noise: alphas_cumprod must be a non-empty 1-D floating-point tensor"):
        ops.add_noise(x, x, 3, ab.view(2, 5))
    with pytest.raises(TypeError, match="alphas_cumprod must be"):
        ops.add_noise(x, x, 3, torch.arange(10))
    with pytest.raises(TypeError, match="timesteps must hold integers"):
        ops.add_noise(x, x, torch.tensor([1.0, 2.0]), ab)
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or have shape \(2,\)"):
        ops.add_noise(x, x, torch.tensor([1, 2, 3]), ab)


def test_add_noise_compiles_without_graph_breaks():
    ab = schedules.alphas_cumprod(schedules.betas("linear", 100))
    x0, noise, t = _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2), torch.tensor([-1, 99])
    torch._dynamo.reset()
    compiled = torch.compile(ops.add_noise, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x0, noise, t, ab), ops.add_noise(x0, noise, t, ab))


@pytest.mark.cuda
def test_add_noise_does_not_synchronize():
    """Per-sample timesteps on the GPU with the ᾱ table there: the table is made once,
    then each call is launches only."""
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000)).cuda()
    x0 = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    expected = ops.add_noise(x0, x0, t, ab)  # makes the table
    with no_cuda_sync():
        got = ops.add_noise(x0, x0, t, ab)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------
# σ space: k-diffusion's samplers, transcribed (their package imports torchvision)
# --------------------------------------------------------------------------


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def kd_sample_euler(model, x, sigmas, s_churn=0.0, noises=None):
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_churn else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + noises[i] * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat)
        x = x + _to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


def kd_sample_euler_ancestral(model, x, sigmas, eta, noises):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        s, sn = sigmas[i], sigmas[i + 1]
        sigma_up = min(sn, eta * (sn**2 * (s**2 - sn**2) / s**2) ** 0.5)
        sigma_down = (sn**2 - sigma_up**2) ** 0.5
        x = x + _to_d(x, s, denoised) * (sigma_down - s)
        if sn > 0:
            x = x + noises[i] * sigma_up
    return x


def kd_sample_heun(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def kd_sample_dpmpp_2m(model, x, sigmas):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else math.inf
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
        else:
            h_last = t - (-math.log(sigmas[i - 1]))
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


class GaussianDenoiser:
    """The exact denoiser of data ~ N(mu, s² I): D(x, σ) = mu + s²/(s²+σ²) (x - mu)."""

    def __init__(self, mu, s=0.5):
        self.mu, self.s2 = mu, s**2

    def __call__(self, x, sigma):
        return self.mu + self.s2 / (self.s2 + sigma**2) * (x - self.mu)


SIGMAS = [float(s) for s in schedules.karras_sigmas(12, 0.002, 80.0)] + [0.0]


def _setup(dtype=torch.float64):
    mu = _randn(2, 3, 8, 8, seed=7, dtype=dtype)
    x = _randn(2, 3, 8, 8, seed=8, dtype=dtype) * SIGMAS[0]
    noises = [_randn(2, 3, 8, 8, seed=100 + i, dtype=dtype) for i in range(len(SIGMAS))]
    return GaussianDenoiser(mu), x, noises


@pytest.mark.parametrize("s_churn", [0.0, 5.0])
def test_euler_trajectory_matches_k_diffusion(backend, s_churn):
    model, x, noises = _setup()
    x_ref = kd_sample_euler(model, x, SIGMAS, s_churn, noises)
    n = len(SIGMAS) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_churn else 0.0
        sigma_hat = SIGMAS[i] * (gamma + 1)
        if gamma > 0:
            x = ops.churn(x, SIGMAS[i], sigma_hat, noise=noises[i])
        x = ops.euler_step(model(x, sigma_hat), x, sigma_hat, SIGMAS[i + 1])
    assert_close(x, x_ref, rtol=1e-10, atol=1e-10)


def test_euler_ancestral_trajectory_matches_k_diffusion(backend):
    model, x, noises = _setup()
    x_ref = kd_sample_euler_ancestral(model, x, SIGMAS, 1.0, noises)
    for i in range(len(SIGMAS) - 1):
        x = ops.euler_ancestral_step(model(x, SIGMAS[i]), x, SIGMAS[i], SIGMAS[i + 1],
                                     noise=noises[i])
    assert_close(x, x_ref, rtol=1e-10, atol=1e-10)


def test_heun_trajectory_matches_k_diffusion(backend):
    model, x, _ = _setup()
    assert_close(_heun_sample(model, x, SIGMAS), kd_sample_heun(model, x, SIGMAS),
                 rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_trajectory_matches_k_diffusion(backend):
    model, x, _ = _setup()
    assert_close(_dpmpp_2m_sample(model, x, SIGMAS), kd_sample_dpmpp_2m(model, x, SIGMAS),
                 rtol=1e-10, atol=1e-10)


def _heun_sample(model, x, sigmas):
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        x_mid, denoised = ops.euler_step(model(x, s), x, s, sn, return_x0=True)
        x = x_mid if sn == 0 else ops.heun_step(model(x_mid, sn), x_mid, x, denoised, s, sn)
    return x


def _dpmpp_2m_sample(model, x, sigmas):
    denoised = None
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x, denoised = ops.dpmpp_2m_step(model(x, s), x, s, sn, sigma_prev=sigmas[i - 1] if i else None,
                                        denoised_prev=denoised)
    return x


@pytest.mark.parametrize("sampler", [_heun_sample, _dpmpp_2m_sample], ids=["heun", "dpmpp_2m"])
def test_second_order_samplers_converge_to_the_exact_ode_solution(backend, sampler):
    """For Gaussian data the probability-flow ODE has a closed form:
    x(0) = mu + s / sqrt(s² + σ_max²) (x(σ_max) - mu).  Both samplers must
    approach it at second order (error / 6 or better for 2.5x the steps)."""
    model, x, _ = _setup()
    exact = model.mu + (model.s2 / (model.s2 + 80.0**2)) ** 0.5 * (x - model.mu)
    errors = []
    for n in (40, 100):
        sigmas = [float(v) for v in schedules.karras_sigmas(n, 0.002, 80.0)] + [0.0]
        errors.append((sampler(model, x, sigmas) - exact).abs().max().item() / model.s2**0.5)
    assert errors[0] < 0.06 and errors[1] < errors[0] / 6, errors


def test_sigma_steps_in_float32_match_float64(backend):
    """Every σ-space step in fp32 lands within fp32 rounding of its fp64 run."""
    model64, x64, _ = _setup(torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        model = GaussianDenoiser(model64.mu.to(dtype))
        results.append(_dpmpp_2m_sample(model, x64.to(dtype), SIGMAS))
    assert max_rel_error(results[1], results[0]) < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sigma_prediction_types_convert_to_denoised(backend, prediction_type):
    """ε and v outputs of the exact model give the same Euler step as its D."""
    model, x, _ = _setup()
    s, sn = SIGMAS[3], SIGMAS[4]
    d = model(x, s)
    if prediction_type == "epsilon":
        m = (x - d) / s
    else:  # diffusers' v for σ-space: x0 = x/(σ²+1) - σ m/sqrt(σ²+1)
        m = (x / (s**2 + 1) - d) * (s**2 + 1) ** 0.5 / s
    got = ops.euler_step(m, x, s, sn, prediction_type=prediction_type)
    assert_close(got, ops.euler_step(d, x, s, sn), rtol=1e-10, atol=1e-10)


# σ as Python numbers: one row built on the host (the *_coefs formulas on float64 CPU
# tensors), kept per step; σ as per-sample tensors: the rows built on the device.
_NUMBER_STEPS = {
    "euler": lambda m, x, d, s, sn, **k: ops.euler_step(m, x, s, sn, **k),
    "euler_clip": lambda m, x, d, s, sn, **k: ops.euler_step(m, x, s, sn, clip_range=(-1.0, 1.0), **k),
    "euler_ancestral": lambda m, x, d, s, sn, **k: ops.euler_ancestral_step(m, x, s, sn, eta=0.7, noise=d, **k),
    "heun": lambda m, x, d, s, sn, **k: ops.heun_step(m, x, x * 0.9, d, s, sn, **k),
    "dpmpp_2m": lambda m, x, d, s, sn, **k: ops.dpmpp_2m_step(m, x, s, sn, sigma_prev=s * 1.3,
                                                             denoised_prev=d, **k)[0],
    "churn": lambda m, x, d, s, sn, **k: ops.churn(x, sn, s, noise=d),
}


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", sorted(_NUMBER_STEPS))
def test_sigma_numbers_and_tensors_give_the_same_step(backend, dtype, prediction_type, kind):
    g = torch.Generator().manual_seed(3)
    x, m, d = (torch.randn(3, 2, 5, 4, generator=g, dtype=dtype) for _ in range(3))
    s, sn = 2.5, 1.75
    kw = {} if kind == "churn" else {"prediction_type": prediction_type}
    step = _NUMBER_STEPS[kind]
    with use_backend(backend):
        by_number = step(m, x, d, s, sn, **kw)
        again = step(m, x, d, s, sn, **kw)  # the kept row
        by_tensor = step(m, x, d, torch.full((3,), s, dtype=torch.float64),
                         torch.full((3,), sn, dtype=torch.float64), **kw)
    assert torch.equal(by_number, again)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    assert_close(by_number, by_tensor, **tol)


def test_sigma_number_rows_are_kept_and_bounded(monkeypatch):
    from fastdiff.ops import steps

    monkeypatch.setattr(steps, "_ROWS", steps._Kept(4))
    seen = []
    real = steps.sampler_step
    monkeypatch.setattr(steps, "sampler_step", lambda x, m, coefs, *a, **k: seen.append(coefs) or real(x, m, coefs, *a, **k))
    x = torch.randn(2, 3, 4, 4)
    ops.euler_step(x, x, 2.0, 1.0)
    ops.euler_step(x, x, 2.0, 1.0)
    assert seen[0] is seen[1] and seen[0].shape == (1, ops.NUM_COEFS) and seen[0].dtype == torch.float32
    ops.euler_step(x.double(), x.double(), 2.0, 1.0)  # another opmath dtype: another row
    assert seen[2].dtype == torch.float64 and len(steps._ROWS.entries) == 2
    for i in range(10):
        ops.heun_step(x, x, x, x, 3.0 + i, 1.0)
    assert len(steps._ROWS.entries) == 4
    ops.euler_step(x, x, 2.0, 1.0)  # dropped as least recently used: built again
    assert seen[-1] is not seen[0] and torch.equal(seen[-1], seen[0])


def test_sigma_number_steps_compile_without_graph_breaks():
    """Under torch.compile the rows are traced as device ops (fullgraph)."""
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    sigmas = [14.6, 6.1, 2.3, 0.7, 0.0]

    def loop(x):
        for s, sn in zip(sigmas, sigmas[1:]):
            d = net(x)
            x_2, d = ops.euler_step(d, x, s, sn, return_x0=True)
            x = x_2 if sn == 0 else ops.heun_step(net(x_2), x_2, x, d, s, sn)
        return x

    x = torch.randn(2, 3, 8, 8) * sigmas[0]
    with torch.no_grad():
        eager = loop(x)
        torch._dynamo.reset()
        compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("step", [
    dict(kind="ddpm", prediction_type="epsilon", variance_type="fixed_small"),
    dict(kind="ddpm", prediction_type="v_prediction", variance_type="fixed_large"),
    dict(kind="ddpm", prediction_type="sample", variance_type="fixed_small_log"),
    dict(kind="ddim", prediction_type="epsilon", eta=0.0),
    dict(kind="ddim", prediction_type="v_prediction", eta=0.8, use_clipped_model_output=True),
], ids=lambda d: "-".join(str(v) for v in d.values()))
def test_int_timesteps_and_tensor_timesteps_give_the_same_step(backend, step):
    """Int timesteps with a CPU ᾱ table (the row read on the host and kept) and
    per-sample timestep tensors (rows built as tensor ops) agree; prev < 0 included."""
    step = dict(step)
    fn = ops.ddpm_step if step.pop("kind") == "ddpm" else ops.ddim_step
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    g = torch.Generator().manual_seed(5)
    x, m, z = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    with use_backend(backend):
        for t, prev in ((999, 979), (500, None), (10, -1)):
            by_int = fn(m, t, x, ab, prev_timestep=prev, noise=z, **step)
            kept = fn(m, t, x, ab, prev_timestep=prev, noise=z, **step)
            by_tensor = fn(m, torch.full((3,), t), x, ab,
                           prev_timestep=None if prev is None else torch.full((3,), prev), noise=z, **step)
            assert torch.equal(by_int, kept)
            assert_close(by_int, by_tensor, rtol=1e-6, atol=1e-6)


def test_int_timestep_rows_follow_their_table(monkeypatch):
    """A kept row belongs to its ᾱ table object as it was: an in-place change of the table,
    another table, or a stale entry (a table freed and its id reused) builds a new row; an
    inference-mode table's rows are not kept."""
    import weakref

    from fastdiff.ops import steps

    monkeypatch.setattr(steps, "_ROWS", steps._Kept(4096))
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    first = ops.ddim_step(m, 500, x, ab, prev_timestep=480)
    with torch.no_grad():
        ab[500] *= 0.9  # in place: the kept row must not be used
    changed = ops.ddim_step(m, 500, x, ab, prev_timestep=480)
    assert not torch.equal(first, changed)
    fresh = ab.clone()
    assert torch.equal(ops.ddim_step(m, 500, x, fresh, prev_timestep=480), changed)

    # a stale entry under this table's key (as if a freed table's id had been reused)
    key = next(k for k in steps._ROWS.entries if k[-2] == id(fresh))
    other = torch.zeros(1)
    steps._ROWS.entries[key] = (torch.full((1, ops.NUM_COEFS), 7.0), weakref.ref(other))
    assert torch.equal(ops.ddim_step(m, 500, x, fresh, prev_timestep=480), changed)

    with torch.inference_mode():
        table = schedules.alphas_cumprod(schedules.betas("linear", 1000))
        size = len(steps._ROWS.entries)
        got = ops.ddim_step(m, 500, x, table, prev_timestep=480)
        assert len(steps._ROWS.entries) == size
    assert torch.equal(got, first)


@pytest.mark.cuda
def test_int_timesteps_with_a_cpu_table_do_not_synchronize():
    """The README's loop with x on the GPU and ᾱ on the CPU: no host sync per step."""
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    x = torch.randn(4, 3, 16, 16, device="cuda")
    ops.ddim_step(x, 999, x, ab, prev_timestep=979, eta=1.0, seed=1)  # warm-up
    with no_cuda_sync():
        for t in range(999, -1, -20):
            x = ops.ddim_step(x * 0.1, t, x, ab, prev_timestep=t - 20, eta=1.0, seed=t)
    assert torch.isfinite(x).all()


def test_per_sample_step_tables_follow_their_alphas(monkeypatch):
    """Per-sample timesteps: the DDPM / DDIM rows (default prev) and the ᾱ table of a
    given prev are made once per ᾱ tensor and kept while it lives unmodified."""
    from fastdiff.ops import steps

    monkeypatch.setattr(steps, "_TABLES", steps._Kept(32))
    ab = schedules.alphas_cumprod(schedules.betas("linear", 100))
    x, m = _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2)
    t = torch.tensor([10, 60])
    calls = (lambda: ops.ddpm_step(m, t, x, ab), lambda: ops.ddim_step(m, t, x, ab),
             lambda: ops.ddim_step(m, t, x, ab, prev_timestep=t - 7))
    first = [call() for call in calls]
    assert len(steps._TABLES.entries) == 3
    assert all(torch.equal(call(), out) for call, out in zip(calls, first))
    assert len(steps._TABLES.entries) == 3
    with torch.no_grad():
        ab[60] = 0.5
        ab[53] = 0.6
    changed = [call() for call in calls]
    for out, new in zip(first, changed):
        assert torch.equal(new[0], out[0]) and not torch.equal(new[1], out[1])
    # sample 1 at t = 60, ᾱ_t = 0.5: DDIM ε-prediction x0 = (x - sqrt(0.5) m) / sqrt(0.5)
    x0 = (x[1] - 0.5**0.5 * m[1]) / 0.5**0.5
    assert_close(changed[2][1], 0.6**0.5 * x0 + 0.4**0.5 * m[1], rtol=1e-5, atol=1e-5)
    assert len(steps._TABLES.entries) == 6


def test_per_sample_step_argument_errors():
    ab = schedules.alphas_cumprod(schedules.betas("linear", 10))
    x = torch.zeros(2, 3)
    with pytest.raises(IndexError, match=r"ddpm_step: timestep must be < 10 \(the length of alphas_cumprod\), got 10"):
        ops.ddpm_step(x, torch.tensor([3, 10]), x, ab)
    with pytest.raises(IndexError, match=r"ddim_step: prev_timestep must be < 10 .*got 12"):
        ops.ddim_step(x, torch.tensor([3, 4]), x, ab, prev_timestep=torch.tensor([12, 0]))
    with pytest.raises(IndexError, match=r"ddim_step: timestep must be < 10"):
        ops.ddim_step(x, 10, x, ab.cuda() if torch.cuda.is_available() else ab.to("meta"))
    with pytest.raises(TypeError, match="ddim_step: alphas_cumprod must be a non-empty 1-D floating-point tensor"):
        ops.ddim_step(x, 3, x, [0.9, 0.5])
    with pytest.raises(TypeError, match="ddpm_step: alphas_cumprod must be"):
        ops.ddpm_step(x, 3, x, torch.arange(10))


@pytest.mark.parametrize("prev", [None, "tensor"])
def test_per_sample_steps_compile_without_graph_breaks(prev):
    ab = schedules.alphas_cumprod(schedules.betas("linear", 100))
    x, m = _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2)
    t = torch.tensor([0, 99])
    kwargs = {} if prev is None else dict(prev_timestep=t - 20)

    def step(m, t, x, ab):
        return ops.ddim_step(m, t, x, ab, eta=0.5, noise=x, **kwargs) + ops.ddpm_step(m, t, x, ab, noise=x)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(m, t, x, ab), step(m, t, x, ab))


@pytest.mark.cuda
def test_per_sample_steps_do_not_synchronize():
    """Per-sample timesteps on the GPU with the ᾱ table on the CPU: the tables are made
    once, then each call is launches only."""
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    x = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.randint(20, 1000, (4,), device="cuda")
    calls = (lambda: ops.ddpm_step(x, t, x, ab, seed=1), lambda: ops.ddim_step(x, t, x, ab),
             lambda: ops.ddim_step(x, t, x, ab, prev_timestep=t - 20))
    expected = [call() for call in calls]  # makes the tables
    with no_cuda_sync():
        got = [call() for call in calls]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_filled_row():
    from fastdiff.ops.steps import filled_row

    row = filled_row([0.0, 1.5, 0.0, -2.0, 0, 0, 0, 0, 3.0], torch.float32, torch.device("cpu"))
    assert row.shape == (1, 9) and row.tolist() == [[0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]


def test_step_argument_errors():
    ab = schedules.alphas_cumprod(schedules.betas("linear", 10))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction'"):
        ops.ddpm_step(x, 5, x, ab, prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        ops.ddpm_step(x, 5, x, ab, variance_type="learned")
    with pytest.raises(TypeError, match="timestep must hold integers"):
        ops.ddpm_step(x, torch.tensor([1.0, 2.0]), x, ab)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \(2,\)"):
        ops.ddpm_step(x, torch.tensor([1, 2, 3]), x, ab)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ops.ddim_step(x, 5, x, ab, eta=-1.0)
    with pytest.raises(ValueError, match="give both sigma_prev and denoised_prev"):
        ops.dpmpp_2m_step(x, x, 1.0, 0.5, sigma_prev=2.0)
    with pytest.raises(TypeError, match="sigma must be a number or a tensor"):
        ops.euler_step(x, x, "1.0", 0.5)


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs", [
    ("linear", {}),
    ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("squaredcos_cap_v2", {}),
    ("sigmoid", {}),
])
@pytest.mark.parametrize("rescale", [False, True])
def test_betas_match_diffusers(kind, kwargs, rescale):
    sched = _diffusers().DDPMScheduler(beta_schedule=kind, rescale_betas_zero_snr=rescale, **kwargs)
    got = schedules.betas(kind, 1000, rescale_zero_snr=rescale, **kwargs)
    assert torch.equal(got, sched.betas)
    assert torch.equal(schedules.alphas_cumprod(got), sched.alphas_cumprod)


def test_schedule_properties():
    ab = schedules.alphas_cumprod(schedules.betas("cosine", 1000))
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < ab[0] < 1
    zsnr = schedules.alphas_cumprod(schedules.betas("linear", 1000, rescale_zero_snr=True))
    assert zsnr[-1] == 0 and torch.isclose(zsnr[0], schedules.alphas_cumprod(schedules.betas())[0])
    sig = schedules.sigmas_from_alphas_cumprod(ab)
    assert torch.allclose(1 / (1 + sig**2), ab)


def test_karras_sigmas():
    s = schedules.karras_sigmas(18, 0.002, 80.0, rho=7.0)
    assert s.shape == (18,)
    assert math.isclose(s[0].item(), 80.0, rel_tol=1e-6) and math.isclose(s[-1].item(), 0.002, rel_tol=1e-5)
    inv = s ** (1 / 7)
    assert torch.allclose(inv[1:] - inv[:-1], (inv[1] - inv[0]).expand(17), rtol=1e-4)
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        schedules.karras_sigmas(5, 1.0, 0.5)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule kind 'quadratic'; valid kinds are 'linear'"):
        schedules.betas("quadratic")


def test_public_names():
    for name in ("ddpm_step", "ddim_step", "euler_step", "euler_ancestral_step", "heun_step",
                 "dpmpp_2m_step", "add_noise", "churn", "sampler_step"):
        assert callable(getattr(fastdiff.ops, name))
