"""``delta``: Delta Attention (arXiv 2505.11254). A sparse prefill (the ``base`` method) shifts the attention
outputs' distribution; exact key-dense attention for every ``gamma``-th query row measures the shift, and each
row adds the difference measured at the start of its group. The last rows are made exact.

Emitted as separate graph nodes: the base method's nodes, ``sparsify.delta_rows`` (shared plan),
``sparsify.row_attention`` (the strided and tail rows, key-dense) and ``sparsify.delta_correction``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import sympy
import torch
from pydantic import BeforeValidator, Field

from . import sink_window  # noqa: F401  (the default base must be registered first)
from .base import AttentionMethod, MethodSpec, parse_method_spec, register_method


def _base(value) -> MethodSpec:
    return parse_method_spec(value, "base")


@dataclass(frozen=True)
class DeltaParams:
    base: Annotated[MethodSpec, BeforeValidator(_base)] = parse_method_spec(
        {"use": "sink_window", "with": {"sink": 64, "window": 2048}}, "base")
    gamma: Annotated[int, Field(ge=1, description="Every gamma-th query row is computed densely")] = 64
    tail: Annotated[int | None, Field(ge=0, description="Exact rows at the end (default N % gamma + max(128, gamma))")] = None


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

    def visited_pairs(self, params: DeltaParams, n: sympy.Symbol, config) -> sympy.Expr:
        tail = params.tail if params.tail is not None else max(128, params.gamma) + params.gamma / 2
        return params.base.method.visited_pairs(params.base.params, n, config) + n * n / (2 * params.gamma) + tail * n

    def emit(self, params: DeltaParams, attn, ctx):
        config, tail = ctx.config, -1 if params.tail is None else params.tail
        sparse_out = params.base.method.emit(params.base.params, attn, ctx)
        rows = ctx.shared(("delta_rows", params.gamma, tail, str(attn.q_len)),
                          lambda: ctx.call(torch.ops.sparsify.delta_rows.default, ctx.q, params.gamma, tail))
        row_out = ctx.call(torch.ops.sparsify.row_attention.default, ctx.q, ctx.k, ctx.v, rows, attn.match.scale,
                           config.block_m, config.block_n, config.num_warps, config.num_stages, config.use_tma)
        return ctx.call(torch.ops.sparsify.delta_correction.default, sparse_out, row_out, params.gamma, tail)
