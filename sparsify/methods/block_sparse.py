"""Emitting a ``sparsify.block_sparse_attention`` call over a layout node (shared by block-sparse methods)."""

from __future__ import annotations

import operator

import torch
import torch.fx


def emit_block_sparse(ctx, attn, layout: torch.fx.Node, *, causal: bool, sink: int = 0, window: int = 0):
    """``layout`` is a node returning (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)."""
    config = ctx.config
    parts = [ctx.call(operator.getitem, layout, i) for i in range(4)]
    result = ctx.call(torch.ops.sparsify.block_sparse_attention.default, ctx.q, ctx.k, ctx.v, *parts,
                      config.block_m, config.block_n, causal, sink, window, attn.match.scale,
                      config.num_warps, config.num_stages, config.use_tma)
    return ctx.call(operator.getitem, result, 0)
