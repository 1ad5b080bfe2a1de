"""``delta``: Delta Attention (arXiv 2505.11254). A sparse prefill (the ``base`` method) shifts the attention
outputs' distribution; exact key-dense attention for every ``gamma``-th query row measures the shift, and each
row adds the difference measured at the start of its group. The last rows are made exact.

Emitted as graph nodes: ``sparsify.delta_rows`` and ``sparsify.row_layout`` (plans shared by all layers),
``sparsify.row_attention`` (the strided and tail rows, key-dense), then the base with the correction fused into its kernel's epilogue
(``sparsify.block_sparse_attention_delta``) when the base is block-sparse and ``gamma`` a power of 2 dividing the
tile rows; otherwise the base's own nodes and ``sparsify.delta_correction``. ``correct: false`` is the ablation
without the correction: only the exact tail, by slicing and concatenation.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Annotated

import sympy
import torch
from pydantic import BeforeValidator, Field

from ..kernels.block_sparse_attention import fits_epilogue
from . import sink_window  # noqa: F401  (the default base must be registered first)
from .base import AttentionMethod, MethodSpec, parse_method_spec, register_method
from .block_sparse import BlockSparseMethod

aten = torch.ops.aten


def _base(value) -> MethodSpec:
    return parse_method_spec(value, "base")


@dataclass(frozen=True)
class DeltaParams:
    base: Annotated[MethodSpec, BeforeValidator(_base)] = parse_method_spec(
        {"use": "sink_window", "with": {"sink": 64, "window": 2048}}, "base")
    gamma: Annotated[int, Field(ge=1, description="Every gamma-th query row is computed densely")] = 64
    tail: Annotated[int | None, Field(ge=0, description="Exact rows at the end (default N % gamma + max(128, gamma))")] = None
    correct: Annotated[bool, Field(description="Apply the strided correction; false keeps only the exact tail "
                                               "(an ablation)")] = True
    fuse: Annotated[bool, Field(description="Fuse the correction into a block-sparse base's epilogue")] = True


@register_method
class Delta(AttentionMethod):
    name = "delta"
    Params = DeltaParams
    phases = ("prefill",)
    summary = "sparse prefill + strided dense rows whose difference corrects their neighbours"

    def unsupported_reason(self, params: DeltaParams, attn):
        reason = super().unsupported_reason(params, attn)
        if reason is None and not attn.causal:
            reason = "delta corrects causal prefill; this attention is bidirectional"
        if reason is None:
            base_reason = params.base.method.unsupported_reason(params.base.params, attn)
            reason = f"base {params.base.name}: {base_reason}" if base_reason else None
        return reason

    def structure(self, params: DeltaParams, config) -> str:
        if not params.correct:
            return "ablation: the base with the exact tail only, no correction"
        reason = self._unfused_reason(params, config)
        return f"correction in a separate pass: {reason}" if reason else "correction fused into the base kernel's epilogue"

    @staticmethod
    def _unfused_reason(params: DeltaParams, config) -> str:
        if not params.fuse:
            return "fuse is false"
        if not isinstance(params.base.method, BlockSparseMethod):
            return f"base {params.base.name} is not a block-sparse kernel"
        if not fits_epilogue(params.gamma, config.block_m):
            return f"gamma {params.gamma} is not a power of 2 dividing the tile's {config.block_m} rows"
        return ""

    def visited_pairs(self, params: DeltaParams, n: sympy.Symbol, config) -> sympy.Expr:
        tail = params.tail if params.tail is not None else max(128, params.gamma) + params.gamma / 2
        strided = n * n / (2 * params.gamma) if params.correct else 0
        return params.base.method.visited_pairs(params.base.params, n, config) + strided + tail * n

    def emit(self, params: DeltaParams, attn, ctx):
        config, tail = ctx.config, -1 if params.tail is None else params.tail
        rows = ctx.shared(("delta_rows", params.gamma, tail, params.correct, str(attn.q_len)),
                          lambda: ctx.call(torch.ops.sparsify.delta_rows.default, ctx.q, params.gamma, tail,
                                           params.correct))
        tile = row_launch(config, attn.dtype)
        layout = ctx.shared(("delta_row_layout", params.gamma, tail, params.correct, str(attn.q_len),
                             str(attn.kv_len), attn.group_size),
                            lambda: ctx.call(torch.ops.sparsify.row_layout.default, ctx.q, ctx.k, rows, tile.block_m,
                                             tile.block_n))
        row_out = ctx.call(torch.ops.sparsify.row_attention.default, ctx.q, ctx.k, ctx.v, rows,
                           *(ctx.call(operator.getitem, layout, i) for i in range(5)), attn.match.scale,
                           tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.use_tma)
        base = params.base.method
        if not params.correct:
            kept = ctx.call(operator.sub, ctx.size(ctx.q, 2), ctx.size(row_out, 2))
            sparse_out = base.emit(params.base.params, attn, ctx)
            return ctx.call(aten.cat.default, [ctx.call(aten.slice.Tensor, sparse_out, 2, 0, kept), row_out], 2)
        if not self._unfused_reason(params, config):
            return base.emit_corrected(params.base.params, attn, ctx, row_out, params.gamma, tail)
        sparse_out = base.emit(params.base.params, attn, ctx)
        return ctx.call(torch.ops.sparsify.delta_correction.default, sparse_out, row_out, params.gamma, tail)


def row_launch(config, dtype: torch.dtype):
    """The launch config of the strided rows. 16-bit inputs: 128x128 tiles, 8 warps (long key-dense rows; fastest
    in an exploratory H100 sweep at 128K tokens, not kept as a results file; at 32K the base's 64x64 tiles take 9%
    less time, at 7.5K 22% more: benchmarks/results/delta_rows.md), stages and TMA as the cost model chose. float32
    (computed in IEEE float32): the base's own config, since 128x128 float32 tiles ran 7.3x slower on SmolLM2's
    shape (9/3 heads, D=64, 7.5K tokens; 6% faster with D=128 at 32K, where they fit only one pipeline stage)."""
    if dtype == torch.float32:
        return config
    return dataclasses.replace(config, block_m=128, block_n=128, num_warps=8)
