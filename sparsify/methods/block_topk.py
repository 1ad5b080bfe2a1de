"""``block_topk``: dynamic block sparsity (MInference / FlexPrefill style), per query head.

Mean-pooled query blocks score mean-pooled key blocks; each query block keeps its top ``density`` share of key
blocks, always with its diagonal block and the first ``sink_blocks``. The layout is built per layer (it
depends on that layer's q and k).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Annotated

import sympy
import torch
from pydantic import Field
from torch import Tensor

from ..kernels.layout import block_topk_layout, topk_candidates
from .base import register_method
from .block_sparse import BlockSparseMethod, layout_tensors


@torch.library.custom_op("sparsify::block_topk_layout", mutates_args=())
def block_topk_layout_op(q: Tensor, k: Tensor, density: float, block_m: int, block_n: int, sink_blocks: int,
                         causal: bool, starts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query head, the top ``density`` share of key blocks by pooled scores (plus diagonal and sink blocks),
    among the causally visible ones where ``causal``. ``starts`` (B,): the rows are left-padded ones shifted to
    start at 0, row b's last ``starts[b]`` positions zeros; each row's blocks are then chosen as for that row alone.
    A call that is no plain prefill (its queries after cached keys) takes no ``starts``: its output is the guard's
    to replace."""
    lengths = None if starts is None or q.shape[2] != k.shape[2] else q.shape[2] - starts
    return layout_tensors(block_topk_layout(q, k, density=density, block_m=block_m, block_n=block_n,
                                            sink_blocks=sink_blocks, causal=causal, lengths=lengths))


@block_topk_layout_op.register_fake
def _(q, k, density, block_m, block_n, sink_blocks, causal, starts=None):
    n_q, n_kv = -(-q.shape[2] // block_m), -(-k.shape[2] // block_n)
    candidates = topk_candidates(n_kv, density, sink_blocks)
    counts = q.new_empty((q.shape[0], q.shape[1], n_q), dtype=torch.int32)
    indices = q.new_empty((q.shape[0], q.shape[1], n_q, candidates), dtype=torch.int32)  # candidates, not n_kv
    return counts, indices, counts.clone(), indices.clone()


@dataclass(frozen=True)
class BlockTopkParams:
    density: Annotated[float, Field(gt=0.0, le=1.0, description="Share of key blocks each query block keeps")] = 0.1
    sink_blocks: Annotated[int, Field(ge=0, description="Leading key blocks always kept")] = 1


@register_method
class BlockTopk(BlockSparseMethod):
    name = "block_topk"
    Params = BlockTopkParams
    phases = ("prefill", "diffusion")
    summary = "top-k key blocks per query block from pooled scores (MInference/FlexPrefill-style)"

    def serves_left_padding(self, params):
        return True  # each shifted row is pooled, budgeted and selected over its own length

    def calibration_problem(self, params: BlockTopkParams) -> str:
        return "scattered"

    def visited_pairs(self, params: BlockTopkParams, n: sympy.Symbol, config) -> sympy.Expr:
        kept_blocks = params.density * n / config.block_n + params.sink_blocks + 1
        return n * kept_blocks * config.block_n

    def layout(self, params, q, k, config):
        return block_topk_layout(q, k, density=params.density, block_m=config.block_m, block_n=config.block_n,
                                 sink_blocks=params.sink_blocks)

    def plan(self, params, attn, ctx):
        """A selection, not a length plan: it reads this layer's q and k, so it is built per layer and call."""
        config = ctx.config
        layout = ctx.call(torch.ops.sparsify.block_topk_layout.default, ctx.q, ctx.k, params.density,
                          config.block_m, config.block_n, params.sink_blocks, attn.causal, ctx.row_starts)
        return tuple(ctx.call(operator.getitem, layout, i) for i in range(4))

    def token_mask(self, params, attn):
        return attn.causal, 0, 0
