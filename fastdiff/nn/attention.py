"""``fastdiff.nn.Attention`` and ``fastdiff.nn.LinearAttention``: the DDPM U-Net's
attention blocks on fastdiff's attention ops.

Drop-in for the modules of lucidrains' denoising-diffusion-pytorch, matched to
its current release, 2.3.4 (``denoising_diffusion_pytorch/denoising_diffusion_pytorch.py``):
same constructor arguments and defaults, same parameters created in the same order
(so a seeded construction gives identical weights), same state_dict keys, so
checkpoints load in both directions:

    LinearAttention(dim, heads=4, dim_head=32, num_mem_kv=4)
        mem_kv (2, heads, dim_head, num_mem_kv), norm.g, to_qkv.weight,
        to_out.0.weight, to_out.0.bias, to_out.1.g
    Attention(dim, heads=4, dim_head=32, num_mem_kv=4, flash=False)
        mem_kv (2, heads, num_mem_kv, dim_head), norm.g, to_qkv.weight,
        to_out.weight, to_out.bias

Since 2.x both blocks RMS-normalise their input (``norm``), prepend
``num_mem_kv`` learned memory keys/values to k and v, and the linear one
RMS-normalises its output (``to_out.1``); 2.x's LinearAttention no longer divides
v by the number of positions, which :func:`linear_attention` does, so the
module passes ``scale * Nk`` to cancel it exactly.  ``flash`` only selected an
SDPA backend there; here the core is always :func:`fastdiff.ops.attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear_attention import linear_attention
from ..ops.rms_norm import rms_norm_silu

try:
    from ..ops.attention import attention as _fastdiff_attention
except ImportError:  # the flash attention op is not in this build: SDPA computes the same
    _fastdiff_attention = None

__all__ = ["Attention", "LinearAttention", "RMSNorm", "dot_product_attention"]


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """Non-causal attention, q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D):
    ``fastdiff.ops.attention`` where it exists, else ``F.scaled_dot_product_attention``."""
    if _fastdiff_attention is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _fastdiff_attention(q, k, v, scale=scale)


class RMSNorm(nn.Module):
    """denoising-diffusion-pytorch's RMSNorm over channels: normalize(x, dim=1) * g * sqrt(dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.g.dtype != x.dtype:  # the library promotes x * g: keep its lines
            return F.normalize(x, dim=1) * self.g * self.scale
        return rms_norm_silu(x, self.g.reshape(-1), act=None)


def _qkv(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMS-normalised x (B, C, h, w) -> q, k, v views (B, heads, dim_head, h*w) of one 1x1 conv."""
    b, _, h, w = x.shape
    qkv = module.to_qkv(module.norm(x))  # (B, 3 * heads * dim_head, h, w)
    return qkv.reshape(b, 3, module.heads, -1, h * w).unbind(1)


class LinearAttention(nn.Module):
    """The U-Net's linear attention block (denoising-diffusion-pytorch 2.3.4), on
    :func:`fastdiff.ops.linear_attention`.  x (B, dim, h, w) -> (B, dim, h, w)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads

        self.norm = RMSNorm(dim)

        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, num_mem_kv))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)

        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), RMSNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = _qkv(self, x)  # (B, heads, dim_head, h*w) each
        # memory keys / values (B, heads, dim_head, num_mem_kv)
        mk, mv = self.mem_kv.unsqueeze(1).expand(-1, b, -1, -1, -1).unbind(0)
        k, v = torch.cat((mk, k), dim=-1), torch.cat((mv, v), dim=-1)  # (B, heads, dim_head, Nk)
        # 2.x has no v / Nk: scale * Nk cancels the op's division
        out = linear_attention(q, k, v, scale=self.scale * k.shape[-1])  # (B, heads, dim_head, h*w)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """The U-Net's full attention block (denoising-diffusion-pytorch 2.3.4), on
    :func:`fastdiff.ops.attention`.  x (B, dim, h, w) -> (B, dim, h, w)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4,
                 flash: bool = False):
        super().__init__()
        self.heads = heads
        self.flash = flash
        hidden_dim = dim_head * heads

        self.norm = RMSNorm(dim)

        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.transpose(-1, -2) for t in _qkv(self, x))  # (B, heads, h*w, dim_head) views
        # memory keys / values (B, heads, num_mem_kv, dim_head)
        mk, mv = self.mem_kv.unsqueeze(1).expand(-1, b, -1, -1, -1).unbind(0)
        k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)  # (B, heads, Nk, dim_head)
        out = dot_product_attention(q, k, v)  # (B, heads, h*w, dim_head)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))
