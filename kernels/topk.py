"""Exact top-k of long float32 rows by radix selection: LessIsMore's selection layers rank every key of a 128K
cache per query head, and a general-purpose sort or top-k over each whole row costs more than the attention that
produced the scores.

``row_topk(scores, k, lo, hi)`` returns, for every row of scores (B, H, L), its k largest entries, best first,
counting positions outside ``[lo[b], hi[b])`` as -inf, ties taken lowest position first: the same values and
positions as a stable descending sort (``row_topk_reference``).

How: each float is mapped to an int32 key with the same order (negative floats have their magnitude bits flipped).
Four passes over the row, one byte of the key each, highest first, narrow down the key of the k-th largest entry,
the threshold: each pass counts, for the entries that match the bytes fixed so far, how many take each value of
the next byte (a 256-bin histogram, per chunk of ``BLOCK`` positions, added to the row's by atomics), and the
next pass starts by choosing the byte value at which the count from the top reaches the number still needed. A
last pass writes every entry above the threshold, and the first entries equal to it (by position: the chunks'
counts of ties from the last histogram give each chunk its first tie's rank), as an int64 sort key
``(~key << 32) | position``; one sort of those k keys per row puts them best first, ties by position. Every pass
reads the row once (L2-resident after the first), and nothing waits on the host: CUDA-graph capturable, static
shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import ShapeError
from . import hardware

BLOCK = 4096  # positions per program and pass
BINS = 256  # one byte of the key per pass
PASSES = 4  # bytes in a float32 key


@triton.jit
def _keys(Scores, Lo, Hi, row, chunk, stride_b, stride_h, heads, length, BLOCK: tl.constexpr):
    """A chunk of a row's positions, their int32 order keys (-inf outside the row's range) and which are real."""
    batch = row // heads
    pos = chunk * BLOCK + tl.arange(0, BLOCK)
    real = pos < length
    lo = tl.load(Lo + batch)
    hi = tl.load(Hi + batch)
    x = tl.load(Scores + batch.to(tl.int64) * stride_b + (row % heads).to(tl.int64) * stride_h + pos, mask=real,
                other=float("-inf"))
    x = tl.where((pos >= lo) & (pos < hi), x, float("-inf")) + 0.0  # + 0.0 makes -0.0 +0.0: they are equal
    bits = x.to(tl.int32, bitcast=True)
    return pos, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), real


@triton.jit
def _choices(Hist, row, k, DONE: tl.constexpr, BINS: tl.constexpr):
    """The top ``DONE`` bytes of the threshold's key (as a signed prefix) and how many entries equal to that prefix
    are still needed, from the first DONE histograms of the row."""
    bins = tl.arange(0, BINS)
    prefix = tl.zeros([], dtype=tl.int32)
    need = tl.zeros([], dtype=tl.int32) + k
    for level in tl.static_range(DONE):
        counts = tl.load(Hist + (row * 4 + level) * BINS + (BINS - 1 - bins))  # from the top byte value down
        skipped = tl.sum((tl.cumsum(counts, 0) < need).to(tl.int32), 0)  # byte values wholly in the top k
        need -= tl.sum(tl.where(bins < skipped, counts, 0), 0)
        byte = BINS - 1 - skipped
        if level == 0:
            prefix = byte - BINS // 2  # the top byte is signed
        else:
            prefix = (prefix << 8) | byte
    return prefix, need


@triton.jit
def _histogram(Scores, Lo, Hi, Hist, TieCounts, stride_b, stride_h, heads, length, k, n_chunks,
               LEVEL: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """Pass LEVEL over chunk ``program_id(1)`` of row ``program_id(0)``: adds the counts of byte LEVEL (from the
    top) of the keys that match the bytes chosen so far to the row's histogram LEVEL. The last pass also keeps the
    chunk's own counts (TieCounts), from which the final pass ranks the ties."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    pos, key, real = _keys(Scores, Lo, Hi, row, chunk, stride_b, stride_h, heads, length, BLOCK)
    if LEVEL == 0:
        byte = ((key >> 24) + BINS // 2) & (BINS - 1)
        match = real
    else:
        prefix, _ = _choices(Hist, row, k, LEVEL, BINS)
        byte = (key >> (24 - 8 * LEVEL)) & (BINS - 1)
        match = real & ((key >> (32 - 8 * LEVEL)) == prefix)
    # The entries that do not match are counted in bin 0 and taken out again (histogram takes no mask in every
    # Triton this supports).
    counts = tl.histogram(tl.where(match, byte, 0), BINS)
    bins = tl.arange(0, BINS)
    counts = tl.where(bins == 0, counts - tl.sum((~match).to(tl.int32), 0), counts)
    tl.atomic_add(Hist + (row * 4 + LEVEL) * BINS + bins, counts, mask=counts > 0, sem="relaxed")
    if LEVEL == 3:
        tl.store(TieCounts + (row * n_chunks + chunk) * BINS + bins, counts)


@triton.jit
def _gather_top(Scores, Lo, Hi, Hist, TieCounts, Taken, Out, stride_b, stride_h, heads, length, k, n_chunks,
                BLOCK: tl.constexpr, BINS: tl.constexpr, CHUNKS: tl.constexpr):
    """The final pass: the chunk's entries above the threshold (slots claimed by an atomic per row) and its ties
    that rank below the number still needed (slots after every entry above), as int64 sort keys in Out (rows, k)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    threshold, need = _choices(Hist, row, k, 4, BINS)
    pos, key, real = _keys(Scores, Lo, Hi, row, chunk, stride_b, stride_h, heads, length, BLOCK)
    above = real & (key > threshold)
    tied = real & (key == threshold)
    earlier = tl.arange(0, CHUNKS)
    ties_before = tl.sum(tl.load(TieCounts + (row * n_chunks + earlier) * BINS + (threshold & (BINS - 1)),
                                 mask=earlier < chunk, other=0), 0)
    tie_rank = ties_before + tl.cumsum(tied.to(tl.int32), 0) - 1
    n_above = tl.sum(above.to(tl.int32), 0)
    first_slot = tl.atomic_add(Taken + row, n_above, sem="relaxed")
    slot = tl.where(above, first_slot + tl.cumsum(above.to(tl.int32), 0) - 1, k - need + tie_rank)
    # Ascending order of this key is descending score, then ascending position.
    sort_key = ((~key).to(tl.int64) << 32) | pos.to(tl.int64)
    tl.store(Out + row.to(tl.int64) * k + slot, sort_key, mask=above | (tied & (tie_rank < need)))


def _check(scores: torch.Tensor, k: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
    if scores.dim() != 3 or scores.dtype != torch.float32:
        raise ShapeError(f"row_topk: scores must be float32 (B, H, L); got {scores.dtype} {tuple(scores.shape)}")
    batch, _, length = scores.shape
    if not 1 <= k <= length:
        raise ShapeError(f"row_topk: k = {k}; must be in [1, L = {length}]")
    for name, bound in (("lo", lo), ("hi", hi)):
        if bound.shape != (batch,) or bound.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"row_topk: {name} must be int32/int64 of shape ({batch},); got {bound.dtype} "
                             f"{tuple(bound.shape)}")


def row_topk_reference(scores: torch.Tensor, k: int, lo: torch.Tensor, hi: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, H, k) float32, positions (B, H, k) int64): each row's k largest scores, counting positions
    outside [lo[b], hi[b]) as -inf, best first, ties lowest position first (a stable descending sort)."""
    _check(scores, k, lo, hi)
    position = torch.arange(scores.shape[-1], device=scores.device)
    inside = (position >= lo[:, None]) & (position < hi[:, None])
    values, positions = scores.masked_fill(~inside[:, None], float("-inf")).sort(dim=-1, descending=True,
                                                                                 stable=True)
    return values[..., :k], positions[..., :k]


def row_topk(scores: torch.Tensor, k: int, lo: torch.Tensor, hi: torch.Tensor, block: int = BLOCK
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels: same contract as :func:`row_topk_reference` (scores without NaN, last dimension contiguous),
    on CUDA or under TRITON_INTERPRET=1. ``block``: positions per program (a power of 2 >= 16)."""
    _check(scores, k, lo, hi)
    if block < 16 or block & (block - 1):
        raise ShapeError(f"row_topk: block = {block}; must be a power of 2 >= 16")
    if scores.stride(-1) != 1:
        raise ShapeError(f"row_topk: scores must be contiguous along L; got strides {scores.stride()}")
    if not scores.is_cuda and not hardware.interpreting():
        raise ShapeError(f"row_topk: scores are on {scores.device}; the kernels need CUDA tensors (or "
                         "TRITON_INTERPRET=1). Use row_topk_reference there")
    batch, heads, length = scores.shape
    rows, n_chunks = batch * heads, triton.cdiv(length, block)
    counters = torch.zeros(rows * PASSES * BINS + rows, dtype=torch.int32, device=scores.device)
    hist, taken = counters[:rows * PASSES * BINS], counters[rows * PASSES * BINS:]
    tie_counts = torch.empty((rows, n_chunks, BINS), dtype=torch.int32, device=scores.device)
    sort_keys = torch.empty((batch, heads, k), dtype=torch.int64, device=scores.device)
    args = (scores, lo, hi, hist, tie_counts)
    shape = (scores.stride(0), scores.stride(1), heads, length, k, n_chunks)
    for level in range(PASSES):
        _histogram[(rows, n_chunks)](*args, *shape, LEVEL=level, BLOCK=block, BINS=BINS, num_warps=8)
    _gather_top[(rows, n_chunks)](*args, taken, sort_keys, *shape, BLOCK=block, BINS=BINS,
                                  CHUNKS=triton.next_power_of_2(n_chunks), num_warps=8)
    sort_keys = sort_keys.sort(dim=-1).values
    positions = sort_keys & 0xFFFFFFFF
    key = (~(sort_keys >> 32)).to(torch.int32)
    values = torch.where(key < 0, key ^ 0x7FFFFFFF, key).view(torch.float32)
    return values, positions
