"""``dense``: exact attention through SDPA. The baseline, and where every other method falls back to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.layout import causal_layout
from .base import AttentionMethod, register_method


@dataclass(frozen=True)
class DenseParams:
    """No parameters."""


@register_method
class Dense(AttentionMethod):
    name = "dense"
    Params = DenseParams
    summary = "exact attention (SDPA); the baseline and the fallback"

    def unsupported_reason(self, params, attn):
        return None

    def layout(self, params, q, k, config):
        return causal_layout(q.shape[2], k.shape[2], config.block_m, config.block_n, device=q.device)

    def run(self, params, attn, ctx, plan):
        if attn.match.causal_by_position:  # a described mask: the op that computes exactly that
            return ctx.call(torch.ops.sparsify.attention.default, ctx.q, ctx.k, ctx.v, ctx.key_padding,
                            ctx.query_offset, ctx.plain, attn.match.is_causal, attn.match.scale, [],
                            attn.match.model_window)
        return ctx.call(torch.ops.sparsify.dense_attention.default, ctx.q, ctx.k, ctx.v, ctx.attn_mask,
                        attn.match.is_causal, attn.match.scale)
