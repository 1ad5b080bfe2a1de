"""Methods whose output is one ``sparsify.block_sparse_attention`` call over a layout node.

:class:`BlockSparseMethod` emits that call; it also emits the variant with Delta's correction fused into the
kernel's epilogue (``sparsify.block_sparse_attention_delta``), which is how ``delta`` fuses over such a base.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from .base import AttentionMethod


class BlockSparseMethod(AttentionMethod):
    """Subclasses give the layout node and the token mask; ``emit`` and ``emit_corrected`` follow."""

    def layout_node(self, params, attn, ctx) -> torch.fx.Node:
        """A node returning (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)."""
        raise NotImplementedError

    def token_mask(self, params, attn) -> tuple[bool, int, int]:
        """(causal, sink, window) applied inside partial blocks."""
        raise NotImplementedError

    def emit(self, params, attn, ctx):
        result = ctx.call(torch.ops.sparsify.block_sparse_attention.default, *self._arguments(params, attn, ctx),
                          attn.match.model_window)
        return ctx.call(operator.getitem, result, 0)

    def emit_corrected(self, params, attn, ctx, row_out: torch.fx.Node, gamma: int, tail: int) -> torch.fx.Node:
        """The same attention with Delta's correction in the epilogue (``row_out``: the strided then tail rows)."""
        return ctx.call(torch.ops.sparsify.block_sparse_attention_delta.default,
                        *self._arguments(params, attn, ctx), row_out, gamma, tail, attn.match.model_window)

    def _arguments(self, params, attn, ctx) -> tuple:
        config = ctx.config
        layout = self.layout_node(params, attn, ctx)
        parts = [ctx.call(operator.getitem, layout, i) for i in range(4)]
        return (ctx.q, ctx.k, ctx.v, *parts, config.block_m, config.block_n, *self.token_mask(params, attn),
                attn.match.scale, config.num_warps, config.num_stages, config.use_tma)
