"""fastdiff.nn.Attention / LinearAttention against denoising-diffusion-pytorch's modules,
and FastdiffAttnProcessor against diffusers' default attention processors."""

import pytest
import torch
import torch.nn.functional as F

import _ddpm_unet
import fastdiff.nn.attention as fd_attention
from fastdiff import use_backend
from fastdiff.nn.attention import Attention, LinearAttention, dot_product_attention
from fastdiff.nn.diffusers_processor import FastdiffAttnProcessor
from fastdiff.testing import assert_close, device_backends

CPU_BACKENDS = [b for d, b in device_backends() if d == "cpu" and b in ("triton", "torch")]


# denoising-diffusion-pytorch 2.3.4's modules, transcribed in tests/_ddpm_unet.py
# (the package imports torchvision, accelerate and einops at import time).
DDPLinearAttention, DDPAttention = _ddpm_unet.LinearAttention, _ddpm_unet.Attention


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------

PAIRS = [(LinearAttention, DDPLinearAttention), (Attention, DDPAttention)]
PAIR_IDS = ["LinearAttention", "Attention"]


def randomize(module, seed=1):
    """Non-trivial values in every parameter (the norms start at ones, conv biases near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise if name == "mem_kv" else 1 + 0.3 * noise if name.endswith(".g") else 0.3 * noise)
    return module


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("kwargs", [{}, dict(heads=2, dim_head=16, num_mem_kv=0), dict(heads=1, dim_head=40)],
                         ids=["default", "no-mem", "d40"])
def test_same_parameters_and_state_dict(ours, theirs, kwargs):
    torch.manual_seed(3)
    a = ours(24, **kwargs)
    torch.manual_seed(3)
    b = theirs(24, **kwargs)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b)
    for key in sd_b:  # same shapes, and the same values from the same seed
        assert torch.equal(sd_a[key], sd_b[key]), key
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape, kwargs", [
    ((2, 24, 5, 7), dict(heads=2, dim_head=16)),
    ((1, 16, 4, 4), dict(heads=1, dim_head=40, num_mem_kv=0)),
    ((2, 32, 6, 6), {}),
], ids=["2x24x5x7", "1x16x4x4-no-mem", "2x32x6x6-default"])
def test_forward_and_gradients_match(backend, ours, theirs, shape, kwargs):
    ref = randomize(theirs(shape[1], **kwargs))
    mod = ours(shape[1], **kwargs)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(shape)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(shape)
    y_ref = ref(x_ref)
    with use_backend(backend):
        y = mod(x_ours)
        y.backward(grad)
    y_ref.backward(grad)
    assert_close(y.detach(), y_ref.detach(), rtol=1e-4, atol=1e-6, name="output")
    assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-6, name="grad x")
    params_ref = dict(ref.named_parameters())
    for name, p in mod.named_parameters():
        assert p.grad is not None and (p.numel() == 0 or p.grad.abs().sum() > 0), name
        assert_close(p.grad, params_ref[name].grad, rtol=1e-4, atol=1e-6, name=f"grad {name}")


def test_attention_runs_on_fastdiff_attention(monkeypatch):
    """The full-attention block calls fastdiff.ops.attention (q (B, H, N, D), the
    memory keys prepended); without that op it computes the same with SDPA."""
    calls = []

    def spy(q, k, v, *, scale=None):
        calls.append((tuple(q.shape), tuple(k.shape), scale))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    ref = randomize(DDPAttention(16, heads=2, dim_head=8))
    mod = Attention(16, heads=2, dim_head=8)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 3, 5)
    monkeypatch.setattr(fd_attention, "_fastdiff_attention", spy)
    assert_close(mod(x), ref(x), rtol=1e-4, atol=1e-6)
    assert calls == [((2, 2, 15, 8), (2, 2, 19, 8), None)]
    monkeypatch.setattr(fd_attention, "_fastdiff_attention", None)
    assert_close(mod(x), ref(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ours", [LinearAttention, Attention], ids=PAIR_IDS)
def test_modules_compile_without_graph_break(ours):
    mod = randomize(ours(16, heads=2, dim_head=16))
    x = torch.randn(2, 16, 4, 6, requires_grad=True)
    eager = mod(x).square().mean()
    got = torch.compile(lambda t: mod(t).square().mean(), fullgraph=True)(x)
    assert_close(got, eager, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got, x)
    (g_e,) = torch.autograd.grad(eager, x)
    assert_close(g, g_e, rtol=1e-4, atol=1e-7)


def test_dot_product_attention_matches_sdpa():
    q, k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 13, 16), torch.randn(2, 3, 13, 16)
    for scale in (None, 0.3):
        assert_close(dot_product_attention(q, k, v, scale=scale),
                     F.scaled_dot_product_attention(q, k, v, scale=scale), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# diffusers attention processor
# --------------------------------------------------------------------------


@pytest.fixture
def diffusers_attention():
    return pytest.importorskip("diffusers.models.attention_processor")


def seeded(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def compare_processors(attn, default, *args, **kwargs):
    """attn(*args) under ``default`` and under FastdiffAttnProcessor: values and input grads."""
    results = []
    for processor in (default, FastdiffAttnProcessor()):
        attn.set_processor(processor)
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
        out = attn(*leaves, **kwargs)
        grads = torch.autograd.grad(out.square().sum(), [a for a in leaves if isinstance(a, torch.Tensor)
                                                          and a.requires_grad])
        results.append((out.detach(), grads))
    (out_d, grads_d), (out_f, grads_f) = results
    assert_close(out_f, out_d, rtol=1e-4, atol=1e-6, name="output")
    for g_f, g_d in zip(grads_f, grads_d):
        assert_close(g_f, g_d, rtol=1e-4, atol=1e-6, name="grad")


def test_processor_self_attention_block(diffusers_attention):
    """The UNet2DModel / VAE mid-block form: 4-D input, group norm, residual, rescale."""
    attn = seeded(diffusers_attention.Attention(
        32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
        rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True))
    compare_processors(attn, diffusers_attention.AttnProcessor2_0(), torch.randn(2, 32, 5, 3))


def test_processor_keeps_a_contiguous_block_contiguous(diffusers_attention):
    """diffusers' processor returns a channels_last sum for a contiguous 4-D input (the
    projection's (B, N, C) output, transposed, comes first in `+ residual`), and each
    convolution after it then copies its weight to channels_last on every call.  Ours
    adds the residual first: a contiguous output, the same values bit for bit."""
    attn = seeded(diffusers_attention.Attention(
        32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, bias=True,
        _from_deprecated_attn_block=True))
    x = torch.randn(2, 32, 4, 6)
    outs = []
    for processor in (diffusers_attention.AttnProcessor2_0(), FastdiffAttnProcessor()):
        attn.set_processor(processor)
        with torch.no_grad():
            outs.append(attn(x))
    assert outs[0].is_contiguous(memory_format=torch.channels_last)  # what diffusers does
    assert outs[1].is_contiguous()
    assert torch.equal(outs[1], outs[0])


def test_processor_cross_attention_and_mask(diffusers_attention):
    attn = seeded(diffusers_attention.Attention(32, cross_attention_dim=24, heads=4, dim_head=8,
                                                cross_attention_norm="layer_norm", qk_norm="layer_norm"))
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    compare_processors(attn, diffusers_attention.AttnProcessor2_0(), x, context)
    mask = torch.zeros(2, 7)
    mask[0, 5:] = -10000.0  # padded text tokens of sample 0
    compare_processors(attn, diffusers_attention.AttnProcessor2_0(), x, context, attention_mask=mask)


def test_processor_spatial_norm(diffusers_attention):
    """The VAE decoder's MoVQ form: SpatialNorm conditioned on a quantised latent."""
    attn = seeded(diffusers_attention.Attention(32, heads=1, dim_head=32, spatial_norm_dim=4,
                                                residual_connection=True, bias=True))
    compare_processors(attn, diffusers_attention.AttnProcessor2_0(), torch.randn(2, 32, 4, 4),
                       temb=torch.randn(2, 4, 2, 2))


def test_processor_unscaled_attention(diffusers_attention):
    """scale_qk=False: diffusers defaults to AttnProcessor with softmax scale 1."""
    attn = seeded(diffusers_attention.Attention(16, heads=2, dim_head=8, scale_qk=False))
    assert isinstance(attn.processor, diffusers_attention.AttnProcessor)
    compare_processors(attn, diffusers_attention.AttnProcessor(), torch.randn(2, 6, 16))


def test_processor_routes_through_fastdiff_attention(diffusers_attention, monkeypatch):
    import fastdiff.nn.diffusers_processor as proc

    calls = []

    def spy(q, k, v, scale=None):
        calls.append((tuple(q.shape), tuple(k.shape), scale))
        return dot_product_attention(q, k, v, scale=scale)

    monkeypatch.setattr(proc, "dot_product_attention", spy)
    attn = diffusers_attention.Attention(32, cross_attention_dim=24, heads=4, dim_head=8,
                                         processor=FastdiffAttnProcessor())
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    attn(x, context)
    assert calls == [((2, 4, 10, 8), (2, 4, 7, 8), 8 ** -0.5)]
    attn(x, context, attention_mask=torch.zeros(2, 7))  # masks go to SDPA
    assert len(calls) == 1


def test_processor_in_unet2d(diffusers_attention):
    """UNet2DModel (no set_attn_processor in diffusers 0.42): set on each Attention."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = seeded(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ), 1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    expected = unet(x, t).sample
    blocks = [m for m in unet.modules() if isinstance(m, diffusers_attention.Attention)]
    assert len(blocks) == 4  # 1 down, 1 mid, 2 up
    for block in blocks:
        block.set_processor(FastdiffAttnProcessor())
    assert_close(unet(x, t).sample, expected, rtol=1e-4, atol=1e-6)


def test_processor_in_unet2d_condition(diffusers_attention):
    """``model.set_attn_processor(FastdiffAttnProcessor())``: self- and cross-attention."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = seeded(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ), 1)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 24)
    expected = unet(x, t, encoder_hidden_states=text).sample
    unet.set_attn_processor(FastdiffAttnProcessor())
    assert len(unet.attn_processors) == 8  # (self, cross) x (1 down, 1 mid, 2 up)
    assert all(isinstance(p, FastdiffAttnProcessor) for p in unet.attn_processors.values())
    assert_close(unet(x, t, encoder_hidden_states=text).sample, expected, rtol=1e-4, atol=1e-6)
