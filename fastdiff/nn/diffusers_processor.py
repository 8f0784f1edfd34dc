"""An attention processor for diffusers' ``Attention`` on fastdiff's attention op.

    model.set_attn_processor(FastdiffAttnProcessor())   # any diffusers model

It is diffusers' ``AttnProcessor2_0`` (0.42) with the core attention routed
through :func:`fastdiff.nn.attention.dot_product_attention`
(``fastdiff.ops.attention`` where it exists, else SDPA): same call signature,
same handling of ``spatial_norm``, 4-D (B, C, H, W) inputs, ``group_norm``,
cross-attention (``encoder_hidden_states``, ``norm_cross``), ``norm_q`` /
``norm_k``, ``to_out``, ``residual_connection`` and ``rescale_output_factor``.
A call with an ``attention_mask`` runs SDPA with the prepared mask, exactly as
``AttnProcessor2_0`` does.  The softmax scale is ``attn.scale``, which is what
``AttnProcessor2_0`` uses implicitly (head_dim^-0.5) for the default
``scale_qk=True`` and what diffusers' fallback ``AttnProcessor`` uses for
``scale_qk=False``.  diffusers itself is not imported: the processor only calls
the ``attn`` module it is given.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .attention import dot_product_attention

__all__ = ["FastdiffAttnProcessor"]


class FastdiffAttnProcessor:
    """diffusers attention processor (``AttnProcessor2_0`` semantics) on fastdiff attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B, heads, Nq or 1, Nk), as SDPA takes it
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, Nq, heads * head_dim)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, Nk, heads * head_dim)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nq, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nk, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = dot_product_attention(query, key, value, scale=attn.scale)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
        # (B, heads, Nq, head_dim) -> (B, Nq, heads * head_dim)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            # a channels_last view of the (B, N, C) projection output
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            # residual first: the sum takes the first operand's layout, so a contiguous
            # input gives a contiguous output.  diffusers' `hidden_states + residual` hands
            # channels_last on, and every convolution downstream then copies its weight
            # to channels_last on each call (7-10 % of a CPU forward / training step of
            # google/ddpm-cifar10-32's UNet2DModel at batch 2).  Same values: a + b is b + a.
            hidden_states = residual + hidden_states
        if attn.rescale_output_factor != 1.0:  # x / 1.0 is x exactly: one pass saved
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
