"""Block score bounds (Quest, ReSA): how much a query could attend to each block of keys, from the block's
elementwise key minimum and maximum.

For a query q and a block with key summaries kmin, kmax, ``sum_d max(q_d kmin_d, q_d kmax_d)`` bounds q.k for
every key of the block from above. A decode step scores every block of the cache this way before it picks the
ones it attends to, so the scoring reads all the summaries (an eighth of the keys' bytes at 16 keys a block) at
every step: it is bound by memory, and one pass that reads each summary once in its own dtype and writes one
float32 score per block is what it should cost. In PyTorch the same bound writes and reads float32 copies of both
summary tensors and of their products with q, several times the summaries' bytes.

``block_bounds`` launches the kernel (CUDA tensors, or any device under TRITON_INTERPRET=1);
``block_bounds_reference`` computes the same function in plain PyTorch (any device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import ShapeError
from . import hardware

BLOCKS_PER_PROGRAM = 64


@triton.jit
def _block_bounds(
    Query, Kmin, Kmax, InUse, Scores,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_u,
    stride_sb, stride_sh, stride_sn,
    kv_heads, n_blocks, local_blocks, query_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK blocks (``program_id(0)``) of one (batch, KV head) (``program_id(1)``): their bounds for the mean of
    the head's GROUP query heads times ``query_scale``, -inf past the row's blocks in use, +inf for its last
    ``local_blocks`` in use."""
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // kv_heads).to(tl.int64)
    head = (batch_head % kv_heads).to(tl.int64)
    offs_n = chunk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, BLOCK_G)
    exists = offs_n < n_blocks
    heads = head * GROUP + offs_g.to(tl.int64)
    group = tl.load(Query + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=(offs_g < GROUP)[:, None], other=0.0).to(tl.float32)
    query = tl.sum(group, 0) / GROUP * query_scale
    rows = offs_n[:, None].to(tl.int64)
    low = tl.load(Kmin + batch * stride_kb + head * stride_kh + rows * stride_kn + offs_d[None, :] * stride_kd,
                  mask=exists[:, None], other=0.0).to(tl.float32)
    high = tl.load(Kmax + batch * stride_xb + head * stride_xh + rows * stride_xn + offs_d[None, :] * stride_xd,
                   mask=exists[:, None], other=0.0).to(tl.float32)
    bound = tl.sum(tl.maximum(query[None, :] * low, query[None, :] * high), 1)
    in_use = tl.load(InUse + batch * stride_u)
    bound = tl.where(offs_n < in_use, bound, float("-inf"))
    bound = tl.where((offs_n < in_use) & (offs_n >= in_use - local_blocks), float("inf"), bound)
    tl.store(Scores + batch * stride_sb + head * stride_sh + offs_n.to(tl.int64) * stride_sn, bound, mask=exists)


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head_dim (callers use the reference otherwise): a power of 2 in [16, 256]."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _check(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, in_use: torch.Tensor) -> None:
    """Shapes, dtypes and devices (never values: reading them would sync with the device)."""
    if kmin.dim() != 4 or kmax.shape != kmin.shape:
        raise ShapeError(f"block_bounds: kmin and kmax must share a shape (B, Hkv, n_blocks, D); got "
                         f"{tuple(kmin.shape)} and {tuple(kmax.shape)}")
    batch, kv_heads, _, dim = kmin.shape
    if query.dim() != 3 or query.shape[0] != batch or not query.shape[1] >= kv_heads > 0 \
            or query.shape[1] % kv_heads or query.shape[2] != dim:
        raise ShapeError(f"block_bounds: query must be (B, Hq, D) with B = {batch}, Hq a multiple of Hkv = "
                         f"{kv_heads} and D = {dim}; got {tuple(query.shape)}")
    if in_use.shape != (batch,) or in_use.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"block_bounds: in_use must be an int32 or int64 tensor of shape ({batch},); got "
                         f"{in_use.dtype} {tuple(in_use.shape)}")
    for name, t in (("kmin", kmin), ("kmax", kmax), ("in_use", in_use)):
        if t.device != query.device:
            raise ShapeError(f"block_bounds: {name} is on {t.device}, query on {query.device}; all must share a "
                             "device")


def block_bounds_reference(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, in_use: torch.Tensor,
                           local_blocks: int, scale: float = 1.0) -> torch.Tensor:
    """(B, Hkv, n_blocks) float32: ``sum_d max(q_d kmin_d, q_d kmax_d)`` per block, in float32, for the selection
    query q of each KV head: the mean of its group's query heads times ``scale``.

    query: (B, Hq, D), Hq = G x Hkv, the G heads of KV head g at [g G, (g + 1) G) (G = 1: the selection queries
    themselves); kmin, kmax: (B, Hkv, n_blocks, D); in_use: (B,) the blocks row b has in use. Blocks from
    ``in_use[b]`` on score -inf; the last ``local_blocks`` in use score +inf (always kept)."""
    _check(query, kmin, kmax, in_use)
    batch, kv_heads, _, dim = kmin.shape
    query = query.float().reshape(batch, kv_heads, -1, dim).mean(2)[:, :, None] * scale
    bound = torch.maximum(query * kmin.float(), query * kmax.float()).sum(-1)
    j = torch.arange(kmin.shape[2], device=kmin.device)[None, :]
    used = j < in_use[:, None]
    local = used & (j >= in_use[:, None] - local_blocks)
    return bound.masked_fill(~used[:, None], float("-inf")).masked_fill(local[:, None], float("inf"))


def block_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, in_use: torch.Tensor,
                 local_blocks: int, scale: float = 1.0) -> torch.Tensor:
    """Launch the kernel. Same contract as :func:`block_bounds_reference` (the group's mean taken in the kernel,
    so a decode step launches nothing else to score); D a power of 2 in [16, 256], any float dtype of the
    summaries and the query, any strides. No host synchronisation: CUDA-graph capturable."""
    _check(query, kmin, kmax, in_use)
    batch, kv_heads, n_blocks, dim = kmin.shape
    if not supports(dim):
        raise ShapeError(f"block_bounds: head_dim D = {dim}; the kernel takes powers of 2 in [16, 256]")
    if not kmin.is_cuda and not hardware.interpreting():
        raise ShapeError(f"block_bounds: the summaries are on {kmin.device}; the Triton kernel needs CUDA tensors "
                         "(or TRITON_INTERPRET=1). Use block_bounds_reference there")
    scores = torch.empty((batch, kv_heads, n_blocks), device=kmin.device, dtype=torch.float32)
    block = min(BLOCKS_PER_PROGRAM, triton.next_power_of_2(max(1, n_blocks)))
    group = query.shape[1] // kv_heads
    _block_bounds[(triton.cdiv(n_blocks, block), batch * kv_heads)](
        query, kmin, kmax, in_use, scores, *query.stride(), *kmin.stride(), *kmax.stride(), in_use.stride(0),
        *scores.stride(), kv_heads, n_blocks, local_blocks, float(scale), HEAD_DIM=dim, GROUP=group,
        BLOCK_G=triton.next_power_of_2(group), BLOCK=block, num_warps=4)
    return scores


# -- the top blocks -------------------------------------------------------------------------------------------------

# Above this many blocks a row no longer fits one program's registers: the caller sorts with torch.topk instead.
MAX_SELECT_BLOCKS = 16384


@triton.jit
def _select_top(
    Scores, Keep, Out,
    stride_sb, stride_sh, stride_sn, stride_k, stride_ob, stride_oh, stride_os,
    kv_heads, n_blocks, width,
    BLOCK: tl.constexpr, WIDTH_BLOCK: tl.constexpr,
):
    """One (batch, KV head) row: the ``keep[b]`` highest scores' positions, ascending, in its first slots, and
    ``n_blocks`` in the rest of its ``width``. The row stays in registers: a bisection over the scores' order-
    preserving integer keys finds the keep-th largest (32 counting passes), ties at it go to the lowest positions,
    and a cumulative sum gives each kept block its slot, so the list comes out sorted without a sort. (A radix
    select, 4 passes of an 8-bit ``tl.histogram``, took 39.5 against 18.3 us at 8192 blocks on the H100:
    benchmarks/results/resa-probe-2026-12-06.log.)"""
    row = tl.program_id(0)
    batch = (row // kv_heads).to(tl.int64)
    head = (row % kv_heads).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    exists = offs < n_blocks
    scores = tl.load(Scores + batch * stride_sb + head * stride_sh + offs.to(tl.int64) * stride_sn, mask=exists,
                     other=float("-inf"))
    bits = tl.where(scores == 0.0, 0, scores.to(tl.int32, bitcast=True))  # -0.0 ties with +0.0
    # Negative floats order backwards as integers: flipping their magnitude bits makes the order the floats'.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = tl.where(exists, key, -(2**31) - 1)  # below every real key
    keep = tl.minimum(tl.minimum(tl.load(Keep + batch * stride_k), n_blocks), width).to(tl.int32)
    low = tl.full((), -(2**31), tl.int64)
    high = tl.full((), 2**31 - 1, tl.int64)
    for _ in range(32):  # the largest t with count(key >= t) >= keep
        middle = (low + high + 1) // 2
        enough = tl.sum((key >= middle).to(tl.int32), 0) >= keep
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle - 1)
    greater = key > low
    ties = key == low
    room = keep - tl.sum(greater.to(tl.int32), 0)
    take = greater | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= room))
    slot = tl.cumsum(take.to(tl.int32), 0) - 1
    out_row = Out + batch * stride_ob + head * stride_oh
    tl.store(out_row + slot.to(tl.int64) * stride_os, offs, mask=take)
    rest = tl.arange(0, WIDTH_BLOCK)
    tl.store(out_row + rest.to(tl.int64) * stride_os, tl.full([WIDTH_BLOCK], 0, tl.int32) + n_blocks,
             mask=(rest >= keep) & (rest < width))


def _check_selection(scores: torch.Tensor, keep: torch.Tensor, width: int) -> None:
    if scores.dim() != 3 or scores.dtype != torch.float32:
        raise ShapeError(f"select_top_blocks: scores must be a float32 tensor (B, Hkv, n_blocks); got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if keep.shape != (scores.shape[0],) or keep.dtype not in (torch.int32, torch.int64) or keep.device != scores.device:
        raise ShapeError(f"select_top_blocks: keep must be an int32 or int64 tensor of shape ({scores.shape[0]},) on "
                         f"{scores.device}; got {keep.dtype} {tuple(keep.shape)} on {keep.device}")
    if not 1 <= width <= scores.shape[-1]:
        raise ShapeError(f"select_top_blocks: width must be in [1, n_blocks = {scores.shape[-1]}]; got {width}")


def select_top_blocks_reference(scores: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """(B, Hkv, width) int32: per row of ``scores`` (B, Hkv, n_blocks) float32, the positions of its ``keep[b]``
    highest scores (at most ``width``; ties at the last kept score to the lowest positions), ascending, then
    ``n_blocks`` (an index the decode kernel ignores)."""
    _check_selection(scores, keep, width)
    n_blocks = scores.shape[-1]
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :width]  # ties: the lowest positions
    chosen = torch.arange(width, device=scores.device) < keep[:, None, None]
    return torch.where(chosen, top, n_blocks).sort(-1).values.to(torch.int32)


def select_top_blocks(scores: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Launch the kernel: :func:`select_top_blocks_reference`'s result, ties at the last kept score going to the
    lowest positions. One program per row; rows of at most :data:`MAX_SELECT_BLOCKS` blocks."""
    _check_selection(scores, keep, width)
    batch, kv_heads, n_blocks = scores.shape
    if n_blocks > MAX_SELECT_BLOCKS:
        raise ShapeError(f"select_top_blocks: {n_blocks} blocks a row; the kernel takes at most "
                         f"{MAX_SELECT_BLOCKS} (use select_top_blocks_reference)")
    out = torch.empty((batch, kv_heads, width), dtype=torch.int32, device=scores.device)
    block = triton.next_power_of_2(max(16, n_blocks))
    _select_top[(batch * kv_heads,)](scores, keep, out, *scores.stride(), keep.stride(0), *out.stride(),
                                     kv_heads, n_blocks, width, BLOCK=block,
                                     WIDTH_BLOCK=triton.next_power_of_2(max(16, width)),
                                     num_warps=8 if block >= 4096 else 4)
    return out


# -- the summaries --------------------------------------------------------------------------------------------------


@triton.jit
def _update_summaries(
    Kmin, Kmax, K, Used, Starts,
    stride_nb, stride_nh, stride_nn, stride_nd,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_u, stride_s,
    kv_heads, n_blocks, q_len, cache_len, length_shift,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, POSITIONS: tl.constexpr,
):
    """Touched block ``program_id(0)`` of (batch, KV head) ``program_id(1)``: its min and max over its positions
    in use, from the cache (a block with none keeps what it had)."""
    touched = tl.program_id(0)
    row = tl.program_id(1)
    batch = (row // kv_heads).to(tl.int64)
    head = (row % kv_heads).to(tl.int64)
    used = tl.load(Used + batch * stride_u).to(tl.int64) + length_shift
    start = tl.load(Starts + batch * stride_s).to(tl.int64)
    first = tl.maximum((used - q_len - start) // BLOCK_SIZE, 0)
    block = tl.minimum(first + touched, n_blocks - 1)
    offs_p = tl.arange(0, POSITIONS)
    offs_d = tl.arange(0, HEAD_DIM)
    positions = start + block * BLOCK_SIZE + offs_p
    in_use = (offs_p < BLOCK_SIZE) & (positions < used) & (positions < cache_len)
    keys = tl.load(K + batch * stride_kb + head * stride_kh + positions[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, mask=in_use[:, None], other=0.0).to(tl.float32)
    low = tl.min(tl.where(in_use[:, None], keys, float("inf")), 0)
    high = tl.max(tl.where(in_use[:, None], keys, float("-inf")), 0)
    # A block with no position in use (a row shorter than a touched block) keeps what it had.
    any_in_use = offs_d < tl.where(tl.sum(in_use.to(tl.int32), 0) > 0, HEAD_DIM, 0)
    tl.store(Kmin + batch * stride_nb + head * stride_nh + block * stride_nn + offs_d * stride_nd,
             low.to(Kmin.dtype.element_ty), mask=any_in_use)
    tl.store(Kmax + batch * stride_xb + head * stride_xh + block * stride_xn + offs_d * stride_xd,
             high.to(Kmax.dtype.element_ty), mask=any_in_use)


def update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k: torch.Tensor, used: torch.Tensor,
                     starts: torch.Tensor, q_len: int, block_size: int, length_shift: int = 0) -> None:
    """Rewrite, in place, the summaries of the ``ceil(q_len / block_size) + 1`` blocks (at most all) that a call's
    last ``q_len`` positions in use touch: row b's blocks from ``starts[b]``, positions below ``used[b] +
    length_shift`` (the shift added in the kernel: a static cache's offset needs no add launched before it).
    kmin, kmax: (B, Hkv, n_blocks, D); k: (B, Hkv, L, D), any strides. One program per touched block."""
    batch, kv_heads, n_blocks, dim = kmin.shape
    if kmax.shape != kmin.shape or k.dim() != 4 or k.shape[:2] != (batch, kv_heads) or k.shape[3] != dim \
            or used.shape != (batch,) or starts.shape != (batch,) or not supports(dim):
        raise ShapeError(f"update_summaries: kmin and kmax must be (B, Hkv, n_blocks, D) with D a power of 2 in "
                         f"[16, 256], k (B, Hkv, L, D), used and starts (B,); got kmin {tuple(kmin.shape)}, kmax "
                         f"{tuple(kmax.shape)}, k {tuple(k.shape)}, used {tuple(used.shape)}, starts "
                         f"{tuple(starts.shape)}")
    touched = min(n_blocks, -(-q_len // block_size) + 1)
    _update_summaries[(touched, batch * kv_heads)](
        kmin, kmax, k, used, starts, *kmin.stride(), *kmax.stride(), *k.stride(), used.stride(0), starts.stride(0),
        kv_heads, n_blocks, q_len, k.shape[2], length_shift, HEAD_DIM=dim, BLOCK_SIZE=block_size,
        POSITIONS=triton.next_power_of_2(block_size), num_warps=4)
