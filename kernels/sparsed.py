"""SparseD's block pattern: per query head and query block, the key blocks it keeps, from one dense step's softmax.

The definition (``shared/docs/methods.md``): queries and keys cut into blocks of ``block_size``; p = softmax(q.k *
scale) over all keys; a tile's score is the mean of p over its (query, key) pairs (the pairs that exist: a tail
block's mean is over its own rows and keys); each query block keeps its top ``int(n_key_blocks * keep_ratio) + 1``
key blocks. **Isolated selection**: the generation keys, the key blocks from the first one that starts at or after
the prompt's end, are selected again on their own, with p renormalised over them (a softmax over generation keys
only) and ``int(n_generation_blocks * keep_ratio) + 1`` kept; the prompt's blocks come from the first selection,
and the two sets are OR-ed, so a long prompt never starves the generated region.

:func:`tile_scores` computes the tile means without an N x N matrix: from each row's log-sum-exp (the dense pass of
the step that builds the pattern returns it), the Triton kernel streams the keys once per query block, one program
per (query block, batch x head); :func:`tile_scores_reference` does the same q-block by q-block in PyTorch.
:func:`select_blocks` takes the top-k sets and :func:`kernel_layout` turns them into the block-sparse kernel's
index lists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import ShapeError
from .layout import BlockLayout, Geometry, TokenMask, compress

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # what a kernel may read of the module


def generation_start_block(prompt_tokens: int, block_size: int) -> int:
    """The first key block of the generation region: the first that starts at or after the prompt's end (a block
    the prompt and the generation share counts as the prompt's)."""
    return -(-prompt_tokens // block_size)


@triton.jit
def _tile_scores_kernel(Q, K, Lse, LseGen, Scores, ScoresGen,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_lb, stride_lh, stride_lm,
                        stride_sb, stride_sh, stride_sm, stride_sn,
                        q_heads, group, length, n_key_blocks, gen_start, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, HAS_GEN: tl.constexpr):
    """One query block of one (batch, head): for every key block, the sum of p over its tiles, divided by the
    number of (query, key) pairs; ScoresGen the same with the generation-only log-sum-exp, from ``gen_start``."""
    q_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // q_heads, batch_head % q_heads
    kv_head = head // group
    offs_m = q_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < length
    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    lse_ptrs = Lse + batch * stride_lb + head * stride_lh + offs_m * stride_lm
    # Rows past the length get +inf: their p is 0.
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf")) * _LOG2E
    if HAS_GEN:
        lse_gen = tl.load(LseGen + batch * stride_lb + head * stride_lh + offs_m * stride_lm, mask=row_ok,
                          other=float("inf")) * _LOG2E
    rows = tl.minimum(length - q_block * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    s_base = Scores + batch * stride_sb + head * stride_sh + q_block * stride_sm
    g_base = ScoresGen + batch * stride_sb + head * stride_sh + q_block * stride_sm
    for key_block in range(0, n_key_blocks):
        total = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        total_gen = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        generation = key_block * BLOCK_SIZE >= gen_start
        for tile in range(0, BLOCK_SIZE, BLOCK_N):
            offs_n = key_block * BLOCK_SIZE + tile + tl.arange(0, BLOCK_N)
            key_ok = offs_n < length
            k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                        mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            s = tl.dot(q, k) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            total += tl.sum(tl.exp2(s - lse[:, None]), 1)
            if HAS_GEN:
                if generation:
                    total_gen += tl.sum(tl.exp2(s - lse_gen[:, None]), 1)
        keys = tl.minimum(length - key_block * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
        tl.store(s_base + key_block * stride_sn, tl.sum(total, 0) / (rows * keys))
        if HAS_GEN:
            if generation:
                tl.store(g_base + key_block * stride_sn, tl.sum(total_gen, 0) / (rows * keys))


def _check(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ShapeError(f"tile_scores: q (B, Hq, N, D) and k (B, Hkv, N, D) with Hq a multiple of Hkv; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if lse.shape != q.shape[:3]:
        raise ShapeError(f"tile_scores: lse must be (B, Hq, N) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ShapeError(f"block_size: a power of 2 of at least 16, got {block_size}")


def tile_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, lse_gen: torch.Tensor | None,
                gen_start: int, block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tile means of p = softmax(q.k * scale) (from ``lse``, natural log, (B, Hq, N) float32) and, where
    ``lse_gen`` is given, of p renormalised over the keys from ``gen_start`` (a block boundary) on. q: (B, Hq, N, D),
    k: (B, Hkv, N, D) (GQA: a query head scores its KV head's keys). Returns scores (B, Hq, nQ, nK) float32 and
    scores_gen alike (meaningful in the generation key blocks only, 0 before them) or None. Triton on CUDA (and
    under TRITON_INTERPRET=1)."""
    _check(q, k, lse, block_size)
    batch, q_heads, length, dim = q.shape
    n_blocks = -(-length // block_size)
    scores = torch.zeros((batch, q_heads, n_blocks, n_blocks), dtype=torch.float32, device=q.device)
    scores_gen = torch.zeros_like(scores) if lse_gen is not None else scores
    block_n = min(block_size, 64)
    _tile_scores_kernel[(n_blocks, batch * q_heads)](
        q, k, lse, lse_gen if lse_gen is not None else lse, scores, scores_gen,
        *q.stride(), *k.stride(), *lse.stride(), *scores.stride(),
        q_heads, q_heads // k.shape[1], length, n_blocks, gen_start, scale * LOG2E,
        HEAD_DIM=dim, BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        HAS_GEN=lse_gen is not None, num_warps=8 if block_size >= 128 else 4, num_stages=2,
    )
    return scores, scores_gen if lse_gen is not None else None


def tile_scores_reference(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, lse_gen: torch.Tensor | None,
                          gen_start: int, block_size: int, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`tile_scores` in PyTorch, float32, one query block at a time (a (B, Hq, block_size, N) slab, never
    N x N)."""
    _check(q, k, lse, block_size)
    batch, q_heads, length, dim = q.shape
    group = q_heads // k.shape[1]
    n_blocks = -(-length // block_size)
    kf = k.float().repeat_interleave(group, 1)
    keys = torch.arange(length, device=q.device)
    pad = n_blocks * block_size - length
    counts = torch.clamp(length - torch.arange(n_blocks, device=q.device) * block_size, max=block_size).float()
    rows_out, gen_out = [], []
    for start in range(0, length, block_size):
        stop = min(start + block_size, length)
        logits = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale   # (B, Hq, rows, N)

        def pooled(log_norm):
            p = torch.exp(logits - log_norm[:, :, start:stop, None])
            sums = torch.nn.functional.pad(p, (0, pad)).view(*p.shape[:3], n_blocks, block_size).sum((2, 4))
            return sums / (counts * (stop - start))                                      # (B, Hq, nK)

        rows_out.append(pooled(lse))
        if lse_gen is not None:
            gen = pooled(lse_gen).masked_fill(keys[::block_size] < gen_start, 0.0)
            gen_out.append(gen)
    scores = torch.stack(rows_out, 2)
    return scores, torch.stack(gen_out, 2) if lse_gen is not None else None


def keep_count(n_blocks: int, keep_ratio: float) -> int:
    """How many key blocks a selection over ``n_blocks`` keeps: ``int(n_blocks * keep_ratio) + 1``, at most all."""
    return min(n_blocks, int(n_blocks * keep_ratio) + 1)


def select_blocks(scores: torch.Tensor, scores_gen: torch.Tensor | None, gen_block: int, keep_ratio: float
                  ) -> torch.Tensor:
    """The kept key blocks, bool (B, Hq, nQ, nK): each query block's top :func:`keep_count` of ``scores`` among
    the prompt's blocks (those before ``gen_block``), OR its top of ``scores_gen`` among the generation blocks
    (when there are any). Without generation blocks (``scores_gen`` None), the top of ``scores``."""
    n_blocks = scores.shape[-1]
    top = scores.topk(keep_count(n_blocks, keep_ratio), dim=-1).indices
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    if scores_gen is None or gen_block >= n_blocks:
        return kept
    generation = torch.arange(n_blocks, device=scores.device) >= gen_block
    kept &= ~generation
    top_gen = scores_gen[..., gen_block:].topk(keep_count(n_blocks - gen_block, keep_ratio), dim=-1).indices
    return kept.scatter_(-1, top_gen + gen_block, True)


def kernel_layout(kept: torch.Tensor, length: int, block_size: int, block_n: int, width: int) -> BlockLayout:
    """The block-sparse kernel's bidirectional layout (query blocks of ``block_size``, key blocks of ``block_n``,
    which divides it) visiting the ``kept`` key blocks (B, Hq, nQ, nK) of ``block_size``: full blocks, and the
    sequence's partial tail block as the only partial one. Both index lists are ``width`` wide (the kernel reads
    them with one set of strides), which must hold every row's full blocks."""
    if block_size % block_n:
        raise ShapeError(f"block_n ({block_n}) must divide block_size ({block_size})")
    geometry = Geometry(length, length, block_size, block_n, TokenMask(causal=False))
    _, whole = geometry.rule_blocks(kept.device)                                # (nQ, nK') no tail block
    n_kv = -(-length // block_n)
    visited = kept.repeat_interleave(block_size // block_n, dim=-1)[..., :n_kv]
    full, partial = visited & whole, visited & ~whole
    full_num, full_idx = compress(full)
    part_num, part_idx = compress(partial)
    if int(full_num.max()) > width:
        raise ShapeError(f"kernel_layout: a query block keeps {int(full_num.max())} key blocks, more than the lists' "
                         f"width {width}")
    return BlockLayout(part_num, part_idx[..., :width], full_num, full_idx[..., :width], block_size, block_n, length,
                       length, geometry.mask)


def index_width(capacity: int, block_size: int, block_n: int, keep_ratio: float) -> int:
    """The most full key blocks of ``block_n`` a query block keeps at any length up to ``capacity``: both
    selections at their largest, in kernel blocks (the state's index lists are this wide)."""
    n_blocks = -(-capacity // block_size)
    return min(-(-capacity // block_n), 2 * keep_count(n_blocks, keep_ratio) * (block_size // block_n))
