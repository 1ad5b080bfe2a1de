"""``sparsed``: SparseD (arXiv 2509.24014), sparse attention for diffusion language models.

A diffusion LM runs bidirectional attention over the whole sequence (prompt and generation) at every denoising
step, and each head's pattern barely changes across steps after the first ones. So: the first steps run dense;
at step ``end = int(steps * dense_fraction) + 1`` each layer runs dense once more and builds its per-query-head
block pattern from that step's softmax (``sparsify.sparsed_pattern``, ``kernels/sparsed.py``: tile means, top-k
per query block, prompt and generation keys selected in isolation), kept in the sequence state; every later step
runs the bidirectional block-sparse kernel over the kept blocks (``sparsify.sparsed_attention``). There is no
refresh.

The step comes from the diffusion loop (``sparsify.diffusion``) through the state's host-side clock
(:data:`~sparsify.state.DIFFUSION_CLOCK`): one graph serves every step, the ops branch on the clock without a
device sync, and nothing recompiles when the step advances. A new request gets a new state (patterns unbuilt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import sympy
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor

from ..errors import ShapeError, StateError
from ..kernels import block_sparse_attention as block_kernels
from ..kernels import sparsed as pattern_kernels
from ..kernels.layout import BlockLayout, TokenMask
from ..ops import check_attention_inputs, inference_only
from ..state import DIFFUSION_CLOCK, StateSpec
from .base import AttentionMethod, register_method


def kernel_block_n(block_size: int) -> int:
    """The key block of the sparse kernel: 64 tokens, or the pattern's block where that is smaller (it must
    divide the pattern's block, which a power of 2 of at least 16 guarantees)."""
    return min(block_size, 64)


def _clock(clock: Tensor) -> tuple[int, int, int]:
    """(step, steps, prompt tokens) of a (B, 3) host clock whose rows agree."""
    if clock.device.type != "cpu":
        raise StateError(f"sparsed: the diffusion clock must be a host tensor, got one on {clock.device}")
    rows = clock.tolist()
    if any(row != rows[0] for row in rows):
        raise ShapeError("sparsed: every row of a batch must be at the same step with the same prompt length; got "
                         f"clocks {rows}")
    return tuple(rows[0])


def switch_step(steps: int, dense_fraction: float) -> int:
    """The step that runs dense and builds the patterns: ``int(steps * dense_fraction) + 1`` (later steps are
    sparse)."""
    return int(steps * dense_fraction) + 1


# -- the ops --------------------------------------------------------------------------------------------------------


def _dense_lse(q: Tensor, k: Tensor, v: Tensor, first_block: int, scale: float, block_size: int) -> Tensor:
    """The rows' log-sum-exp over the keys from pattern block ``first_block`` on (0: all keys): the block-sparse
    kernel over that layout on CUDA, its reference elsewhere."""
    length = q.shape[2]
    n_blocks = -(-length // block_size)
    kept = (torch.arange(n_blocks, device=q.device) >= first_block).expand(1, 1, n_blocks, n_blocks)
    block_n = kernel_block_n(block_size)
    layout = pattern_kernels.kernel_layout(kept, length, block_size, block_n, -(-length // block_n))
    if q.is_cuda:
        return block_kernels.block_sparse_attention(q, k, v, layout, scale)[1]
    return block_kernels.block_sparse_attention_reference(q, k, v, layout, scale)[1]


def state_layout(full_counts: Tensor, full_indices: Tensor, tail_counts: Tensor, tail_indices: Tensor, length: int,
                 block_size: int) -> BlockLayout:
    """The kernel layout a built state holds, for a sequence of ``length`` (the state may be sized for more)."""
    rows = -(-length // block_size)
    return BlockLayout(tail_counts[..., :rows], tail_indices[..., :rows, :], full_counts[..., :rows],
                       full_indices[..., :rows, :], block_size, kernel_block_n(block_size), length, length,
                       TokenMask(causal=False))


@torch.library.custom_op("sparsify::sparsed_pattern",
                         mutates_args=("built", "full_counts", "full_indices", "tail_counts", "tail_indices"))
def sparsed_pattern(q: Tensor, k: Tensor, v: Tensor, clock: Tensor, built: Tensor, full_counts: Tensor,
                    full_indices: Tensor, tail_counts: Tensor, tail_indices: Tensor, dense_fraction: float,
                    keep_ratio: float, block_size: int, scale: float) -> None:
    """At the switch step, build this layer's pattern into its state; at any other step, nothing.

    q: (B, Hq, N, D), k, v: (B, Hkv, N, D). The state: ``built`` (B, 1) host int64, set to 1 once built; the
    kernel layout's full lists ``full_counts`` (B, Hq, nQ') / ``full_indices`` (B, Hq, nQ', W) and the tail block's
    ``tail_counts`` / ``tail_indices`` alike (the kernel walks both lists with one set of strides), nQ' >= N /
    block_size (sized for the state's capacity)."""
    step, steps, prompt = _clock(clock)
    if steps == 0 or step != switch_step(steps, dense_fraction):
        return
    length = q.shape[2]
    block_n = kernel_block_n(block_size)
    gen_block = pattern_kernels.generation_start_block(prompt, block_size)
    n_blocks = -(-length // block_size)
    lse = _dense_lse(q, k, v, 0, scale, block_size)
    lse_gen = _dense_lse(q, k, v, gen_block, scale, block_size) if gen_block < n_blocks else None
    scores_of = pattern_kernels.tile_scores if q.is_cuda else pattern_kernels.tile_scores_reference
    scores, scores_gen = scores_of(q, k, lse, lse_gen, gen_block * block_size, block_size, scale)
    kept = pattern_kernels.select_blocks(scores, scores_gen, gen_block, keep_ratio)
    width = full_indices.shape[-1]
    if pattern_kernels.index_width(length, block_size, block_n, keep_ratio) > width:
        raise StateError(f"sparsed: the state's index lists ({width} wide) are narrower than a {length}-token "
                         f"sequence needs; its capacity ({full_counts.shape[-1] * block_size} tokens) is too small")
    layout = pattern_kernels.kernel_layout(kept, length, block_size, block_n, width)
    rows, columns = layout.full_kv_indices.shape[-2:]
    full_counts[..., :rows].copy_(layout.full_kv_num_blocks)
    tail_counts[..., :rows].copy_(layout.kv_num_blocks)
    full_indices[..., :rows, :columns].copy_(layout.full_kv_indices)
    tail_indices[..., :rows, :columns].copy_(layout.kv_indices)
    built.fill_(1)


@sparsed_pattern.register_fake
def _(q, k, v, clock, built, full_counts, full_indices, tail_counts, tail_indices, dense_fraction, keep_ratio,
      block_size, scale):
    return None


@torch.library.custom_op("sparsify::sparsed_attention", mutates_args=())
def sparsed_attention(q: Tensor, k: Tensor, v: Tensor, clock: Tensor, built: Tensor, full_counts: Tensor,
                      full_indices: Tensor, tail_counts: Tensor, tail_indices: Tensor, dense_fraction: float,
                      block_size: int, scale: float, num_warps: int, num_stages: int, use_tma: bool) -> Tensor:
    """Bidirectional attention of one denoising step: dense SDPA up to the switch step, then the block-sparse
    kernel over the layer's built pattern (the state of :func:`sparsed_pattern`, for the query heads served).
    q: (B, Hq, N, D), k, v: (B, Hkv, N, D) -> (B, Hq, N, Dv)."""
    check_attention_inputs(q, k, v, "sparsify.sparsed_attention")
    step, steps, _ = _clock(clock)
    if steps == 0 or step <= switch_step(steps, dense_fraction):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if not bool(built.all()):
        raise StateError(f"sparsed: step {step} of {steps} is past the switch step "
                         f"({switch_step(steps, dense_fraction)}) but this layer's pattern was never built: a "
                         "request must run its steps from 0 in one sequence state (sparsify.diffusion.generate)")
    layout = state_layout(full_counts, full_indices, tail_counts, tail_indices, q.shape[2], block_size)
    if q.is_cuda:
        config = block_kernels.KernelConfig(block_size, layout.block_n, num_warps, num_stages, use_tma)
        return block_kernels.block_sparse_attention(q, k, v, layout, scale, config=config)[0]
    return block_kernels.block_sparse_attention_reference(q, k, v, layout, scale)[0]


@sparsed_attention.register_fake
def _(q, k, v, clock, built, full_counts, full_indices, tail_counts, tail_indices, dense_fraction, block_size,
      scale, num_warps, num_stages, use_tma):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


inference_only(sparsed_attention)


# -- the method -----------------------------------------------------------------------------------------------------


def _power_of_two(block_size: int) -> int:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("must be a power of 2 of at least 16 (the kernels' tiles)")
    return block_size


@dataclass(frozen=True)
class SparseDParams:
    dense_fraction: Annotated[float, Field(ge=0.0, lt=1.0, description="Share of the steps run dense before the "
                                                                      "patterns are built")] = 0.2
    keep_ratio: Annotated[float, Field(gt=0.0, le=1.0, description="Share of key blocks each query block keeps, "
                                                                  "in each of the two selections")] = 0.3
    block_size: Annotated[int, Field(description="Query and key block of the pattern (a power of 2, >= 16)"),
                          AfterValidator(_power_of_two)] = 128


@register_method
class SparseD(AttentionMethod):
    name = "sparsed"
    Params = SparseDParams
    phases = ("diffusion",)
    summary = "diffusion LMs: dense early steps, then per-head block patterns built once and reused"

    def unsupported_reason(self, params: SparseDParams, attn):
        reason = super().unsupported_reason(params, attn)
        if reason is not None:
            return reason
        if attn.causal:
            return "sparsed serves bidirectional (diffusion) attention; this attention is causal"
        if attn.mask_kind != "none":
            return f"sparsed does not serve a key padding mask ({attn.mask_kind}): a padded batch runs dense"
        if isinstance(attn.q_len, int) and isinstance(attn.kv_len, int) and attn.q_len != attn.kv_len:
            return f"sparsed needs the queries over their own keys (q_len {attn.q_len}, kv_len {attn.kv_len})"
        return None

    def calibration_problem(self, params: SparseDParams) -> str:
        return "scattered"

    def kernel_blocks(self, params: SparseDParams) -> tuple[int, int]:
        return params.block_size, kernel_block_n(params.block_size)

    def visited_pairs(self, params: SparseDParams, n: sympy.Symbol, config) -> sympy.Expr:
        """Pairs of a sparse step, for a generation short beside its prompt: ``keep_ratio`` of the keys and a block
        from each selection's ``+ 1``."""
        return n * (params.keep_ratio * n + 2 * params.block_size)

    def state_specs(self, params: SparseDParams):
        block_n = kernel_block_n(params.block_size)

        def counts(size):
            return (size.batch, size.heads, -(-size.capacity // params.block_size))

        def full(size):
            width = pattern_kernels.index_width(size.capacity, params.block_size, block_n, params.keep_ratio)
            return (*counts(size), width)

        return (DIFFUSION_CLOCK,
                StateSpec("built", lambda size: (size.batch, 1), torch.int64, host=True),
                StateSpec("full_counts", counts, torch.int32), StateSpec("full_indices", full, torch.int32),
                StateSpec("tail_counts", counts, torch.int32),
                StateSpec("tail_indices", full, torch.int32))

    def _state(self, ctx, heads: tuple[int, int] | None = None) -> list:
        names = ("clock", "built", "full_counts", "full_indices", "tail_counts", "tail_indices")
        nodes = [ctx.sequence_state(name) for name in names]
        if heads is None:
            return nodes
        start, stop = heads
        return nodes[:2] + [ctx.call(torch.ops.aten.slice.Tensor, t, 1, start, stop) for t in nodes[2:]]

    def update_state(self, params: SparseDParams, attn, ctx):
        if attn.phase != "diffusion":
            return
        ctx.call(torch.ops.sparsify.sparsed_pattern.default, ctx.q, ctx.k, ctx.v, *self._state(ctx),
                 params.dense_fraction, params.keep_ratio, params.block_size, attn.match.scale)

    def run(self, params: SparseDParams, attn, ctx, plan):
        heads = None if ctx.heads == (0, attn.q_heads) else ctx.heads
        config = ctx.config
        return ctx.call(torch.ops.sparsify.sparsed_attention.default, ctx.q, ctx.k, ctx.v, *self._state(ctx, heads),
                        params.dense_fraction, params.block_size, attn.match.scale, config.num_warps,
                        config.num_stages, config.use_tma)
