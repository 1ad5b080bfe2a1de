"""``delta``: Delta Attention (arXiv 2505.11254). A sparse prefill (the ``base`` method) shifts the attention
outputs' distribution; exact key-dense attention for every ``gamma``-th query row measures the shift, and each
row adds the difference measured at the start of its group. The last rows are made exact.

Planned: ``sparsify.delta_rows`` and ``sparsify.row_layout`` (length plans, shared by all layers: built at capture
for a frame of static lengths, else once per forward). Run per layer: ``sparsify.row_attention`` (the strided and
tail rows, key-dense), then the base with the correction fused into its kernel's epilogue
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
import torch.nn.functional as F
from pydantic import BeforeValidator, Field
from torch import Tensor

from ..kernels import block_sparse_attention as kernel
from ..kernels import delta as delta_kernels
from ..kernels import layout as layouts
from ..kernels.block_sparse_attention import fits_epilogue
from ..ops import check_attention_inputs, inference_only
from . import sink_window  # noqa: F401  (the default base must be registered first)
from .base import AttentionMethod, MethodSpec, parse_method_spec, register_method
from .block_sparse import BlockSparseMethod, block_layout, layout_tensors

aten = torch.ops.aten


# -- the ops: strided dense rows and the correction ---------------------------------------------------------------


def delta_tail(length: int, gamma: int, tail: int) -> int:
    """Rows at the end made exact: ``tail`` if given (>= 0), else ``length % gamma + max(128, gamma)``; at most
    ``length``."""
    rows = tail if tail >= 0 else length % gamma + max(128, gamma)
    return min(length, rows) if isinstance(rows, int) and isinstance(length, int) else torch.sym_min(length, rows)


@torch.library.custom_op("sparsify::delta_rows", mutates_args=())
def delta_rows(q_len: int, gamma: int, tail: int, strided: bool, device: torch.device) -> Tensor:
    """Query rows Delta computes densely among ``q_len``, int64 on ``device``: every ``gamma``-th row
    (``i % gamma == 0``; left out when not ``strided``, the ablation without correction), then the tail rows
    (``tail`` -1: the default for ``gamma``). A function of lengths alone (a length plan)."""
    exact = torch.arange(q_len - delta_tail(q_len, gamma, tail), q_len, device=device)
    if not strided:
        return exact
    return torch.cat([torch.arange(0, q_len, gamma, device=device), exact])


@delta_rows.register_fake
def _(q_len, gamma, tail, strided, device):
    rows = (q_len + gamma - 1) // gamma if strided else 0
    return torch.empty((rows + delta_tail(q_len, gamma, tail),), dtype=torch.int64, device=device)


@torch.library.custom_op("sparsify::row_layout", mutates_args=())
def row_layout(rows: Tensor, q_len: int, kv_len: int, group: int, block_m: int, block_n: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The layout :func:`row_attention` reads for query ``rows`` (of ``q_len``, over ``kv_len`` keys; ``group``
    query heads per KV head): its four index tensors, then the packed rows' key positions (``rows + kv_len -
    q_len``, repeated for each query head of a GQA group). A length plan: ``rows`` is one too."""
    positions = rows + (kv_len - q_len)
    layout = delta_kernels.packed_rows_layout(positions, group, kv_len, block_m, block_n)
    return (*layout_tensors(layout), layout.q_positions)


@row_layout.register_fake
def _(rows, q_len, kv_len, group, block_m, block_n):
    packed_rows = rows.shape[0] * group
    n_q, n_kv = -(-packed_rows // block_m), -(-kv_len // block_n)
    counts = rows.new_empty((1, 1, n_q), dtype=torch.int32)
    indices = rows.new_empty((1, 1, n_q, n_kv), dtype=torch.int32)
    return counts, indices, counts.clone(), indices.clone(), rows.new_empty((packed_rows,))


@torch.library.custom_op("sparsify::row_attention", mutates_args=())
def row_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor,
                  kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
                  positions: Tensor, scale: float, block_m: int, block_n: int, num_warps: int, num_stages: int,
                  use_tma: bool) -> Tensor:
    """Query-sparse, key-dense causal attention: the query ``rows`` of q, each over every key up to its own
    position, a GQA group's heads sharing each K/V load; the layout and ``positions`` come from
    :func:`row_layout`. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) -> (B, Hq, R, D)."""
    check_attention_inputs(q, k, v, "sparsify.row_attention")
    layout = layouts.BlockLayout(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n,
                                 positions.shape[0], k.shape[2], layouts.TokenMask(causal=True), q_positions=positions)
    config = kernel.KernelConfig(block_m, block_n, num_warps, num_stages, use_tma) if q.is_cuda else None
    return delta_kernels.row_attention(q[:, :, rows], k, v, layout, scale, config=config).contiguous()


@row_attention.register_fake
def _(q, k, v, rows, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, positions, scale, block_m,
      block_n, num_warps, num_stages, use_tma):
    return q.new_empty((q.shape[0], q.shape[1], rows.shape[0], v.shape[-1]))


def _correction(sparse_out: Tensor, row_out: Tensor, gamma: int, tail: int) -> kernel.DeltaCorrection:
    return kernel.DeltaCorrection(row_out, gamma, delta_tail(sparse_out.shape[2], gamma, tail))


@torch.library.custom_op("sparsify::delta_correction", mutates_args=())
def delta_correction(sparse_out: Tensor, row_out: Tensor, gamma: int, tail: int) -> Tensor:
    """Delta's correction: ``O[j] = O_sparse[j] + (O_dense[i] - O_sparse[i])`` with ``i = j - j % gamma``, then
    the tail rows replaced by their exact values. ``row_out`` holds the rows of :func:`delta_rows` in order.
    Computed in float32, returned in ``sparse_out``'s dtype."""
    correction = _correction(sparse_out, row_out, gamma, tail)
    if sparse_out.is_cuda:
        return delta_kernels.delta_correction(sparse_out, correction)
    return delta_kernels.delta_correction_reference(sparse_out, correction).contiguous()


@delta_correction.register_fake
def _(sparse_out, row_out, gamma, tail):
    return sparse_out.new_empty(sparse_out.shape)


@torch.library.custom_op("sparsify::block_sparse_attention_delta", mutates_args=())
def block_sparse_attention_delta(
    q: Tensor, k: Tensor, v: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
    block_m: int, block_n: int, causal: bool, sink: int, window: int, scale: float, num_warps: int, num_stages: int,
    use_tma: bool, row_out: Tensor, gamma: int, tail: int, limit: int = 0,
) -> Tensor:
    """``sparsify.block_sparse_attention`` followed by :func:`delta_correction`, fused into the kernel's epilogue on
    CUDA (``gamma`` a power of 2 dividing ``block_m``). Returns the corrected output (B, Hq, Lq, D)."""
    check_attention_inputs(q, k, v, "sparsify.block_sparse_attention_delta")
    layout = block_layout(q, k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n,
                          causal, sink, window, limit)
    correction = _correction(q, row_out, gamma, tail)
    if q.is_cuda:
        config = kernel.KernelConfig(block_m, block_n, num_warps, num_stages, use_tma)
        return kernel.block_sparse_attention(q, k, v, layout, scale, config=config, correction=correction)[0]
    out = kernel.block_sparse_attention_reference(q, k, v, layout, scale)[0]
    return delta_kernels.delta_correction_reference(out, correction).contiguous()


@block_sparse_attention_delta.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n, causal, sink,
      window, scale, num_warps, num_stages, use_tma, row_out, gamma, tail, limit=0):
    return q.new_empty(q.shape)


def padded_tail_rows(gamma: int, tail: int) -> int:
    """The most tail rows any row of a padded batch can have: ``tail`` if given, else the default's largest,
    ``gamma - 1 + max(128, gamma)``."""
    return tail if tail >= 0 else gamma - 1 + max(128, gamma)


@torch.library.custom_op("sparsify::delta_padded", mutates_args=())
def delta_padded(sparse_out: Tensor, strided_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 key_padding: Tensor | None, starts: Tensor, scale: float, gamma: int, tail: int,
                 correct: bool) -> Tensor:
    """Delta on a left-padded batch, each row as it would be alone. ``sparse_out`` (B, Hq, L, D) is the base over
    the rows shifted to start at 0 (row b's ``n_b = L - starts[b]`` real tokens first); ``strided_out``
    (B, Hq, ceil(L / gamma), D) the exact rows ``i % gamma == 0`` of those shifted rows (unused when not
    ``correct``). ``q``, ``k``, ``v`` are the batch as given (right-aligned: row b's tokens at [starts[b], L)) and
    ``key_padding`` (B, >= L) its padding: the exact tail rows are computed from them, the last
    :func:`padded_tail_rows` rows of the batch, which hold every row's own tail (``delta_tail(n_b, gamma, tail)``
    rows). Returns (B, Hq, L, D) in the shifted frame: row b's tail exact, its other rows corrected by the
    difference at the start of their group (or the base alone when not ``correct``); rows past ``n_b`` are the
    base's (they are padding once shifted back). PyTorch on every device (a padded batch's path, not the fused
    kernel's): float32 temporaries of the output's size."""
    batch, heads, length, _ = sparse_out.shape
    exact_rows = min(length, padded_tail_rows(gamma, tail))
    positions = torch.arange(length - exact_rows, length, device=q.device)[:, None]
    keys = torch.arange(length, device=q.device)[None, :]
    visible = (keys <= positions)[None, None]
    if key_padding is not None:
        visible = visible & key_padding[:, None, None, :length].to(torch.bool)
    exact = F.scaled_dot_product_attention(q[:, :, length - exact_rows:], k[:, :, :length], v[:, :, :length],
                                           attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    real = length - starts                                                     # (B,)
    row_tail = torch.minimum(real, torch.full_like(real, tail) if tail >= 0
                             else real % gamma + max(128, gamma))             # (B,)
    out = sparse_out.to(torch.float32, copy=True)  # a new tensor: the op returns no alias of an input
    if correct:
        # Row j's group starts at j - j % gamma: add that row's difference, exact minus sparse (float32, in place).
        groups = torch.arange(length, device=q.device) // gamma
        out += (strided_out.float() - sparse_out[:, :, ::gamma].float()).index_select(2, groups)
    # Row b's tail is at shifted positions [n_b - row_tail_b, n_b), rows [exact_rows - row_tail_b, exact_rows) of
    # ``exact``; only the (B, Hq, exact_rows, D) candidates are gathered and written.
    offsets = torch.arange(exact_rows, device=q.device)[None, :]
    targets = real[:, None] - exact_rows + offsets                             # (B, exact_rows)
    in_tail = (offsets >= exact_rows - row_tail[:, None]) & (targets >= 0)
    index = targets.clamp(min=0)[:, None, :, None].expand(batch, heads, exact_rows, out.shape[-1])
    values = torch.where(in_tail[:, None, :, None], exact.float(), out.gather(2, index))
    out.scatter_(2, index, values)
    return out.to(sparse_out.dtype)


@delta_padded.register_fake
def _(sparse_out, strided_out, q, k, v, key_padding, starts, scale, gamma, tail, correct):
    return torch.empty_like(sparse_out)


inference_only(row_attention, delta_correction, block_sparse_attention_delta, delta_padded)


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

    def calibration_problem(self, params: DeltaParams) -> str:
        return params.base.method.calibration_problem(params.base.params)  # the base kernel runs the launch

    def visited_pairs(self, params: DeltaParams, n: sympy.Symbol, config) -> sympy.Expr:
        tail = params.tail if params.tail is not None else max(128, params.gamma) + params.gamma / 2
        strided = n * n / (2 * params.gamma) if params.correct else 0
        return params.base.method.visited_pairs(params.base.params, n, config) + strided + tail * n

    def serves_left_padding(self, params: DeltaParams) -> bool:
        # Each shifted row is the base's (when the base serves it) with its own strided rows; the tails, at each
        # row's own end, come from the batch as given (``sparsify.delta_padded``).
        return params.base.method.serves_left_padding(params.base.params)

    def plan(self, params: DeltaParams, attn, ctx) -> tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]:
        """The exact rows and their layout: length plans, shared by every layer of the same lengths. (The base
        plans its own layout when it runs.) A left-padded batch's rows: the strided ones only (its tails differ
        per row: ``delta_padded`` computes them), none for the ablation."""
        tail = -1 if params.tail is None else params.tail
        if ctx.row_starts is not None:
            if not params.correct:
                return None, None  # the ablation on padded rows computes no rows of its own
            tail = 0
        rows = ctx.length_plan(("delta_rows", params.gamma, tail, params.correct, str(attn.q_len)),
                               torch.ops.sparsify.delta_rows.default,
                               lambda: (ctx.length(ctx.q, 2, attn.q_len), params.gamma, tail, params.correct,
                                        ctx.device))
        tile = row_launch(ctx.config, attn.dtype)
        layout = ctx.length_plan(("delta_row_layout", params.gamma, tail, params.correct, str(attn.q_len),
                                  str(attn.kv_len), attn.group_size, tile.block_m, tile.block_n),
                                 torch.ops.sparsify.row_layout.default,
                                 lambda: (rows, ctx.length(ctx.q, 2, attn.q_len), ctx.length(ctx.k, 2, attn.kv_len),
                                          attn.group_size, tile.block_m, tile.block_n))
        return rows, layout

    def run(self, params: DeltaParams, attn, ctx, plan):
        rows, layout = plan
        config, tail = ctx.config, -1 if params.tail is None else params.tail
        base = params.base.method
        if ctx.row_starts is not None and not params.correct:  # the ablation: no strided rows to compute
            sparse_out = base.emit(params.base.params, attn, ctx)
            return self._padded(params, attn, ctx, sparse_out, sparse_out)
        tile = row_launch(config, attn.dtype)
        row_out = ctx.call(torch.ops.sparsify.row_attention.default, ctx.q, ctx.k, ctx.v, rows, *layout,
                           attn.match.scale, tile.block_m, tile.block_n, tile.num_warps, tile.num_stages,
                           tile.use_tma)
        if ctx.row_starts is not None:
            return self._padded(params, attn, ctx, base.emit(params.base.params, attn, ctx), row_out)
        if not params.correct:
            kept = ctx.call(operator.sub, ctx.size(ctx.q, 2), ctx.size(row_out, 2))
            sparse_out = base.emit(params.base.params, attn, ctx)
            return ctx.call(aten.cat.default, [ctx.call(aten.slice.Tensor, sparse_out, 2, 0, kept), row_out], 2)
        if not self._unfused_reason(params, config):
            return base.emit_corrected(params.base.params, attn, ctx, row_out, params.gamma, tail)
        sparse_out = base.emit(params.base.params, attn, ctx)
        return ctx.call(torch.ops.sparsify.delta_correction.default, sparse_out, row_out, params.gamma, tail)

    @staticmethod
    def _padded(params: DeltaParams, attn, ctx, sparse_out, strided_out):
        """A left-padded batch's rows (shifted): the base's output corrected, each row's own tail exact."""
        q, k, v = ctx.unshifted
        tail = -1 if params.tail is None else params.tail
        return ctx.call(torch.ops.sparsify.delta_padded.default, sparse_out, strided_out, q, k, v, ctx.key_padding,
                        ctx.row_starts, attn.match.scale, params.gamma, tail, params.correct)


def row_launch(config, dtype: torch.dtype):
    """The launch config of the strided rows. 16-bit inputs: 128x128 tiles, 8 warps (long key-dense rows; fastest
    in an exploratory H100 sweep at 128K tokens, not kept as a results file; at 32K the base's 64x64 tiles take 9%
    less time, at 7.5K 22% more: benchmarks/results/delta_rows.md), stages and TMA as the cost model chose. float32
    (computed in IEEE float32): the base's own config, since 128x128 float32 tiles ran 7.3x slower on SmolLM2's
    shape (9/3 heads, D=64, 7.5K tokens; 6% faster with D=128 at 32K, where they fit only one pipeline stage)."""
    if dtype == torch.float32:
        return config
    return dataclasses.replace(config, block_m=128, block_n=128, num_warps=8)
