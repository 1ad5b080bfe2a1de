"""Methods whose output is one ``sparsify.block_sparse_attention`` call over a layout node, and that op.

:class:`BlockSparseMethod` emits that call; it also emits the variant with Delta's correction fused into the
kernel's epilogue (``sparsify.block_sparse_attention_delta``, registered by ``delta``), which is how ``delta``
fuses over such a base.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import Tensor

from ..kernels import block_sparse_attention as kernel
from ..kernels import layout as layouts
from ..ops import check_attention_inputs, inference_only
from .base import AttentionMethod

# -- the op, and the layouts it reads ------------------------------------------------------------------------------
# A layout travels between ops as its four index tensors (counts and indices, partial then full); block sizes and
# the token mask travel as plain arguments.


def block_layout(q, k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n, causal,
                 sink, window, limit) -> layouts.BlockLayout:
    """The :class:`~sparsify.kernels.layout.BlockLayout` an op's arguments describe, for q's and k's lengths."""
    return layouts.BlockLayout(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n,
                               q.shape[2], k.shape[2], layouts.TokenMask(causal, sink, window, limit))


@torch.library.custom_op("sparsify::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
    block_m: int, block_n: int, causal: bool, sink: int, window: int, scale: float, num_warps: int, num_stages: int,
    use_tma: bool, limit: int = 0,
) -> tuple[Tensor, Tensor]:
    """Attention over the key blocks of a layout. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D). ``limit`` > 0: keys
    farther than that from a query are never seen (the model's own sliding window), sink or not.

    Returns out (B, Hq, Lq, D) and lse (B, Hq, Lq) float32. Triton on CUDA, the PyTorch reference elsewhere.
    """
    check_attention_inputs(q, k, v, "sparsify.block_sparse_attention")
    layout = block_layout(q, k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n,
                          causal, sink, window, limit)
    if q.is_cuda:
        config = kernel.KernelConfig(block_m, block_n, num_warps, num_stages, use_tma)
        return kernel.block_sparse_attention(q, k, v, layout, scale, config=config)
    out, lse = kernel.block_sparse_attention_reference(q, k, v, layout, scale)
    return out.contiguous(), lse.contiguous()


@block_sparse_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n, causal, sink,
      window, scale, num_warps, num_stages, use_tma, limit=0):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def layout_tensors(layout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A layout as the four tensors ops pass along: (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)."""
    return layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices


def fake_layout(heads_grid: tuple, q_len, kv_len, block_m: int, block_n: int, device: torch.device):
    """The fake tensors of a layout op's four outputs: counts (*heads_grid, n_q) and indices (*heads_grid, n_q, n_kv),
    int32, for ``q_len`` queries and ``kv_len`` keys (ints or symbolic)."""
    n_q, n_kv = -(-q_len // block_m), -(-kv_len // block_n)
    counts = torch.empty((*heads_grid, n_q), dtype=torch.int32, device=device)
    indices = torch.empty((*heads_grid, n_q, n_kv), dtype=torch.int32, device=device)
    return counts, indices, counts.clone(), indices.clone()


inference_only(block_sparse_attention)


class BlockSparseMethod(AttentionMethod):
    """Subclasses plan the layout and give the token mask; ``run`` and ``emit_corrected`` follow."""

    def plan(self, params, attn, ctx) -> tuple[torch.fx.Node, ...]:
        """The layout's four nodes: (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)."""
        raise NotImplementedError

    def token_mask(self, params, attn) -> tuple[bool, int, int]:
        """(causal, sink, window) applied inside partial blocks."""
        raise NotImplementedError

    def run(self, params, attn, ctx, plan):
        result = ctx.call(torch.ops.sparsify.block_sparse_attention.default,
                          *self._arguments(params, attn, ctx, plan), attn.match.model_window)
        return ctx.call(operator.getitem, result, 0)

    def emit_corrected(self, params, attn, ctx, row_out: torch.fx.Node, gamma: int, tail: int) -> torch.fx.Node:
        """The same attention with Delta's correction in the epilogue (``row_out``: the strided then tail rows)."""
        return ctx.call(torch.ops.sparsify.block_sparse_attention_delta.default,
                        *self._arguments(params, attn, ctx, self.plan(params, attn, ctx)), row_out, gamma, tail,
                        attn.match.model_window)

    def _arguments(self, params, attn, ctx, layout) -> tuple:
        config = ctx.config
        return (ctx.q, ctx.k, ctx.v, *layout, config.block_m, config.block_n, *self.token_mask(params, attn),
                attn.match.scale, config.num_warps, config.num_stages, config.use_tma)
