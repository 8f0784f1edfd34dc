"""``fastdiff.nn.UNet``: the DDPM U-Net of denoising-diffusion-pytorch, on fastdiff ops.

Matched to lucidrains' ``denoising_diffusion_pytorch.Unet`` of release **1.11.1**
(``denoising_diffusion_pytorch/denoising_diffusion_pytorch.py``), the last release
whose ``Block`` normalises with ``nn.GroupNorm``:

* the same constructor arguments and defaults (``dim, init_dim, out_dim, dim_mults,
  channels, self_condition, resnet_block_groups, learned_variance,
  learned_sinusoidal_cond, random_fourier_features, learned_sinusoidal_dim,
  sinusoidal_pos_emb_theta, attn_dim_head, attn_heads, full_attn, flash_attn``);
* the same module tree, parameters and state_dict keys, with parameters created
  in the same order (a seeded construction gives the same weights), so a 1.11.1
  checkpoint loads with ``load_state_dict(..., strict=True)`` and back;
* the same forward ``(x, time, x_self_cond=None)`` and the same numbers (fp32,
  ≤1e-4 relative; ``tests/test_unet.py`` checks it against a transcription).

What is fused: each ``Block``'s GroupNorm -> time scale-shift -> SiLU is one
:func:`fastdiff.ops.group_norm_silu` call (fused forward and backward); the
linear attention at every resolution runs :func:`fastdiff.ops.linear_attention`
and the full attention :func:`fastdiff.ops.attention` (through
:class:`fastdiff.nn.LinearAttention` / :class:`fastdiff.nn.Attention`, whose
parameters -- RMSNorm ``g``, ``mem_kv``, ``to_qkv``, ``to_out`` -- are exactly
1.11.1's; 1.11.1 and 2.x share these two blocks).

Releases >= 2.0 normalise ``Block`` with an RMSNorm over channels (``block1.norm.g``
instead of ``block1.norm.weight`` / ``.bias``) and add ``dropout``: **their
checkpoints do not load here** (use ``fastdiff.optimize`` on such a model, which
fuses its attention and its RMSNorm blocks with :func:`fastdiff.ops.rms_norm_silu`).  Older 1.x
releases (before memory key/values and RMSNorm in the attention blocks) have
other attention parameters and do not load either.

One deliberate difference: 1.11.1 builds ``final_res_block`` for ``dim * 2`` input
channels although it receives ``dim + init_dim`` (a model with ``init_dim != dim``
cannot run there); here it takes ``init_dim * 2 -> init_dim`` as 2.x does.  With
``init_dim`` left at its default (every trainable 1.11.1 checkpoint) the two agree.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .attention import Attention, LinearAttention
from .group_norm import GroupNorm

__all__ = [
    "Block",
    "Downsample",
    "RandomOrLearnedSinusoidalPosEmb",
    "ResnetBlock",
    "SinusoidalPosEmb",
    "UNet",
    "Upsample",
]


def _default(val, d):
    return val if val is not None else d


def _cast_tuple(t, length: int = 1) -> tuple:
    return t if isinstance(t, tuple) else (t,) * length


def Upsample(dim: int, dim_out: Optional[int] = None) -> nn.Sequential:
    """Nearest x2 then a 3x3 conv (keys ``1.weight``, ``1.bias``)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(dim, _default(dim_out, dim), 3, padding=1))


def Downsample(dim: int, dim_out: Optional[int] = None) -> nn.Sequential:
    """Space-to-depth x2 then a 1x1 conv (keys ``1.weight``, ``1.bias``).

    einops' ``Rearrange('b c (h p1) (w p2) -> b (c p1 p2) h w', p1=2, p2=2)`` of the
    original is exactly ``nn.PixelUnshuffle(2)`` (same channel order), without einops."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, _default(dim_out, dim), 1))


class SinusoidalPosEmb(nn.Module):
    """(B,) times -> (B, dim) ``[sin(t f), cos(t f)]``, f = theta^(-i / (dim/2 - 1))."""

    def __init__(self, dim: int, theta: float = 10000):
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half_dim = self.dim // 2
        emb = math.log(self.theta) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    """Random (fixed) or learned Fourier features: (B,) -> (B, dim + 1) ``[t, sin, cos]``."""

    def __init__(self, dim: int, is_random: bool = False):
        super().__init__()
        assert dim % 2 == 0
        self.weights = nn.Parameter(torch.randn(dim // 2), requires_grad=not is_random)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None]
        freqs = x * self.weights[None, :] * 2 * math.pi
        return torch.cat((x, freqs.sin(), freqs.cos()), dim=-1)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """(B, C) or (B, C, 1, 1) -> (B, C)."""
    return t.flatten(1) if t.dim() > 2 else t


class Block(nn.Module):
    """conv3x3 -> GroupNorm -> ``* (1 + scale) + shift`` -> SiLU, the last three one
    :func:`fastdiff.ops.group_norm_silu` call.  Keys ``proj.*``, ``norm.weight``, ``norm.bias``.

    ``scale_shift``: None or ``(scale, shift)``, each (B, C) or (B, C, 1, 1)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = GroupNorm(groups, dim_out, act="silu")

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        x = self.proj(x)
        if scale_shift is None:
            return self.norm(x)
        scale, shift = scale_shift
        return self.norm(x, scale=_per_channel(scale), shift=_per_channel(shift))


class ResnetBlock(nn.Module):
    """denoising-diffusion-pytorch 1.x ``ResnetBlock``: the time MLP (SiLU, Linear) gives
    a per-channel scale and shift for ``block1``; ``block2``; residual (1x1 conv if the
    width changes).  Keys ``mlp.1.*``, ``block1.*``, ``block2.*``, ``res_conv.*``."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: Optional[int] = None,
                 groups: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) \
            if time_emb_dim is not None else None
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None and time_emb is not None:
            scale_shift = self.mlp(time_emb).chunk(2, dim=1)  # (B, C) each
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020) as denoising-diffusion-pytorch 1.11.1 ``Unet``.

    ``UNet(dim, ...)(x, time, x_self_cond=None)``: x (B, channels, H, W) with H, W
    divisible by ``2 ** (len(dim_mults) - 1)``, time (B,) float or int -> (B, out_dim, H, W).
    See the module docstring for checkpoint compatibility.
    """

    def __init__(
        self,
        dim: int,
        init_dim: Optional[int] = None,
        out_dim: Optional[int] = None,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        self_condition: bool = False,
        resnet_block_groups: int = 8,
        learned_variance: bool = False,
        learned_sinusoidal_cond: bool = False,
        random_fourier_features: bool = False,
        learned_sinusoidal_dim: int = 16,
        sinusoidal_pos_emb_theta: float = 10000,
        attn_dim_head: Union[int, tuple] = 32,
        attn_heads: Union[int, tuple] = 4,
        full_attn: Optional[Union[bool, tuple]] = None,  # default: full attention only innermost
        flash_attn: bool = False,
    ):
        super().__init__()

        self.channels = channels
        self.self_condition = self_condition
        input_channels = channels * (2 if self_condition else 1)

        init_dim = _default(init_dim, dim)
        self.init_conv = nn.Conv2d(input_channels, init_dim, 7, padding=3)

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))

        block_klass = partial(ResnetBlock, groups=resnet_block_groups)

        # time embeddings
        time_dim = dim * 4
        self.random_or_learned_sinusoidal_cond = learned_sinusoidal_cond or random_fourier_features
        if self.random_or_learned_sinusoidal_cond:
            sinu_pos_emb = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, random_fourier_features)
            fourier_dim = learned_sinusoidal_dim + 1
        else:
            sinu_pos_emb = SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta)
            fourier_dim = dim
        self.time_mlp = nn.Sequential(sinu_pos_emb, nn.Linear(fourier_dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))

        # attention
        if not full_attn:
            full_attn = (*((False,) * (len(dim_mults) - 1)), True)
        num_stages = len(dim_mults)
        full_attn = _cast_tuple(full_attn, num_stages)
        attn_heads = _cast_tuple(attn_heads, num_stages)
        attn_dim_head = _cast_tuple(attn_dim_head, num_stages)
        assert len(full_attn) == len(dim_mults)
        FullAttention = partial(Attention, flash=flash_attn)

        # layers
        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        num_resolutions = len(in_out)

        for ind, ((dim_in, dim_out), layer_full_attn, layer_heads, layer_dim_head) in enumerate(
                zip(in_out, full_attn, attn_heads, attn_dim_head)):
            is_last = ind >= (num_resolutions - 1)
            attn_klass = FullAttention if layer_full_attn else LinearAttention
            self.downs.append(nn.ModuleList([
                block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                attn_klass(dim_in, dim_head=layer_dim_head, heads=layer_heads),
                Downsample(dim_in, dim_out) if not is_last else nn.Conv2d(dim_in, dim_out, 3, padding=1),
            ]))

        mid_dim = dims[-1]
        self.mid_block1 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)
        self.mid_attn = FullAttention(mid_dim, heads=attn_heads[-1], dim_head=attn_dim_head[-1])
        self.mid_block2 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)

        for ind, ((dim_in, dim_out), layer_full_attn, layer_heads, layer_dim_head) in enumerate(
                zip(*map(reversed, (in_out, full_attn, attn_heads, attn_dim_head)))):
            is_last = ind == (len(in_out) - 1)
            attn_klass = FullAttention if layer_full_attn else LinearAttention
            self.ups.append(nn.ModuleList([
                block_klass(dim_out + dim_in, dim_out, time_emb_dim=time_dim),
                block_klass(dim_out + dim_in, dim_out, time_emb_dim=time_dim),
                attn_klass(dim_out, dim_head=layer_dim_head, heads=layer_heads),
                Upsample(dim_out, dim_in) if not is_last else nn.Conv2d(dim_out, dim_in, 3, padding=1),
            ]))

        default_out_dim = channels * (1 if not learned_variance else 2)
        self.out_dim = _default(out_dim, default_out_dim)

        self.final_res_block = block_klass(init_dim * 2, init_dim, time_emb_dim=time_dim)
        self.final_conv = nn.Conv2d(init_dim, self.out_dim, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.downs) - 1)

    def forward(self, x: torch.Tensor, time: torch.Tensor,
                x_self_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"UNet: input dimensions {tuple(x.shape[-2:])} must be divisible by {f}")

        if self.self_condition:
            x_self_cond = x_self_cond if x_self_cond is not None else torch.zeros_like(x)
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
