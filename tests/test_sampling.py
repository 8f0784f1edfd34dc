"""fastdiff.sampling against transcribed k-diffusion / EDM / NCSN references and
the exact denoiser of a Gaussian mixture."""

import numpy as np
import pytest
import torch
from torch import nn

from fastdiff import sampling
from fastdiff.sampling import (
    CFGDenoiser,
    PhiloxNoiseSampler,
    annealed_langevin,
    edm_sampler,
    get_sigmas_geometric,
    get_sigmas_karras,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from fastdiff.testing import max_rel_error
from fastdiff.training import EDMPrecond, iDDPMPrecond

# --------------------------------------------------------------------------
# References, transcribed.
#
# k-diffusion: k_diffusion/sampling.py of the PyPI wheel k_diffusion-0.1.1.post1
# (`pip download --no-deps k-diffusion`; its package __init__ imports
# torchvision, which has no CPU build here, so the functions are copied).  The
# only change: `trange(n, disable=disable)` is `range(n)`.
# --------------------------------------------------------------------------


def kd_append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def kd_get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Constructs the noise schedule of Karras et al. (2022)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return kd_append_zero(sigmas).to(device)


def kd_append_dims(x, target_dims):
    dims_to_append = target_dims - x.ndim
    return x[(...,) + (None,) * dims_to_append]


def kd_to_d(x, sigma, denoised):
    return (x - denoised) / kd_append_dims(sigma, x.ndim)


def kd_get_ancestral_step(sigma_from, sigma_to, eta=1.):
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def kd_default_noise_sampler(x):
    return lambda sigma, sigma_next: torch.randn_like(x)


@torch.no_grad()
def kd_sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = kd_to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat, 'denoised': denoised})
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


@torch.no_grad()
def kd_sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = kd_default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = kd_get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        d = kd_to_d(x, sigmas[i], denoised)
        dt = sigma_down - sigmas[i]
        x = x + d * dt
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def kd_sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = kd_to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat, 'denoised': denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = kd_to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


@torch.no_grad()
def kd_sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


# NVlabs/edm generate.py `edm_sampler`, verbatim.
def edm_edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
):
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next


# NCSNv2 models/__init__.py `anneal_Langevin_dynamics` with final_only=True; the
# diagnostics it only prints (grad/noise/image norms, snr) are left out.
@torch.no_grad()
def ncsn_anneal_Langevin_dynamics(x_mod, scorenet, sigmas, n_steps_each=200, step_lr=0.000008,
                                  final_only=False, verbose=False, denoise=True):
    images = []
    with torch.no_grad():
        for c, sigma in enumerate(sigmas):
            labels = torch.ones(x_mod.shape[0], device=x_mod.device) * c
            labels = labels.long()
            step_size = step_lr * (sigma / sigmas[-1]) ** 2
            for s in range(n_steps_each):
                grad = scorenet(x_mod, labels)
                noise = torch.randn_like(x_mod)
                x_mod = x_mod + step_size * grad + noise * np.sqrt(step_size * 2)
                if not final_only:
                    images.append(x_mod.to('cpu'))
        if denoise:
            last_noise = (len(sigmas) - 1) * torch.ones(x_mod.shape[0], device=x_mod.device)
            last_noise = last_noise.long()
            x_mod = x_mod + sigmas[-1] ** 2 * scorenet(x_mod, last_noise)
            images.append(x_mod.to('cpu'))
        if final_only:
            return [x_mod.to('cpu')]
        return images


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class ToyDenoiser(nn.Module):
    """A small nonlinear denoiser D(x, σ; cond) of images (B, 3, H, W)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(1234)
        self.conv = nn.Conv2d(3, 3, 3, padding=1).to(dtype)
        self.calls = 0

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        h = torch.tanh(self.conv(x / (1 + s ** 2).sqrt()))
        if cond is not None:
            h = h + cond[:, :, None, None]
        return x / (1 + s ** 2) + h * s / (1 + s ** 2).sqrt()


class Inner(nn.Module):
    """The F of an EDM preconditioner: F(c_in x, c_noise, class_labels)."""

    def __init__(self, out_channels=3, label_dim=0):
        super().__init__()
        torch.manual_seed(99)
        self.conv = nn.Conv2d(3, out_channels, 3, padding=1)
        self.emb = nn.Linear(label_dim, out_channels) if label_dim else None

    def forward(self, x, c_noise, class_labels=None):
        h = self.conv(x) * torch.cos(c_noise).reshape(-1, 1, 1, 1)
        if self.emb is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        return torch.tanh(h)


def _start(dtype, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype)


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-6


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------


def test_get_sigmas_karras_equals_k_diffusion():
    for n in (1, 5, 18):
        assert torch.equal(get_sigmas_karras(n, 0.002, 80.0), kd_get_sigmas_karras(n, 0.002, 80.0))
    assert torch.equal(get_sigmas_karras(10, 0.03, 14.6, rho=5.0),
                       kd_get_sigmas_karras(10, 0.03, 14.6, rho=5.0))


def test_get_sigmas_geometric_equals_ncsn():
    expected = torch.tensor(np.exp(np.linspace(np.log(1.0), np.log(0.01), 10))).float()
    assert torch.equal(get_sigmas_geometric(10, 0.01, 1.0), expected)
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        get_sigmas_geometric(10, 1.0, 0.01)


# --------------------------------------------------------------------------
# k-diffusion parity
# --------------------------------------------------------------------------

KD_SAMPLERS = {
    "euler": (sample_euler, kd_sample_euler),
    "euler_ancestral": (sample_euler_ancestral, kd_sample_euler_ancestral),
    "heun": (sample_heun, kd_sample_heun),
    "dpmpp_2m": (sample_dpmpp_2m, kd_sample_dpmpp_2m),
}
KD_CASES = [
    ("euler", {}), ("euler", dict(s_churn=4.0)),
    ("euler", dict(s_churn=20.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007)),
    ("euler_ancestral", {}), ("euler_ancestral", dict(eta=0.5, s_noise=0.9)),
    ("euler_ancestral", dict(eta=0.0)),
    ("heun", {}), ("heun", dict(s_churn=20.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007)),
    ("dpmpp_2m", {}),
]


def _run_both(name, kwargs, dtype, seed=5, steps=12, **extra):
    ours, ref = KD_SAMPLERS[name]
    model = ToyDenoiser(dtype)
    sigmas = kd_get_sigmas_karras(steps, 0.002, 80.0).to(dtype)
    x = _start(dtype) * sigmas[0]
    results = []
    for fn in (ref, ours):
        torch.manual_seed(seed)
        results.append(fn(model, x, sigmas, disable=True, **kwargs, **extra))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name, kwargs", KD_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KD_CASES)])
def test_trajectory_matches_k_diffusion(name, kwargs, dtype):
    expected, got = _run_both(name, kwargs, dtype)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert max_rel_error(got, expected) < _tol(dtype)


@pytest.mark.parametrize("name", list(KD_SAMPLERS))
def test_callback_matches_k_diffusion(name):
    logs = ([], [])
    kwargs = dict(s_churn=4.0) if name in ("euler", "heun") else {}
    for log, fn in zip(logs, KD_SAMPLERS[name][::-1]):
        model = ToyDenoiser(torch.float64)
        sigmas = kd_get_sigmas_karras(6, 0.002, 80.0).double()
        torch.manual_seed(1)
        fn(model, _start(torch.float64) * 80, sigmas, callback=log.append, disable=True, **kwargs)
    expected, got = logs
    assert len(got) == len(expected) == 6
    for e, g in zip(expected, got):
        assert g.keys() == e.keys() == {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
        assert g['i'] == e['i']
        for key in ('sigma', 'sigma_hat'):
            assert isinstance(g[key], torch.Tensor) and torch.allclose(g[key], e[key], rtol=1e-12)
        for key in ('x', 'denoised'):
            assert max_rel_error(g[key], e[key]) < 1e-10


def test_noise_sampler_is_called_like_k_diffusion():
    calls = ([], [])
    for log, fn in zip(calls, (kd_sample_euler_ancestral, sample_euler_ancestral)):
        g = torch.Generator().manual_seed(0)

        def noise_sampler(sigma, sigma_next, log=log, g=g):
            log.append((float(sigma), float(sigma_next)))
            return torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)

        sigmas = kd_get_sigmas_karras(5, 0.002, 80.0).double()
        log.append(fn(ToyDenoiser(torch.float64), _start(torch.float64) * 80, sigmas,
                      noise_sampler=noise_sampler, disable=True, eta=0.7))
    (*ref_calls, ref_out), (*our_calls, our_out) = calls
    assert our_calls == ref_calls and len(our_calls) == 4  # not called onto σ = 0
    assert max_rel_error(our_out, ref_out) < 1e-10


def test_philox_noise_sampler_in_kernel_equals_materialized():
    """In-kernel noise (seed passed to the fused step) equals the same noise
    drawn as tensors and used by the reference loop."""
    sigmas = kd_get_sigmas_karras(8, 0.002, 80.0)
    x = _start(torch.float32) * 80
    model = ToyDenoiser()
    got = sample_euler_ancestral(model, x, sigmas, noise_sampler=PhiloxNoiseSampler(x, 42), disable=True)
    expected = kd_sample_euler_ancestral(model, x, sigmas, noise_sampler=PhiloxNoiseSampler(x, 42))
    assert max_rel_error(got, expected) < 1e-5
    other = sample_euler_ancestral(model, x, sigmas, noise_sampler=PhiloxNoiseSampler(x, 43), disable=True)
    assert max_rel_error(other, expected) > 1e-3
    z = PhiloxNoiseSampler(x, 7)(None, None)
    assert z.shape == x.shape and abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.2


@pytest.mark.parametrize("name", list(KD_SAMPLERS))
def test_sigmas_as_python_floats_give_the_same_result(name):
    ours = KD_SAMPLERS[name][0]
    sigmas = get_sigmas_karras(7, 0.002, 80.0)
    x = _start(torch.float32) * 80
    out = []
    for s in (sigmas, sigmas.tolist()):
        torch.manual_seed(0)
        out.append(ours(ToyDenoiser(), x, s, disable=True))
    assert torch.equal(out[0], out[1])


def test_progress_bar_by_default_and_disable(capsys):
    sigmas = get_sigmas_karras(3, 0.002, 80.0)
    x = _start(torch.float32)
    sample_euler(ToyDenoiser(), x, sigmas, disable=True)
    assert capsys.readouterr().err == ""
    sample_euler(ToyDenoiser(), x, sigmas, disable=False)
    assert "3/3" in capsys.readouterr().err


def test_sampler_argument_errors():
    x = _start(torch.float32)
    with pytest.raises(ValueError, match="at least 2 values"):
        sample_euler(ToyDenoiser(), x, [1.0], disable=True)
    with pytest.raises(ValueError, match="condition must be one of 'index', 'sigma'"):
        annealed_langevin(lambda x, c: x, x, [1.0, 0.1], condition="level")
    with pytest.raises(TypeError, match="cond_scale must be a Python float"):
        CFGDenoiser(ToyDenoiser(), x, x, torch.tensor(2.0))
    net = CFGDenoiser(EDMPrecond(Inner(label_dim=4), label_dim=4), torch.eye(4)[:2],
                      torch.zeros(2, 4), 2.0, cond_key="class_labels")
    with pytest.raises(ValueError, match="give the class labels to the wrapper"):
        edm_sampler(net, x, torch.eye(4)[:2])
    with pytest.raises(TypeError, match="seed must be an int"):
        PhiloxNoiseSampler(x, 1.5)


# --------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------


def _guided_reference(model, cond, uncond, scale):
    """CFG with two separate model calls: what the wrapper must equal."""
    def guided(x, sigma):
        u = model(x, sigma, cond=uncond)
        c = model(x, sigma, cond=cond)
        return u + (c - u) * scale
    return guided


@pytest.mark.parametrize("name", list(KD_SAMPLERS))
def test_cfg_wrapper_equals_separate_cond_uncond_calls(name):
    ours, ref = KD_SAMPLERS[name]
    model = ToyDenoiser(torch.float64)
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(2, 3, generator=g).double(), torch.zeros(2, 3).double()
    sigmas = kd_get_sigmas_karras(8, 0.002, 80.0).double()
    x = _start(torch.float64) * 80
    kwargs = dict(s_churn=4.0) if name in ("euler", "heun") else {}
    logs = ([], [])
    torch.manual_seed(2)
    expected = ref(_guided_reference(model, cond, uncond, 4.0), x, sigmas, callback=logs[0].append, **kwargs)
    cfg = CFGDenoiser(model, cond, uncond, 4.0)
    model.calls = 0
    torch.manual_seed(2)
    got = ours(cfg, x, sigmas, callback=logs[1].append, disable=True, **kwargs)
    assert max_rel_error(got, expected) < 1e-10
    assert model.calls == (15 if name == "heun" else 8)  # one batched call per evaluation
    for e, g_ in zip(*logs):
        assert max_rel_error(g_['denoised'], e['denoised']) < 1e-10
    # Without a callback the guided denoised image is never materialised; same result.
    torch.manual_seed(2)
    assert max_rel_error(ours(cfg, x, sigmas, disable=True, **kwargs), expected) < 1e-10
    # Called directly, the wrapper is the usual combined denoiser (usable by any sampler).
    sigma = torch.full((2,), 3.0, dtype=torch.float64)
    assert max_rel_error(cfg(x, sigma), _guided_reference(model, cond, uncond, 4.0)(x, sigma)) < 1e-12


def test_cfg_wrapper_with_dict_conditioning_and_attributes():
    class DictModel(nn.Module):
        sigma_data = 0.5

        def forward(self, x, sigma, cond):
            return x * cond["a"][:, None] + cond["b"][:, None]

    cond = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 0.25])}
    uncond = {"a": torch.zeros(2), "b": torch.zeros(2)}
    cfg = CFGDenoiser(DictModel(), cond, uncond, 3.0)
    x = torch.ones(2, 4)
    assert torch.allclose(cfg(x, torch.ones(2)), 3.0 * (x * cond["a"][:, None] + cond["b"][:, None]))
    assert cfg.sigma_data == 0.5
    with pytest.raises(AttributeError):
        cfg.no_such_attribute


# --------------------------------------------------------------------------
# EDM
# --------------------------------------------------------------------------


@pytest.mark.parametrize("churn", [dict(), dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)],
                         ids=["deterministic", "churn"])
def test_edm_sampler_matches_reference(churn):
    net = EDMPrecond(Inner(label_dim=4), label_dim=4)
    labels = torch.eye(4)[[1, 3]]
    latents = _start(torch.float32)
    out = []
    for fn in (edm_edm_sampler, edm_sampler):
        torch.manual_seed(8)
        with torch.no_grad():
            out.append(fn(net, latents, labels, num_steps=10, **churn))
    assert out[1].dtype == torch.float64
    assert max_rel_error(out[1], out[0]) < 1e-6


def test_edm_sampler_matches_reference_with_iddpm_rounding():
    """iDDPM's round_sigma snaps σ to its discrete levels, churned ones too."""
    net = iDDPMPrecond(Inner(out_channels=6), img_channels=3, M=100)
    latents = _start(torch.float32)
    out = []
    for fn in (edm_edm_sampler, edm_sampler):
        torch.manual_seed(8)
        with torch.no_grad():
            out.append(fn(net, latents, num_steps=8, S_churn=30.0))
    assert max_rel_error(out[1], out[0]) < 1e-6


def test_edm_sampler_custom_randn_like_and_cfg():
    net = EDMPrecond(Inner(label_dim=4), label_dim=4)
    cond, uncond = torch.eye(4)[[0, 2]], torch.zeros(2, 4)

    def guided(x, t, class_labels=None):
        u, c = net(x, t, uncond), net(x, t, cond)
        return u + (c - u) * 2.5

    guided.sigma_min, guided.sigma_max, guided.round_sigma = 0, float('inf'), net.round_sigma
    gens = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)]
    latents = _start(torch.float32)
    cfg = CFGDenoiser(net, cond, uncond, 2.5, cond_key="class_labels")
    with torch.no_grad():
        expected = edm_edm_sampler(guided, latents, num_steps=6, S_churn=10.0,
                                   randn_like=lambda x: torch.randn(x.shape, generator=gens[0], dtype=x.dtype))
        got = edm_sampler(cfg, latents, num_steps=6, S_churn=10.0,
                          randn_like=lambda x: torch.randn(x.shape, generator=gens[1], dtype=x.dtype))
    # The reference combines the fp32 net outputs in fp32, the fused step in fp64.
    assert max_rel_error(got, expected) < 5e-6


# --------------------------------------------------------------------------
# NCSN
# --------------------------------------------------------------------------


@pytest.mark.parametrize("denoise", [False, True])
def test_annealed_langevin_matches_ncsn(denoise):
    sigmas = get_sigmas_geometric(4, 0.05, 1.0)
    levels = sigmas.double()

    def scorenet(x, labels):  # an exact-looking score: Gaussian N(0.3, 0.5²) data
        s = levels[labels].reshape(-1, 1, 1, 1)
        return (0.3 - x) / (0.25 + s ** 2)

    x = _start(torch.float64)
    torch.manual_seed(6)
    expected = ncsn_anneal_Langevin_dynamics(x, scorenet, sigmas.tolist(), n_steps_each=5,
                                             step_lr=2e-3, final_only=True, denoise=denoise)[0]
    torch.manual_seed(6)
    got = annealed_langevin(scorenet, x, sigmas, n_steps_each=5, step_lr=2e-3, denoise=denoise, disable=True)
    assert max_rel_error(got, expected) < 1e-10

    def score_of_sigma(x, sigma):
        return (0.3 - x) / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2)

    torch.manual_seed(6)
    by_sigma = annealed_langevin(score_of_sigma, x, sigmas.tolist(), n_steps_each=5, step_lr=2e-3,
                                 denoise=denoise, disable=True, condition="sigma")
    assert max_rel_error(by_sigma, expected) < 1e-10


def test_annealed_langevin_callback_and_noise_sampler():
    seen = []
    x = _start(torch.float32)
    out = annealed_langevin(lambda x, c: -x, x, [1.0, 0.5], n_steps_each=3, step_lr=1e-2,
                            callback=seen.append, disable=True,
                            noise_sampler=PhiloxNoiseSampler(x, 5))
    assert [(d['i'], d['step']) for d in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert set(seen[0]) == {'x', 'i', 'step', 'sigma', 'score'} and torch.equal(seen[0]['x'], x)
    again = annealed_langevin(lambda x, c: -x, x, [1.0, 0.5], n_steps_each=3, step_lr=1e-2,
                              disable=True, noise_sampler=PhiloxNoiseSampler(x, 5))
    assert torch.equal(out, again)


# --------------------------------------------------------------------------
# Closed form: a Gaussian mixture has an exact denoiser
# --------------------------------------------------------------------------


class GaussianMixture:
    """Data ~ Σ_k w_k N(μ_k, s² I) in 2-D.  At noise level σ the posterior mean is
    D(x, σ) = Σ_k r_k(x) (μ_k + s²/(s²+σ²) (x - μ_k)), r_k ∝ w_k N(x; μ_k, (s²+σ²) I);
    the score is (D - x)/σ².  Also an EDM-style net (sigma_min/max, round_sigma)."""

    sigma_min, sigma_max = 0.0, float('inf')

    def __init__(self, dtype=torch.float64):
        self.means = torch.tensor([[-4.0, -1.0], [4.0, -1.0], [0.0, 5.0]], dtype=dtype)
        self.weights = torch.tensor([0.2, 0.3, 0.5], dtype=dtype)
        self.s = 0.25

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        x = x.to(self.means.dtype)
        var = self.s ** 2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2  # (B or 1, 1)
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (B, K)
        r = torch.softmax(self.weights.log() - d2 / (2 * var), dim=1)
        comp = self.means[None] + (self.s ** 2 / var)[..., None] * (x[:, None, :] - self.means[None])
        return (r[..., None] * comp).sum(1)

    def score(self, x, sigma):
        return (self(x, sigma) - x) / sigma.reshape(-1, 1) ** 2

    def check(self, samples):
        d = torch.cdist(samples.double(), self.means.double())
        nearest = d.argmin(1)
        near = d.min(1).values < 4 * self.s
        props = torch.bincount(nearest, minlength=3).double() / len(samples)
        assert near.double().mean() > 0.97, near.double().mean()
        assert (props - self.weights.double()).abs().max() < 0.07, props


N_SAMPLES = 512


@pytest.mark.parametrize("name", list(KD_SAMPLERS))
def test_k_diffusion_samplers_land_on_the_mixture_modes(name):
    mix = GaussianMixture()
    sigmas = get_sigmas_karras(30, 0.002, 80.0, device="cpu").double()
    torch.manual_seed(0)
    x = torch.randn(N_SAMPLES, 2, dtype=torch.float64) * sigmas[0]
    mix.check(KD_SAMPLERS[name][0](mix, x, sigmas, disable=True))


def test_edm_sampler_lands_on_the_mixture_modes():
    mix = GaussianMixture()
    torch.manual_seed(0)
    for churn in (0.0, 20.0):
        mix.check(edm_sampler(mix, torch.randn(N_SAMPLES, 2), num_steps=30, S_churn=churn))


def test_annealed_langevin_with_the_exact_score_lands_on_the_mixture_modes():
    mix = GaussianMixture()
    sigmas = get_sigmas_geometric(10, 0.05, 10.0).double()
    torch.manual_seed(0)
    x = torch.randn(N_SAMPLES, 2, dtype=torch.float64) * 10.0
    out = annealed_langevin(mix.score, x, sigmas, n_steps_each=60, step_lr=0.2 * 0.05 ** 2,
                            denoise=True, disable=True, condition="sigma")
    mix.check(out)


# --------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------


@pytest.mark.cuda
def test_captured_sampling_loop_replays_like_eager():
    model = ToyDenoiser().cuda()
    sigmas = get_sigmas_karras(10, 0.002, 80.0).tolist()
    x = torch.randn(4, 3, 8, 8, device="cuda") * sigmas[0]
    heun = sampling.capture(lambda x: sample_heun(model, x, sigmas, disable=True), x)
    assert max_rel_error(heun(x), sample_heun(model, x, sigmas, disable=True)) < 1e-5
    x2 = torch.randn_like(x) * sigmas[0]
    assert max_rel_error(heun(x2), sample_heun(model, x2, sigmas, disable=True)) < 1e-5

    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    anc = sampling.capture(lambda x: sample_euler_ancestral(
        model, x, sigmas, disable=True, noise_sampler=PhiloxNoiseSampler(x, seed)), x)
    for value in (5, 6):
        seed.fill_(value)
        got = anc(x).clone()
        eager = sample_euler_ancestral(model, x, sigmas, disable=True,
                                       noise_sampler=PhiloxNoiseSampler(x, value))
        assert max_rel_error(got, eager) < 1e-5

    net = EDMPrecond(Inner()).cuda()
    edm = sampling.capture(lambda z: edm_sampler(net, z, num_steps=8), x)
    assert max_rel_error(edm(x), edm_sampler(net, x, num_steps=8)) < 1e-6

    device_sigmas = torch.tensor(sigmas, device="cuda")
    with pytest.raises(RuntimeError, match="list of Python floats"):
        sampling.capture(lambda x: sample_heun(model, x, device_sigmas, disable=True), x)
