"""``sink_window`` (StreamingLLM): query p sees key j <= p when ``j < sink`` or ``p - j < window``.

Token-exact: the kernel skips key blocks outside the pattern and masks inside the partial ones. One layout per
length serves every layer and head (a length plan: built at capture for a frame of static lengths, else once per
forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import sympy
import torch
from pydantic import Field
from torch import Tensor

from ..kernels.layout import sink_window_layout
from .base import register_method
from .block_sparse import BlockSparseMethod, fake_layout, layout_tensors


@torch.library.custom_op("sparsify::sink_window_layout", mutates_args=())
def sink_window_layout_op(q_len: int, kv_len: int, sink: int, window: int, block_m: int, block_n: int, limit: int,
                          device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sink + sliding-window layout of ``q_len`` queries over ``kv_len`` keys, on ``device``, shared by all
    heads; within the model's own sliding window ``limit`` where that is > 0. A function of lengths alone: a plan
    built once per length (``RewriteContext.length_plan``)."""
    return layout_tensors(sink_window_layout(q_len, kv_len, sink, window, block_m, block_n, limit=limit,
                                             device=device))


@sink_window_layout_op.register_fake
def _(q_len, kv_len, sink, window, block_m, block_n, limit, device):
    return fake_layout((1, 1), q_len, kv_len, block_m, block_n, device)


@dataclass(frozen=True)
class SinkWindowParams:
    sink: Annotated[int, Field(ge=0, description="Tokens at the start every query sees")] = 64
    window: Annotated[int, Field(gt=0, description="Most recent tokens each query sees, itself included")] = 2048


@register_method
class SinkWindow(BlockSparseMethod):
    name = "sink_window"
    Params = SinkWindowParams
    phases = ("prefill",)
    summary = "sink + sliding window (StreamingLLM), token-exact block-sparse prefill"
    serves_model_window = True  # its layout and kernel take the model's window as a hard limit

    def serves_left_padding(self, params):
        return True  # sink and window are relative to a row's first token

    def unsupported_reason(self, params, attn):
        reason = super().unsupported_reason(params, attn)
        if reason is None and not attn.causal:
            reason = "sink_window is causal; this attention is bidirectional"
        return reason

    def visited_pairs(self, params: SinkWindowParams, n: sympy.Symbol, config) -> sympy.Expr:
        """Pairs in visited blocks: each query block reads about sink + window + one block on each side."""
        return n * (params.sink + params.window + config.block_m + config.block_n)

    def layout(self, params, q, k, config):
        return sink_window_layout(q.shape[2], k.shape[2], params.sink, params.window, config.block_m,
                                  config.block_n, device=q.device)

    def plan(self, params, attn, ctx):
        config = ctx.config
        return ctx.length_plan(
            ("sink_window_layout", params, str(attn.q_len), str(attn.kv_len), config.block_m, config.block_n,
             attn.match.model_window),
            torch.ops.sparsify.sink_window_layout.default,
            lambda: (ctx.length(ctx.q, 2, attn.q_len), ctx.length(ctx.k, 2, attn.kv_len), params.sink,
                     params.window, config.block_m, config.block_n, attn.match.model_window, ctx.device))

    def token_mask(self, params, attn):
        return True, params.sink, params.window
