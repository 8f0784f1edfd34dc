"""fastdiff.nn.UNet against denoising-diffusion-pytorch 1.11.1's ``Unet``.

denoising-diffusion-pytorch imports torchvision (no CPU build here), so its 1.11.1
``Unet`` is transcribed below (:class:`Unet111`) from
``denoising_diffusion_pytorch/denoising_diffusion_pytorch.py`` of the PyPI wheel,
reusing the pieces ``_ddpm_unet.py`` already transcribes (1.11.1 and 2.3.4 share
Attention, LinearAttention, RMSNorm, Up/Downsample and SinusoidalPosEmb; the
GroupNorm Block / ResnetBlock come from ``v1_blocks()``).
"""

import importlib.util
import math
import os
import pathlib
import socket
from functools import partial

import pytest
import torch
from torch import nn

from fastdiff.nn.unet import UNet

_spec = importlib.util.spec_from_file_location("_ddpm_unet_for_unet_tests",
                                               pathlib.Path(__file__).with_name("_ddpm_unet.py"))
D = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(D)
_, V1ResnetBlock = D.v1_blocks()


# ---------------------------------------------------------------------------
# denoising-diffusion-pytorch 1.11.1 Unet (transcribed; einops written as torch)
# ---------------------------------------------------------------------------


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    def __init__(self, dim, is_random=False):
        super().__init__()
        assert dim % 2 == 0
        half_dim = dim // 2
        self.weights = nn.Parameter(torch.randn(half_dim), requires_grad=not is_random)

    def forward(self, x):
        x = x[:, None]  # rearrange 'b -> b 1'
        freqs = x * self.weights[None, :] * 2 * math.pi  # rearrange 'd -> 1 d'
        fouriered = torch.cat((freqs.sin(), freqs.cos()), dim=-1)
        fouriered = torch.cat((x, fouriered), dim=-1)
        return fouriered


class Unet111(nn.Module):
    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3,
                 self_condition=False, resnet_block_groups=8, learned_variance=False,
                 learned_sinusoidal_cond=False, random_fourier_features=False,
                 learned_sinusoidal_dim=16, sinusoidal_pos_emb_theta=10000, attn_dim_head=32,
                 attn_heads=4, full_attn=None, flash_attn=False):
        super().__init__()
        self.channels = channels
        self.self_condition = self_condition
        input_channels = channels * (2 if self_condition else 1)

        init_dim = D.default(init_dim, dim)
        self.init_conv = nn.Conv2d(input_channels, init_dim, 7, padding=3)

        dims = [init_dim, *map(lambda m: dim * m, dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))

        block_klass = partial(V1ResnetBlock, groups=resnet_block_groups)

        time_dim = dim * 4

        self.random_or_learned_sinusoidal_cond = learned_sinusoidal_cond or random_fourier_features

        if self.random_or_learned_sinusoidal_cond:
            sinu_pos_emb = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, random_fourier_features)
            fourier_dim = learned_sinusoidal_dim + 1
        else:
            sinu_pos_emb = D.SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta)
            fourier_dim = dim

        self.time_mlp = nn.Sequential(
            sinu_pos_emb,
            nn.Linear(fourier_dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim)
        )

        if not full_attn:
            full_attn = (*((False,) * (len(dim_mults) - 1)), True)

        num_stages = len(dim_mults)
        full_attn = D.cast_tuple(full_attn, num_stages)
        attn_heads = D.cast_tuple(attn_heads, num_stages)
        attn_dim_head = D.cast_tuple(attn_dim_head, num_stages)

        assert len(full_attn) == len(dim_mults)

        FullAttention = partial(D.Attention, flash=flash_attn)

        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        num_resolutions = len(in_out)

        for ind, ((dim_in, dim_out), layer_full_attn, layer_attn_heads, layer_attn_dim_head) in enumerate(
                zip(in_out, full_attn, attn_heads, attn_dim_head)):
            is_last = ind >= (num_resolutions - 1)
            attn_klass = FullAttention if layer_full_attn else D.LinearAttention
            self.downs.append(nn.ModuleList([
                block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                attn_klass(dim_in, dim_head=layer_attn_dim_head, heads=layer_attn_heads),
                D.Downsample(dim_in, dim_out) if not is_last else nn.Conv2d(dim_in, dim_out, 3, padding=1)
            ]))

        mid_dim = dims[-1]
        self.mid_block1 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)
        self.mid_attn = FullAttention(mid_dim, heads=attn_heads[-1], dim_head=attn_dim_head[-1])
        self.mid_block2 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)

        for ind, ((dim_in, dim_out), layer_full_attn, layer_attn_heads, layer_attn_dim_head) in enumerate(
                zip(*map(reversed, (in_out, full_attn, attn_heads, attn_dim_head)))):
            is_last = ind == (len(in_out) - 1)
            attn_klass = FullAttention if layer_full_attn else D.LinearAttention
            self.ups.append(nn.ModuleList([
                block_klass(dim_out + dim_in, dim_out, time_emb_dim=time_dim),
                block_klass(dim_out + dim_in, dim_out, time_emb_dim=time_dim),
                attn_klass(dim_out, dim_head=layer_attn_dim_head, heads=layer_attn_heads),
                D.Upsample(dim_out, dim_in) if not is_last else nn.Conv2d(dim_out, dim_in, 3, padding=1)
            ]))

        default_out_dim = channels * (1 if not learned_variance else 2)
        self.out_dim = D.default(out_dim, default_out_dim)

        self.final_res_block = block_klass(dim * 2, dim, time_emb_dim=time_dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.downs) - 1)

    def forward(self, x, time, x_self_cond=None):
        assert all([D.divisible_by(d, self.downsample_factor) for d in x.shape[-2:]])

        if self.self_condition:
            x_self_cond = D.default(x_self_cond, lambda: torch.zeros_like(x))
            x = torch.cat((x_self_cond, x), dim=1)

        x = self.init_conv(x)
        r = x.clone()

        t = self.time_mlp(time)

        h = []

        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            h.append(x)

            x = block2(x, t)
            x = attn(x) + x
            h.append(x)

            x = downsample(x)

        x = self.mid_block1(x, t)
        x = self.mid_attn(x) + x
        x = self.mid_block2(x, t)

        for block1, block2, attn, upsample in self.ups:
            x = torch.cat((x, h.pop()), dim=1)
            x = block1(x, t)

            x = torch.cat((x, h.pop()), dim=1)
            x = block2(x, t)
            x = attn(x) + x

            x = upsample(x)

        x = torch.cat((x, r), dim=1)

        x = self.final_res_block(x, t)
        return self.final_conv(x)


# ---------------------------------------------------------------------------

SMALL = dict(dim=16, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
CONFIGS = {
    "default": dict(SMALL),
    "three-stages": dict(dim=8, dim_mults=(1, 2, 2), channels=1, attn_heads=2, attn_dim_head=8),
    "self-cond-learned": dict(SMALL, self_condition=True, learned_variance=True,
                              learned_sinusoidal_cond=True, learned_sinusoidal_dim=8),
    "fourier-groups-attn": dict(SMALL, random_fourier_features=True, resnet_block_groups=4,
                                full_attn=(True, True), attn_heads=(1, 2), attn_dim_head=(16, 8),
                                out_dim=5, sinusoidal_pos_emb_theta=100),
}


def _pair(cfg):
    """(reference, fastdiff) built from the same seed; the fastdiff one also loads the
    reference's state_dict strictly (and perturbed norm affines, so they are not 1 / 0)."""
    torch.manual_seed(0)
    ref = Unet111(**cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(0)
    ours = UNet(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg, batch=2, size=16):
    c = cfg.get("channels", 3)
    x = torch.randn(batch, c, size, size)
    t = torch.tensor([3.0, 700.0] * (batch // 2))
    return x, t


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_1_11_1(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ref = Unet111(**cfg)
    torch.manual_seed(0)
    ours = UNet(**cfg)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:  # same parameters created in the same order: a seeded build is identical
        assert sd_ref[k].shape == sd_ours[k].shape, k
        assert torch.equal(sd_ref[k], sd_ours[k]), k
    # and the other way round, strictly
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_1_11_1(name):
    cfg = CONFIGS[name]
    ref, ours = _pair(cfg)
    x, t = _inputs(cfg)
    kwargs = {}
    if cfg.get("self_condition"):
        kwargs["x_self_cond"] = torch.randn_like(x)
    with torch.no_grad():
        want = ref(x, t, **kwargs)
        got = ours(x, t, **kwargs)
        assert got.shape == want.shape
        assert _rel(got, want) <= 1e-4
        # integer timesteps, as a training loop passes them
        ti = torch.tensor([5, 999] * (x.shape[0] // 2))
        assert _rel(ours(x, ti, **kwargs), ref(x, ti, **kwargs)) <= 1e-4


def test_gradients_match():
    cfg = CONFIGS["default"]
    ref, ours = _pair(cfg)
    x, t = _inputs(cfg)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(2, 3, 16, 16)
    (ref(xr, t) * w).sum().backward()
    (ours(xo, t) * w).sum().backward()
    assert _rel(xo.grad, xr.grad) <= 1e-4
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert p.grad is not None, n  # every parameter is reached, the fused norms' included
        assert _rel(p.grad, ref_params[n].grad) <= 1e-4, n


def test_downsample_factor_check():
    m = UNet(8, dim_mults=(1, 2, 2), channels=1, attn_heads=1, attn_dim_head=8)
    assert m.downsample_factor == 4
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 1, 6, 6), torch.tensor([1.0]))


def test_compile_fullgraph():
    cfg = CONFIGS["default"]
    _, ours = _pair(cfg)
    x, t = _inputs(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    got = compiled(xc, t)  # fullgraph=True: any graph break raises
    want = ours(x, t)
    assert _rel(got, want) <= 1e-5
    got.square().mean().backward()  # backward through the compiled fused ops
    assert xc.grad is not None and torch.isfinite(xc.grad).all()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# 2-process DDP (gloo, CPU) training step with fastdiff.nn.UNet + ddpm_loss
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, result_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastdiff import schedules
    from fastdiff.training import ddpm_loss

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = UNet(8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=8)
        local = UNet(8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=8)
        local.load_state_dict(model.state_dict())
        ddp = DDP(model)
        ab = schedules.alphas_cumprod(schedules.betas("linear", 1000))
        x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(100 + rank))

        loss = ddpm_loss(ddp, x0, ab, generator=torch.Generator().manual_seed(rank))
        loss.backward()
        local_loss = ddpm_loss(local, x0, ab, generator=torch.Generator().manual_seed(rank))
        local_loss.backward()

        ddp_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        expected = torch.cat([p.grad.flatten() for p in local.parameters()])
        dist.all_reduce(expected)
        expected /= world_size  # DDP averages the ranks' gradients
        gathered = [torch.empty_like(ddp_grads) for _ in range(world_size)]
        dist.all_gather(gathered, ddp_grads)

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered_params = [torch.empty_like(params) for _ in range(world_size)]
        dist.all_gather(gathered_params, params)
        torch.save({"loss": loss.item(), "ddp": ddp_grads, "expected": expected,
                    "gathered": gathered, "params": gathered_params},
                   os.path.join(result_dir, f"rank{rank}.pt"))
        # both ranks done before either tears its group down: a rank that
        # destroys its gloo group while the other still talks to it aborts (~1 run in 30)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_training_step(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for res in results:
        assert math.isfinite(res["loss"])
        assert torch.isfinite(res["ddp"]).all() and res["ddp"].abs().sum() > 0
        torch.testing.assert_close(res["gathered"][0], res["gathered"][1], rtol=0, atol=0)
        torch.testing.assert_close(res["ddp"], res["expected"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["params"][0], res["params"][1], rtol=0, atol=0)
    assert results[0]["loss"] != results[1]["loss"]  # the ranks saw different data
