"""``resa``: Rectified Sparse Attention (arXiv 2506.04108), block-sparse decode.

Per layer and KV head the sequence state keeps **block summaries** of the keys: the elementwise min and max over
each block of ``block_size`` cache positions, counted from each row's first real token so that a left-padded row
has the blocks it would have alone (``sparsify.resa_summaries``: at every forward of the layer, whatever
computes its attention, the blocks its new tokens touch are recomputed from the cache, so a dense prefill builds
them all and a decode step rewrites one). A decode step then **selects** blocks (``sparsify.resa_select``): the
mean of the KV group's query heads, scaled, scores each block by the upper bound ``sum_d max(q_d kmin_d,
q_d kmax_d)`` of q.k inside it; the last ``local_blocks`` are always kept; ``max(ceil(n * sparse_ratio),
min(n, min_blocks))`` of the ``n`` blocks in use are kept (``sparsify.resa_budget``, once per forward for all
layers), as sorted indices, in lists of a static width (the budget at the cache's capacity) so that a growing
cache changes no shape. The split-KV decode kernel
(``sparsify.block_decode``, ``kernels/decode.py``) attends over those blocks, all query heads of a group reading
each K/V block once.

Rectification (every ``rectify_every`` generated tokens, the last ones re-encoded densely and their K/V
overwritten) is the generation loop's: ``sparsify.rectify``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator, Field
from torch import Tensor

from ..kernels import block_bounds as bounds_kernels
from ..kernels import decode as decode_kernels
from ..ops import inference_only, lengths_and_shift
from ..state import StateSpec
from .base import AttentionMethod, cache_decode_reason, register_method


def lengths_in_use(q: Tensor, k: Tensor, query_offset: Tensor | None) -> Tensor:
    """(B,) int64: the cache positions in use after this call's tokens: ``query_offset + q_len`` (a static cache),
    else the keys' length (the cache ends with this call's tokens)."""
    if query_offset is not None:
        used = query_offset.to(torch.int64) + q.shape[2]
    else:
        used = torch.full((), k.shape[2], dtype=torch.int64, device=q.device)
    return used.expand(q.shape[0])


# -- the ops --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsify::resa_row_starts", mutates_args=())
def resa_row_starts(k: Tensor, key_padding: Tensor | None) -> Tensor:
    """(B,) int64: each row's first real position (the padding before it, left padding), 0 without padding. A
    row's blocks start there, as they would if it ran alone. Once per forward, shared by every layer."""
    if key_padding is None:
        return torch.zeros(k.shape[0], dtype=torch.int64, device=k.device)
    return (key_padding.to(torch.int32).cumsum(1) == 0).sum(1)


@resa_row_starts.register_fake
def _(k, key_padding):
    return k.new_empty((k.shape[0],), dtype=torch.int64)



@torch.library.custom_op("sparsify::resa_summaries", mutates_args=("kmin", "kmax"))
def resa_summaries(kmin: Tensor, kmax: Tensor, q: Tensor, k: Tensor, query_offset: Tensor | None,
                   starts: Tensor, block_size: int) -> None:
    """Recompute, in place, the summaries of the blocks this call's ``q_len`` new tokens touch, from the cache.

    kmin, kmax: (B, Hkv, n_blocks, D), row b's block j over cache positions [s_b + j * block_size,
    s_b + (j + 1) * block_size) with s_b = ``starts[b]`` its first real position (:func:`resa_row_starts`);
    k: (B, Hkv, Lk, D), the cache after this call's update; q: (B, Hq, q_len, D) (its length only). Each touched
    block's min and max are over its positions in use (:func:`lengths_in_use`), so a partial last block is exact and
    rewritten when it grows. A static number of blocks is read (``ceil(q_len / block_size) + 1``): a decode step
    reads one or two blocks, whatever the cache's length; a touched block with no position in use (past a short
    row's end) keeps what it had. No host synchronisation. On CUDA one program per touched block
    (``kernels/block_bounds.py``)."""
    batch, kv_heads, n_blocks, dim = kmin.shape
    if kmin.is_cuda and bounds_kernels.supports(dim):  # one program per touched block
        lengths, shift = lengths_and_shift(q, k, query_offset)
        bounds_kernels.update_summaries(kmin, kmax, k, lengths, starts, q.shape[2], block_size, length_shift=shift)
        return
    used = lengths_in_use(q, k, query_offset)
    touched = min(n_blocks, -(-q.shape[2] // block_size) + 1)
    first = torch.clamp((used - q.shape[2] - starts) // block_size, min=0)
    blocks = torch.clamp(first[:, None] + torch.arange(touched, device=q.device), max=n_blocks - 1)   # (B, T)
    positions = (starts[:, None, None] + blocks[:, :, None] * block_size
                 + torch.arange(block_size, device=q.device))                                         # (B, T, bs)
    in_use = positions < used[:, None, None]
    index = positions.clamp(max=k.shape[2] - 1).reshape(batch, 1, -1, 1).expand(batch, kv_heads, -1, dim)
    keys = k.gather(2, index).view(batch, kv_heads, touched, block_size, dim)
    valid = in_use[:, None, :, :, None]
    big = torch.finfo(k.dtype).max
    target = blocks[:, None, :, None].expand(batch, kv_heads, touched, dim)
    some = in_use.any(-1)[:, None, :, None]  # a touched block with no position in use keeps what it had
    low = torch.where(some, torch.where(valid, keys, big).amin(3), kmin.gather(2, target))
    high = torch.where(some, torch.where(valid, keys, -big).amax(3), kmax.gather(2, target))
    kmin.scatter_(2, target, low.to(kmin.dtype))
    kmax.scatter_(2, target, high.to(kmax.dtype))


@resa_summaries.register_fake
def _(kmin, kmax, q, k, query_offset, starts, block_size):
    return None


def selection_width(n_blocks: int, sparse_ratio: float, min_blocks: int, local_blocks: int) -> int:
    """The block lists' static width: the most blocks a selection keeps over ``n_blocks`` (the cache's capacity)."""
    return max(1, min(n_blocks, max(math.ceil(n_blocks * sparse_ratio), min_blocks, local_blocks)))


@torch.library.custom_op("sparsify::resa_budget", mutates_args=())
def resa_budget(q: Tensor, k: Tensor, query_offset: Tensor | None, starts: Tensor, block_size: int,
                sparse_ratio: float, min_blocks: int, local_blocks: int) -> tuple[Tensor, Tensor]:
    """Each row's blocks in use and the blocks a decode step keeps of them, (B,) int64 each.

    Row b has ``n = ceil((used_b - starts[b]) / block_size)`` blocks in use (:func:`lengths_in_use`; q and k give
    only their lengths) and keeps ``max(ceil(n * sparse_ratio), min(n, min_blocks))`` of them, at least its last
    ``min(n, local_blocks)`` and at most n. The same for every layer of a forward: one node per forward
    (``ReSA.budget``), so that a layer's selection launches only its two kernels."""
    in_use = -(-(lengths_in_use(q, k, query_offset) - starts) // block_size)
    keep = torch.maximum(torch.ceil(in_use.double() * sparse_ratio).long(), torch.clamp(in_use, max=min_blocks))
    return in_use, torch.minimum(torch.maximum(keep, torch.clamp(in_use, max=local_blocks)), in_use)


@resa_budget.register_fake
def _(q, k, query_offset, starts, block_size, sparse_ratio, min_blocks, local_blocks):
    return tuple(starts.new_empty((q.shape[0],), dtype=torch.int64) for _ in range(2))


@torch.library.custom_op("sparsify::resa_select", mutates_args=())
def resa_select(q: Tensor, kmin: Tensor, kmax: Tensor, in_use: Tensor, keep: Tensor, sparse_ratio: float,
                min_blocks: int, local_blocks: int, scale: float) -> Tensor:
    """ReSA's block selection for one decode step: (B, Hkv, S) int32, row (b, g)'s first ``keep[b]`` entries the
    sorted indices of its kept blocks, the rest ``n_blocks`` (which the decode kernel ignores).

    q: (B, Hq, 1, D); kmin, kmax: (B, Hkv, n_blocks, D); in_use, keep: (B,) from :func:`resa_budget`. The selection
    query of KV head g is the mean of its group's query heads times ``scale``; block j scores ``sum_d max(q_d
    kmin_jd, q_d kmax_jd)``; the last ``local_blocks`` in use always, the best-scoring others up to ``keep``.
    S is :func:`selection_width` of n_blocks (static, so a growing cache changes no shape). On CUDA two
    kernels, the scores in one pass over the summaries (the group's mean taken there) and the sorted lists one
    program per row (``kernels/block_bounds.py``; rows of more than MAX_SELECT_BLOCKS blocks, and other devices,
    use the references). Ties at the last kept score go to the lowest blocks."""
    on_gpu = kmin.is_cuda and bounds_kernels.supports(kmin.shape[-1])
    score = bounds_kernels.block_bounds if on_gpu else bounds_kernels.block_bounds_reference
    scores = score(q.select(2, 0), kmin, kmax, in_use, local_blocks, scale)                # (B, Hkv, n_blocks)
    select = bounds_kernels.select_top_blocks if on_gpu and kmin.shape[2] <= bounds_kernels.MAX_SELECT_BLOCKS \
        else bounds_kernels.select_top_blocks_reference
    return select(scores, keep, selection_width(kmin.shape[2], sparse_ratio, min_blocks, local_blocks))


@resa_select.register_fake
def _(q, kmin, kmax, in_use, keep, sparse_ratio, min_blocks, local_blocks, scale):
    width = selection_width(kmin.shape[2], sparse_ratio, min_blocks, local_blocks)
    return q.new_empty((kmin.shape[0], kmin.shape[1], width), dtype=torch.int32)


@torch.library.custom_op("sparsify::block_decode", mutates_args=())
def block_decode(q: Tensor, k: Tensor, v: Tensor, query_offset: Tensor | None, key_padding: Tensor | None,
                 starts: Tensor, indices: Tensor, keep: Tensor, block_size: int, scale: float) -> Tensor:
    """One decode step over listed key blocks: q (B, Hq, 1, D) against the blocks ``indices[b, g, :keep[b]]``
    (of ``block_size`` cache positions from the row's first real position) of k, v (B, Hkv, Lk, D), within the
    positions in use (:func:`lengths_in_use`) and ``key_padding`` (B, Lk). The split-KV kernel on CUDA, its reference
    elsewhere. Returns (B, Hq, 1, Dv)."""
    lengths, shift = lengths_and_shift(q, k, query_offset)
    counts = keep[:, None].expand(indices.shape[:2])  # every KV head of a row keeps as many: a view
    arguments = dict(key_padding=key_padding, kv_block_indices=indices, kv_block_counts=counts,
                     block_size=block_size, block_offsets=starts, length_shift=shift)
    if q.is_cuda and decode_kernels.supports(q, k, v):
        return decode_kernels.decode_attention(q, k, v, lengths, scale, **arguments,
                                               **decode_kernels.block_pass_launch())[0]
    return decode_kernels.decode_attention_reference(q, k, v, lengths, scale, **arguments)[0]


@block_decode.register_fake
def _(q, k, v, query_offset, key_padding, starts, indices, keep, block_size, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


inference_only(block_decode)


# -- the method -----------------------------------------------------------------------------------------------------


def _not_one(every: int) -> int:
    if every == 1:
        raise ValueError("1 would re-encode every generated token densely: use dense decode, or 0 for none, or >= 2")
    return every


@dataclass(frozen=True)
class ReSAParams:
    block_size: Annotated[int, Field(ge=1, description="Cache positions per summarised key block")] = 16
    sparse_ratio: Annotated[float, Field(gt=0.0, le=1.0, description="Share of the blocks in use a step keeps")] = 0.1
    min_blocks: Annotated[int, Field(ge=0, description="Blocks kept at least (all, when fewer are in use)")] = 16
    local_blocks: Annotated[int, Field(ge=0, description="Last blocks always kept")] = 1
    rectify_every: Annotated[int, Field(ge=0, description="Generated tokens between dense rectifications "
                                                          "(0: sparse-only decode)"),
                             AfterValidator(_not_one)] = 32


@register_method
class ReSA(AttentionMethod):
    name = "resa"
    Params = ReSAParams
    phases = ("decode",)
    summary = "block-sparse decode over min/max key-block summaries, with periodic dense rectification"

    def unsupported_reason(self, params: ReSAParams, attn):
        return cache_decode_reason(self.name, attn, "blocks")

    def state_specs(self, params: ReSAParams):
        def summaries(size):
            return (size.batch, size.kv_heads, -(-size.capacity // params.block_size), size.head_dim)

        # A crop leaves blocks past the kept tokens unread (the selection masks them) and the last kept block a
        # looser bound until the next token rewrites it from the cache.
        return (StateSpec("kmin", summaries, None, crop=lambda tensor, kept: None),
                StateSpec("kmax", summaries, None, crop=lambda tensor, kept: None))

    def rectify_every(self, params: ReSAParams) -> int:
        return params.rectify_every

    def update_state(self, params: ReSAParams, attn, ctx):
        ctx.call(torch.ops.sparsify.resa_summaries.default, ctx.sequence_state("kmin"), ctx.sequence_state("kmax"),
                 ctx.q, ctx.k, ctx.query_offset, self.row_starts(ctx), params.block_size)

    @staticmethod
    def row_starts(ctx):
        """Each row's first real position: one node per forward (and mask description), for every layer."""
        padding = ctx.key_padding
        return ctx.shared(("resa_row_starts", getattr(padding, "name", None)),
                          lambda: ctx.call(torch.ops.sparsify.resa_row_starts.default, ctx.k, padding))

    def _summaries(self, ctx, attn):
        """The summaries of the KV heads this segment serves."""
        start, stop = ctx.heads
        tensors = [ctx.sequence_state("kmin"), ctx.sequence_state("kmax")]
        if (start, stop) == (0, attn.q_heads):
            return tensors
        group = attn.group_size
        return [ctx.call(torch.ops.aten.slice.Tensor, t, 1, start // group, stop // group) for t in tensors]

    def budget(self, params: ReSAParams, ctx):
        """Each row's blocks in use and kept (:func:`resa_budget`): one node per forward, padding, offset and
        parameters. Every attention resa serves is causal self-attention over a cache of the whole sequence
        (:func:`cache_decode_reason`), so those fix its lengths; the key length is not in the key, as a dynamic
        cache gives each layer's its own symbol."""
        key = ("resa_budget", getattr(ctx.key_padding, "name", None), getattr(ctx.query_offset, "name", None),
               params.block_size, params.sparse_ratio, params.min_blocks, params.local_blocks)

        def build():
            budget = ctx.call(torch.ops.sparsify.resa_budget.default, ctx.q, ctx.k, ctx.query_offset,
                              self.row_starts(ctx), params.block_size, params.sparse_ratio, params.min_blocks,
                              params.local_blocks)
            return tuple(ctx.call(operator.getitem, budget, i) for i in range(2))

        return ctx.shared(key, build)

    def plan(self, params: ReSAParams, attn, ctx):
        """The selection: per layer and step (it reads this layer's query)."""
        kmin, kmax = self._summaries(ctx, attn)
        in_use, keep = self.budget(params, ctx)
        indices = ctx.call(torch.ops.sparsify.resa_select.default, ctx.q, kmin, kmax, in_use, keep,
                           params.sparse_ratio, params.min_blocks, params.local_blocks, attn.match.scale)
        return indices, keep

    def run(self, params: ReSAParams, attn, ctx, plan):
        indices, keep = plan
        return ctx.call(torch.ops.sparsify.block_decode.default, ctx.q, ctx.k, ctx.v, ctx.query_offset,
                        ctx.key_padding, self.row_starts(ctx), indices, keep, params.block_size, attn.match.scale)
