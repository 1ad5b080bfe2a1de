"""``block_topk``: dynamic block sparsity (MInference / FlexPrefill style), per query head.

Mean-pooled query blocks score mean-pooled key blocks; each query block keeps its top ``density`` share of key
blocks, always with its diagonal block and the first ``sink_blocks``. The layout is built per layer (it
depends on that layer's q and k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import sympy
import torch
from pydantic import Field

from ..kernels.layout import block_topk_layout
from .base import register_method
from .block_sparse import BlockSparseMethod


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

    def visited_pairs(self, params: BlockTopkParams, n: sympy.Symbol, config) -> sympy.Expr:
        kept_blocks = params.density * n / config.block_n + params.sink_blocks + 1
        return n * kept_blocks * config.block_n

    def layout(self, params, q, k, config):
        return block_topk_layout(q, k, density=params.density, block_m=config.block_m, block_n=config.block_n,
                                 sink_blocks=params.sink_blocks)

    def layout_node(self, params, attn, ctx):
        config = ctx.config
        return ctx.call(torch.ops.sparsify.block_topk_layout.default, ctx.q, ctx.k, params.density,
                        config.block_m, config.block_n, params.sink_blocks)

    def token_mask(self, params, attn):
        return attn.causal, 0, 0
