"""fastdiff.training against plain-torch DDPM losses and transcribed EDM code,
in a plain training loop and under 2-process DDP."""

import os
import socket
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastdiff import schedules
from fastdiff.testing import max_rel_error, no_cuda_sync
from fastdiff.training import (
    EDMLoss,
    EDMPrecond,
    VELoss,
    VEPrecond,
    VPLoss,
    VPPrecond,
    ddpm_loss,
    iDDPMPrecond,
)

# --------------------------------------------------------------------------
# NVlabs/edm references, transcribed from training/networks.py and
# training/loss.py.  The only change: the preconditioners take the inner model
# instance (`model`) instead of building `globals()[model_type](**model_kwargs)`.
# --------------------------------------------------------------------------


class RefVPPrecond(torch.nn.Module):
    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = model

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class RefVEPrecond(torch.nn.Module):
    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = model

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class RefiDDPMPrecond(torch.nn.Module):
    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 C_1=0.001, C_2=0.008, M=1000):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = model

        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):  # M, ..., 1
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)
        return D_x

    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class RefEDMPrecond(torch.nn.Module):
    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float('inf'), sigma_data=0.5):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = model

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class RefVPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        loss = weight * ((D_yn - y) ** 2)
        return loss

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


class RefVELoss:
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        loss = weight * ((D_yn - y) ** 2)
        return loss


class RefEDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        loss = weight * ((D_yn - y) ** 2)
        return loss


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class Inner(nn.Module):
    """F(c_in x, c_noise, class_labels, augment_labels) of an EDM preconditioner."""

    def __init__(self, out_channels=3, label_dim=0, seed=99):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, out_channels, 3, padding=1)
        self.emb = nn.Linear(label_dim, out_channels) if label_dim else None

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        h = self.conv(x) + torch.sin(c_noise).reshape(-1, 1, 1, 1)
        if self.emb is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        if augment_labels is not None:
            h = h + augment_labels.sum(1).reshape(-1, 1, 1, 1)
        return torch.tanh(h)


class EpsModel(nn.Module):
    """A DDPM model(x_t, t) with a timestep embedding."""

    def __init__(self, seed=7):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Linear(1, 3)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t.float()[:, None] / 1000)[:, :, None, None]


def _images(batch=4, seed=0):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


AB = schedules.alphas_cumprod(schedules.betas("linear", 1000))


# --------------------------------------------------------------------------
# ddpm_loss
# --------------------------------------------------------------------------


def _plain_ddpm_loss(model, x0, ab, objective, noise, t, gamma=None):
    """L_simple in plain torch, as diffusers' train_text_to_image computes it."""
    a = ab[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - ab[t]).sqrt().reshape(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[objective]
    per_sample = ((model(x_t, t).float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = ab[t] / (1 - ab[t])
        w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        if objective == "eps":
            w = w / snr
        elif objective == "v":
            w = w / (snr + 1)
        per_sample = per_sample * w
    return per_sample.mean(), per_sample


@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_ddpm_loss_equals_plain_torch(objective, gamma):
    model, x0 = EpsModel(), _images()
    noise = _images(seed=1)
    t = torch.tensor([0, 10, 500, 999])
    loss, per_sample = ddpm_loss(model, x0, AB, objective, min_snr_gamma=gamma, noise=noise,
                                 timesteps=t, return_per_sample=True)
    expected, expected_per_sample = _plain_ddpm_loss(model, x0, AB, objective, noise, t, gamma)
    assert loss.shape == () and per_sample.shape == (4,)
    assert max_rel_error(per_sample, expected_per_sample) < 1e-5
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddpm_loss_draws_like_diffusers_scripts_with_a_generator(objective):
    """Noise, then the offset noise, then the timesteps, from the generator."""
    model, x0 = EpsModel(), _images()
    got = ddpm_loss(model, x0, AB, objective, offset_noise=0.1, min_snr_gamma=5.0,
                    generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    noise = noise + 0.1 * torch.randn(4, 3, 1, 1, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    expected, _ = _plain_ddpm_loss(model, x0, AB, objective, noise, t, 5.0)
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()
    torch.manual_seed(4)
    a = ddpm_loss(model, x0, AB, objective)
    torch.manual_seed(4)
    assert a.item() == ddpm_loss(model, x0, AB, objective).item()


def test_ddpm_loss_matches_diffusers_helpers():
    diffusers = pytest.importorskip("diffusers")
    training_utils = pytest.importorskip("diffusers.training_utils")
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    model, x0, noise = EpsModel(), _images(), _images(seed=1)
    t = torch.tensor([3, 200, 700, 999])
    snr = training_utils.compute_snr(sched, t)
    w = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / (snr + 1)
    pred = model(sched.add_noise(x0, noise, t), t)
    expected = (((pred - sched.get_velocity(x0, noise, t)) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    got = ddpm_loss(model, x0, sched, "v_prediction", min_snr_gamma=5.0, noise=noise, timesteps=t)
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()


def test_ddpm_loss_gradients_flow_like_plain_torch():
    for objective in ("eps", "v"):
        grads = []
        for fn in ("fastdiff", "plain"):
            model = EpsModel()
            x0 = _images().requires_grad_()
            noise, t = _images(seed=1), torch.tensor([5, 50, 500, 950])
            if fn == "fastdiff":
                loss = ddpm_loss(model, x0, AB, objective, min_snr_gamma=3.0, noise=noise, timesteps=t)
            else:
                loss = _plain_ddpm_loss(model, x0, AB, objective, noise, t, 3.0)[0]
            loss.backward()
            grads.append([x0.grad] + [p.grad for p in model.parameters()])
        for g, e in zip(*grads):
            assert g is not None and g.abs().sum() > 0
            assert max_rel_error(g, e) < 1e-5


def test_ddpm_loss_scheduler_objects_and_model_outputs():
    x0, noise, t = _images(), _images(seed=1), torch.tensor([1, 2, 3, 4])
    model = EpsModel()
    expected = ddpm_loss(model, x0, AB, noise=noise, timesteps=t)
    sched = types.SimpleNamespace(alphas_cumprod=AB)
    assert ddpm_loss(model, x0, sched, noise=noise, timesteps=t).item() == expected.item()
    as_output = lambda x, t: types.SimpleNamespace(sample=model(x, t))  # noqa: E731
    as_tuple = lambda x, t: (model(x, t),)  # noqa: E731
    assert ddpm_loss(as_output, x0, AB, noise=noise, timesteps=t).item() == expected.item()
    assert ddpm_loss(as_tuple, x0, AB, "epsilon", noise=noise, timesteps=t).item() == expected.item()
    same_t = ddpm_loss(model, x0, AB, noise=noise, timesteps=7)
    assert same_t.item() == ddpm_loss(model, x0, AB, noise=noise, timesteps=torch.full((4,), 7)).item()


def test_min_snr_weights_at_zero_terminal_snr():
    ab = schedules.alphas_cumprod(schedules.betas("linear", 1000, rescale_zero_snr=True))
    assert ab[-1] == 0
    x0, noise = _images(), _images(seed=1)
    t = torch.tensor([999, 999, 0, 500])
    for objective in ("eps", "x0", "v"):
        _, per = ddpm_loss(EpsModel(), x0, ab, objective, min_snr_gamma=5.0, noise=noise,
                           timesteps=t, return_per_sample=True)
        assert torch.isfinite(per).all(), objective
    _, weighted = ddpm_loss(EpsModel(), x0, ab, "eps", min_snr_gamma=5.0, noise=noise, timesteps=t,
                            return_per_sample=True)
    _, plain = ddpm_loss(EpsModel(), x0, ab, "eps", noise=noise, timesteps=t, return_per_sample=True)
    assert torch.allclose(weighted[:2], plain[:2])  # min(SNR, γ)/SNR → 1 as SNR → 0


def test_ddpm_loss_argument_errors():
    with pytest.raises(ValueError, match="objective must be one of 'eps', 'epsilon'"):
        ddpm_loss(EpsModel(), _images(), AB, "score")
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        ddpm_loss(EpsModel(), _images(), AB, min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ddpm_loss(EpsModel(), _images(), torch.ones(3, 3))


def test_ddpm_loss_timestep_range():
    """t >= T raises naming the argument (CPU); t < 0 means ᾱ = 1 on every path, as
    add_noise: x_t = x0, the v target is ε and min-SNR weights SNR = inf."""
    x0, noise = _images(), _images(seed=1)
    for objective in ("eps", "v"):
        with pytest.raises(IndexError, match="ddpm_loss: timesteps must be < 1000"):
            ddpm_loss(EpsModel(), x0, AB, objective, min_snr_gamma=5.0, noise=noise,
                      timesteps=torch.tensor([0, 1, 1000, 2]))
    seen = []

    def model(x, t):
        seen.append(x)
        return torch.zeros_like(x)

    t = torch.tensor([-1, 3, -1, 999])
    for objective, weight_at_minus_one in (("eps", 0.0), ("x0", 5.0), ("v", 0.0)):
        seen.clear()
        _, per = ddpm_loss(model, x0, AB, objective, min_snr_gamma=5.0, noise=noise, timesteps=t,
                           return_per_sample=True)
        x_t = seen[0]
        assert torch.equal(x_t[[0, 2]], x0[[0, 2]]), objective
        a, s = AB[[3, 999]].sqrt(), (1 - AB[[3, 999]]).sqrt()
        expected = a.reshape(-1, 1, 1, 1) * x0[[1, 3]] + s.reshape(-1, 1, 1, 1) * noise[[1, 3]]
        assert max_rel_error(x_t[[1, 3]], expected.float()) < 1e-6, objective
        target = {"eps": noise, "x0": x0, "v": noise}[objective][[0, 2]]
        mse = target.square().flatten(1).mean(1)
        assert torch.allclose(per[[0, 2]], weight_at_minus_one * mse), objective


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddpm_loss_compiles_without_graph_breaks(objective):
    model, x0, noise = EpsModel(), _images(), _images(seed=1)
    t = torch.tensor([0, 10, 500, 999])

    def loss(x0, noise, t):
        return ddpm_loss(model, x0, AB, objective, min_snr_gamma=5.0, noise=noise, timesteps=t)

    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(x0, noise, t)
    assert max_rel_error(got, loss(x0, noise, t)) < 1e-6


@pytest.mark.cuda
def test_ddpm_loss_does_not_synchronize():
    """ᾱ on the CPU, the batch on the GPU: the tables are made once, then a loss is launches
    only (no copy of ᾱ to the device per step)."""
    model = EpsModel().cuda()
    x0, noise = _images().cuda(), _images(seed=1).cuda()
    t = torch.randint(0, 1000, (4,), device="cuda")
    calls = [lambda o=o: ddpm_loss(model, x0, AB, o, min_snr_gamma=5.0, noise=noise, timesteps=t)
             for o in ("eps", "x0", "v")]
    expected = [call() for call in calls]
    with no_cuda_sync():
        got = [call() for call in calls]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# --------------------------------------------------------------------------
# EDM preconditioners and losses
# --------------------------------------------------------------------------

PRECONDS = {
    "vp": (VPPrecond, RefVPPrecond, 3, {}),
    "ve": (VEPrecond, RefVEPrecond, 3, {}),
    "iddpm": (iDDPMPrecond, RefiDDPMPrecond, 6, dict(M=200)),
    "edm": (EDMPrecond, RefEDMPrecond, 3, dict(sigma_data=0.6)),
}


def _pair(name, label_dim=0):
    ours, ref, out_channels, kwargs = PRECONDS[name]
    return (ours(Inner(out_channels, label_dim), 8, 3, label_dim, **kwargs),
            ref(Inner(out_channels, label_dim), 8, 3, label_dim, **kwargs))


@pytest.mark.parametrize("label_dim", [0, 5])
@pytest.mark.parametrize("name", list(PRECONDS))
def test_preconditioner_equals_edm(name, label_dim):
    ours, ref = _pair(name, label_dim)
    assert (ours.sigma_min, ours.sigma_max) == (ref.sigma_min, ref.sigma_max)
    x = _images() * 3
    labels = torch.eye(5)[[0, 4, 2, 1]] if label_dim else None
    for sigma in (torch.tensor([0.01, 0.5, 3.0, 60.0]), torch.tensor(1.7, dtype=torch.float64)):
        for lab in (labels, None):
            assert max_rel_error(ours(x, sigma, lab), ref(x, sigma, lab)) < 1e-6
    sigma = torch.tensor([0.2, 1.0, 5.0, 20.0])
    for net in (ours, ref):
        net(x, sigma, labels).square().sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert max_rel_error(p.grad, q.grad) < 1e-5
    s = torch.tensor([0.003, 0.7, 70.0], dtype=torch.float64)
    assert torch.equal(ours.round_sigma(s), ref.round_sigma(s))


def test_preconditioners_follow_table_1():
    """c_skip, c_out, c_in, c_noise of the EDM paper's Table 1."""
    sigma = torch.tensor([0.02, 0.3, 1.0, 8.0, 79.0])
    sd = 0.5
    edm = EDMPrecond(Inner()).coefficients(sigma)
    table = (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
             1 / (sigma ** 2 + sd ** 2).sqrt(), sigma.log() / 4)
    for got, want in zip(edm, table):
        assert torch.allclose(got, want, rtol=1e-6)
    ve = VEPrecond(Inner()).coefficients(sigma)
    for got, want in zip(ve, (torch.ones_like(sigma), sigma, torch.ones_like(sigma), (sigma / 2).log())):
        assert torch.allclose(got, want, rtol=1e-6)
    vp = VPPrecond(Inner())
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    s_t = ((0.5 * 19.9 * t ** 2 + 0.1 * t).exp() - 1).sqrt()  # σ(t) of the VP SDE
    c_skip, c_out, c_in, c_noise = vp.coefficients(s_t)
    assert torch.allclose(c_noise, 999 * t, rtol=1e-10)
    assert torch.allclose(c_out, -s_t) and torch.allclose(c_in, 1 / (s_t ** 2 + 1).sqrt())
    iddpm = iDDPMPrecond(Inner(6), img_channels=3)
    j = torch.tensor([0, 10, 500, 999])
    _, _, _, c_noise = iddpm.coefficients(iddpm.u[j])
    assert torch.equal(c_noise, (999 - j).float())  # c_noise = M - 1 - j


def test_precond_works_on_any_rank_and_rejects_wrong_dtypes():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, c_noise, class_labels=None):
            return self.lin(torch.cat([x, c_noise[:, None].expand(x.shape[0], 1)], 1))

    net = EDMPrecond(MLP())
    x, sigma = torch.randn(6, 2), torch.rand(6) + 0.1
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma[:, None])
    expected = c_skip * x + c_out * net.model(c_in * x, c_noise.flatten())
    assert torch.allclose(net(x, sigma), expected, atol=1e-6)

    class Half(nn.Module):
        def forward(self, x, c_noise, class_labels=None):
            return x.half()

    with pytest.raises(TypeError, match="returned torch.float16, expected torch.float32"):
        EDMPrecond(Half())(x, sigma)
    with pytest.raises(ValueError, match="img_channels is required"):
        iDDPMPrecond(Inner(6))


def _augment(images):
    return images.flip(3), torch.ones(images.shape[0], 2) * 0.1


LOSSES = {"vp": (VPLoss, RefVPLoss), "ve": (VELoss, RefVELoss), "edm": (EDMLoss, RefEDMLoss)}


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_equals_edm_with_the_same_seed(name, augment):
    ours, ref = LOSSES[name]
    net, labels = _pair("edm", label_dim=5)[0], torch.eye(5)[[0, 1, 2, 3]]
    images = _images() * 0.5
    pipe = _augment if augment else None
    results = []
    for loss_fn in (ours(), ref()):
        torch.manual_seed(21)
        loss = loss_fn(net, images, labels, augment_pipe=pipe)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
        net.zero_grad()
    (got, got_grads), (want, want_grads) = results
    assert got.shape == want.shape == images.shape
    assert max_rel_error(got, want) < 1e-5
    for g, w in zip(got_grads, want_grads):
        assert max_rel_error(g, w) < 1e-5


def test_edm_training_reduces_the_loss():
    """150 Adam steps of EDMLoss on a toy 2-D problem."""
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

        def forward(self, x, c_noise, class_labels=None):
            return self.net(torch.cat([x, c_noise[:, None]], 1))

    net = EDMPrecond(MLP(), sigma_data=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = EDMLoss(sigma_data=1.0)
    g = torch.Generator().manual_seed(0)
    modes = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    losses = []
    torch.manual_seed(0)
    for _ in range(150):
        data = modes[torch.randint(0, 2, (128,), generator=g)] + 0.1 * torch.randn(128, 2, generator=g)
        loss = loss_fn(net, data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.6 * np.mean(losses[:20]), (np.mean(losses[:20]), np.mean(losses[-30:]))


def test_ddpm_training_reduces_the_loss():
    model = EpsModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 8, 8, generator=g).cumsum(3) * 0.3  # spatially correlated data
    losses = []
    for _ in range(150):
        loss = ddpm_loss(model, x0, AB, "eps", min_snr_gamma=5.0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.9 * np.mean(losses[:10])


# --------------------------------------------------------------------------
# DistributedDataParallel (2 processes, gloo, CPU)
# --------------------------------------------------------------------------


def _ddp_models():
    return {"ddpm": EpsModel(seed=5), "edm": EDMPrecond(Inner(seed=6))}


def _ddp_loss(kind, net, rank):
    """Rank ``rank``'s loss on its own shard with its own seeds."""
    images = _images(batch=4, seed=100 + rank)
    if kind == "ddpm":
        return ddpm_loss(net, images, AB, "v", min_snr_gamma=5.0, offset_noise=0.05,
                         generator=torch.Generator().manual_seed(200 + rank))
    torch.manual_seed(300 + rank)
    return EDMLoss()(net, images).mean()


def _ddp_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads = {}
        for kind, model in _ddp_models().items():
            ddp = nn.parallel.DistributedDataParallel(model)
            _ddp_loss(kind, ddp, rank).backward()
            grads[kind] = [p.grad.clone() for p in model.parameters()]
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done before either tears its group down: a rank that
        # destroys its gloo group while the other still talks to it aborts (~1 run in 30)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_agree_across_ranks(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind, model in _ddp_models().items():
        # What DDP must produce: the mean of the two shards' gradients.
        for rank in range(2):
            _ddp_loss(kind, model, rank).backward()
        expected = [p.grad / 2 for p in model.parameters()]
        for g0, g1, e in zip(ranks[0][kind], ranks[1][kind], expected):
            assert torch.equal(g0, g1), kind
            assert max_rel_error(g0, e) < 1e-5, kind
            assert g0.abs().sum() > 0
