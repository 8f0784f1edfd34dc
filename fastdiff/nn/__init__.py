"""Drop-in modules: same constructor signatures and state_dict keys as what they replace."""

from .attention import Attention, LinearAttention
from .diffusers_processor import FastdiffAttnProcessor
from .group_norm import GroupNorm
from .unet import Block, ResnetBlock, UNet

__all__ = [
    "Attention",
    "Block",
    "FastdiffAttnProcessor",
    "GroupNorm",
    "LinearAttention",
    "ResnetBlock",
    "UNet",
]
