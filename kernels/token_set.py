"""LessIsMore's token set from per-head rankings: the rank-major union of the heads' top keys, between the sink
and the recent tokens, written as the int32 token lists the decode kernel reads (one per KV head).

After the top-k, a selection layer's set took some 25 small PyTorch kernels (a scatter-min, a cumulative sum,
the concatenation with sinks and recents, the casts and copies per KV head): 52-73 us at 128K on the H200, as
much as half the top-k. Here three launches do it, with no host synchronisation and static shapes only:

1. a fill of the first-reading table (B * groups, P) with a large value;
2. ``_first_readings``: every reading (rank r of head h is reading ``r * H + h``, the rank-major order) does an
   atomic min of its index into its position's entry, so each entry ends as the position's first reading;
3. ``_assemble``: one program per (row, group) walks the readings in order, keeps those that are their
   position's first (a cumulative sum gives each its slot), and stops once the width is reached (after about
   ``width`` readings when the heads disagree, ``H * width`` at worst); it also writes the sinks, the recents,
   the -1 where fewer positions exist, every KV head's copy and the counts.

``token_set`` launches them (CUDA, or any device under TRITON_INTERPRET=1); ``token_set_reference`` computes
the same lists in PyTorch (any device), from :func:`unify_rank_major`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ShapeError

# Readings per program of _first_readings and per step of _assemble's walk.
READINGS_PER_PROGRAM = 1024
READINGS_PER_STEP = 1024
SLOTS_PER_STEP = 1024
NOT_READ = 2 ** 31 - 1


def unify_rank_major(top: Tensor, valid: Tensor, width: int, positions: int) -> Tensor:
    """The rank-major union of per-head rankings: (B, X, width) positions, -1 where fewer than ``width`` exist.

    top: (B, X, H, k) positions in [0, positions), each head's best first; valid: (B, X, H, k) which entries
    count. For each of the X groups, entries are read rank by rank (rank 0 of heads 0..H-1, then rank 1, ...), and
    each position is kept at its first appearance, the first ``width`` kept in that order. A scatter-min over
    positions finds each position's first reading, a cumulative sum its rank among the kept."""
    batch, groups, heads, k = top.shape
    reading = top.transpose(2, 3).reshape(batch, groups, k * heads).long()
    counted = valid.transpose(2, 3).reshape(batch, groups, k * heads)
    column = torch.where(counted, reading, positions)  # entries that do not count meet in a spare last column
    read_index = torch.arange(k * heads, device=top.device).expand_as(column)
    first_reading = torch.full((batch, groups, positions + 1), k * heads, dtype=torch.int64, device=top.device)
    first_reading.scatter_reduce_(-1, column, read_index, "amin")
    first = (first_reading.gather(-1, column) == read_index) & counted
    rank = first.long().cumsum(-1) - 1
    slot = torch.where(first & (rank < width), rank, width)  # the rest go to a discarded last slot
    unified = torch.full((batch, groups, width + 1), -1, dtype=torch.int64, device=top.device)
    unified.scatter_(-1, slot, reading)
    return unified[..., :width]


def _check(top_positions: Tensor, top_values: Tensor | None, lengths: Tensor, starts: Tensor, budget: int,
           recent: int, sink: int, groups: int, kv_heads: int, positions: int) -> None:
    """Shapes, dtypes and the split of the budget (never values: reading them would sync with the device)."""
    if top_positions.dim() != 3 or top_positions.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"token_set: top_positions must be an int32 or int64 tensor (B, Hq, k); got "
                         f"{top_positions.dtype} {tuple(top_positions.shape)}")
    batch, heads, k = top_positions.shape
    if top_values is not None and top_values.shape != top_positions.shape:
        raise ShapeError(f"token_set: top_values must have top_positions' shape {tuple(top_positions.shape)}; got "
                         f"{tuple(top_values.shape)}")
    for name, t in (("lengths", lengths), ("starts", starts)):
        if t.shape != (batch,) or t.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"token_set: {name} must be an int32 or int64 tensor of shape ({batch},); got "
                             f"{t.dtype} {tuple(t.shape)}")
    if groups < 1 or heads % groups or kv_heads % groups:
        raise ShapeError(f"token_set: groups = {groups} must divide the query heads ({heads}) and the KV heads "
                         f"({kv_heads})")
    width = budget - sink - recent
    if sink < 0 or recent < 0 or width < 1:
        raise ShapeError(f"token_set: budget {budget} must exceed sink {sink} + recent {recent} (both >= 0)")
    if k > width:
        raise ShapeError(f"token_set: rankings of {k} per head; at most budget - sink - recent = {width} count")
    if positions < 1:
        raise ShapeError(f"token_set: positions = {positions}; the rankings' positions lie in [0, positions)")


def token_set_reference(top_positions: Tensor, top_values: Tensor | None, lengths: Tensor, starts: Tensor, *,
                        budget: int, recent: int, sink: int, groups: int, kv_heads: int, positions: int,
                        length_shift: int = 0) -> tuple[Tensor, Tensor]:
    """The lists in PyTorch: (tokens (B, kv_heads, budget) int32, counts (B, kv_heads) int32, all ``budget``).

    top_positions (B, Hq, k): each query head's candidate positions in [0, positions), best first; an entry
    counts when its position is in [0, positions) and, if ``top_values`` is given, its value is > -inf (a top-k over scores
    that are -inf outside the middle region). Row b's real tokens are ``[starts[b], lengths[b] + length_shift)``.
    Its list: the first ``sink`` of them, then the rank-major union (:func:`unify_rank_major`) of the rankings
    of each group of ``Hq / groups`` heads, -1 where it has fewer than ``budget - sink - recent`` positions, then
    its last ``recent``; when its real tokens fit the budget, all of them (``starts[b] + slot``: the decode kernel
    ignores the positions past the length, as it does -1). Query-head group x serves KV heads
    ``[x * kv_heads / groups, (x + 1) * kv_heads / groups)``."""
    _check(top_positions, top_values, lengths, starts, budget, recent, sink, groups, kv_heads, positions)
    batch, heads, k = top_positions.shape
    width = budget - sink - recent
    device = top_positions.device
    lengths, starts = lengths.long() + length_shift, starts.long()
    counted = (top_positions >= 0) & (top_positions < positions)
    if top_values is not None:
        counted = counted & (top_values > float("-inf"))
    shape = (batch, groups, heads // groups, k)
    unified = unify_rank_major(top_positions.clamp(min=0).view(shape), counted.view(shape), width, positions)
    sinks = (starts[:, None] + torch.arange(sink, device=device))[:, None].expand(batch, groups, sink)
    recents = (lengths[:, None] - recent + torch.arange(recent, device=device))[:, None]
    chosen = torch.cat([sinks, unified, recents.expand(batch, groups, recent)], dim=-1)
    everything = (starts[:, None] + torch.arange(budget, device=device))[:, None]
    fits = (lengths - starts <= budget)[:, None, None]
    tokens = torch.where(fits, everything, chosen).repeat_interleave(kv_heads // groups, dim=1)
    return (tokens.to(torch.int32).contiguous(),
            torch.full((batch, kv_heads), budget, dtype=torch.int32, device=device))


@triton.jit
def _reading(TOP, VALUES, row_top, row_values, reading, heads_per_group, head_base, k, positions, stride_th,
             stride_tk, stride_vh, stride_vk, HAS_VALUES: tl.constexpr):
    """The positions of readings ``reading`` (rank-major: reading r is rank r // H of head r % H of the group),
    and whether each counts (in range, 0 <= position < positions, value > -inf)."""
    in_range = reading < heads_per_group * k
    head = (head_base + reading % heads_per_group).to(tl.int64)
    rank = (reading // heads_per_group).to(tl.int64)
    position = tl.load(TOP + row_top + head * stride_th + rank * stride_tk, mask=in_range, other=-1)
    counts = in_range & (position >= 0) & (position < positions)
    if HAS_VALUES:
        value = tl.load(VALUES + row_values + head * stride_vh + rank * stride_vk, mask=counts,
                        other=float("-inf"))
        counts = counts & (value > float("-inf"))
    return position, counts


@triton.jit
def _first_readings(
    TOP, VALUES, FIRST,
    stride_tb, stride_th, stride_tk, stride_vb, stride_vh, stride_vk, stride_fr,
    groups, heads_per_group, k, positions,
    BLOCK: tl.constexpr, HAS_VALUES: tl.constexpr,
):
    """Program (row b * groups + group x, chunk c): readings ``[c * BLOCK, (c + 1) * BLOCK)`` of the group's
    rankings; ``FIRST[b * groups + x, p]`` becomes the smallest reading of position p (atomic min)."""
    row_group = tl.program_id(0)
    batch = row_group // groups
    head_base = (row_group % groups) * heads_per_group
    reading = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    position, counts = _reading(TOP, VALUES, batch.to(tl.int64) * stride_tb, batch.to(tl.int64) * stride_vb,
                                reading, heads_per_group, head_base, k, positions, stride_th, stride_tk, stride_vh,
                                stride_vk, HAS_VALUES)
    tl.atomic_min(FIRST + row_group.to(tl.int64) * stride_fr + position, reading, mask=counts)


@triton.jit
def _assemble(
    TOP, VALUES, FIRST, LENGTHS, STARTS, Tokens, Counts,
    stride_tb, stride_th, stride_tk, stride_vb, stride_vh, stride_vk, stride_fr, stride_len, stride_start,
    stride_ob, stride_oh, stride_os, stride_cb, stride_ch,
    groups, heads_per_group, k, positions, budget, sink, recent, length_shift,
    COPIES: tl.constexpr, COPIES_POW2: tl.constexpr, READINGS: tl.constexpr, SLOTS: tl.constexpr, HAS_VALUES: tl.constexpr,
):
    """Program b * groups + x: row b's list for group x, written to KV heads ``[x * COPIES, (x + 1) * COPIES)``
    (slot s of the list at ``Tokens[b, head, s]``), and their counts."""
    row_group = tl.program_id(0)
    batch = row_group // groups
    head_base = (row_group % groups) * heads_per_group
    width = budget - sink - recent
    length = tl.load(LENGTHS + batch * stride_len).to(tl.int64) + length_shift
    start = tl.load(STARTS + batch * stride_start).to(tl.int64)
    fits = length - start <= budget
    out_row = Tokens + batch.to(tl.int64) * stride_ob + (row_group % groups).to(tl.int64) * COPIES * stride_oh
    offs_slot = tl.arange(0, SLOTS)
    offs_read = tl.arange(0, READINGS)

    # The slots that do not come from the union: everything when the row fits, else the sinks and the recents.
    for s0 in range(0, budget, SLOTS):
        slot = s0 + offs_slot
        recent_slot = slot >= budget - recent
        from_start = slot < tl.where(fits, budget, sink)  # the first slots count from the row's start
        token = tl.where(from_start, start + slot, length - budget + slot)
        for copy in tl.static_range(COPIES):
            tl.store(out_row + copy * stride_oh + slot * stride_os, token.to(tl.int32),
                     mask=(slot < budget) & (from_start | recent_slot))
    found = tl.zeros([], dtype=tl.int32)
    if length - start > budget:
        # The union, in reading order: a reading is kept when it is its position's first.
        r0 = 0
        while (found < width) & (r0 < heads_per_group * k):
            reading = r0 + offs_read
            position, counts = _reading(TOP, VALUES, batch.to(tl.int64) * stride_tb, batch.to(tl.int64) * stride_vb,
                                        reading, heads_per_group, head_base, k, positions, stride_th, stride_tk,
                                        stride_vh, stride_vk, HAS_VALUES)
            first_reading = tl.load(FIRST + row_group.to(tl.int64) * stride_fr + position, mask=counts, other=-1)
            first = counts & (first_reading == reading)
            rank = found + tl.cumsum(first.to(tl.int32), 0) - 1
            kept = first & (rank < width)
            for copy in tl.static_range(COPIES):
                tl.store(out_row + copy * stride_oh + (sink + rank) * stride_os, position.to(tl.int32), mask=kept)
            found += tl.sum(first.to(tl.int32), 0)
            r0 += READINGS
        found = tl.minimum(found, width)
        # Fewer distinct positions than the width: the rest of the middle is -1.
        for s0 in range(found, width, SLOTS):
            slot = s0 + offs_slot
            for copy in tl.static_range(COPIES):
                tl.store(out_row + copy * stride_oh + (sink + slot) * stride_os, tl.full([SLOTS], -1, tl.int32),
                         mask=slot < width)
    copy = tl.arange(0, COPIES_POW2)
    heads = (row_group % groups) * COPIES + copy
    tl.store(Counts + batch.to(tl.int64) * stride_cb + heads * stride_ch, tl.full([COPIES_POW2], budget, tl.int32),
             mask=copy < COPIES)


def token_set(top_positions: Tensor, top_values: Tensor | None, lengths: Tensor, starts: Tensor, *, budget: int,
              recent: int, sink: int, groups: int, kv_heads: int, positions: int, length_shift: int = 0
              ) -> tuple[Tensor, Tensor]:
    """Launch the kernels; same contract as :func:`token_set_reference`. CUDA tensors, or any device under
    TRITON_INTERPRET=1. Capturable in a CUDA graph (no value is read on the host)."""
    _check(top_positions, top_values, lengths, starts, budget, recent, sink, groups, kv_heads, positions)
    batch, heads, k = top_positions.shape
    device = top_positions.device
    heads_per_group = heads // groups
    first = torch.full((batch * groups, positions), NOT_READ, dtype=torch.int32, device=device)
    values, value_strides = (top_values, top_values.stride()) if top_values is not None else (top_positions,
                                                                                              (0, 0, 0))
    _first_readings[(batch * groups, triton.cdiv(heads_per_group * k, READINGS_PER_PROGRAM))](
        top_positions, values, first, *top_positions.stride(), *value_strides, first.stride(0),
        groups, heads_per_group, k, positions, BLOCK=READINGS_PER_PROGRAM, HAS_VALUES=top_values is not None,
    )
    tokens = torch.empty((batch, kv_heads, budget), dtype=torch.int32, device=device)
    counts = torch.empty((batch, kv_heads), dtype=torch.int32, device=device)
    _assemble[(batch * groups,)](
        top_positions, values, first, lengths, starts, tokens, counts,
        *top_positions.stride(), *value_strides, first.stride(0), lengths.stride(0), starts.stride(0),
        *tokens.stride(), *counts.stride(),
        groups, heads_per_group, k, positions, budget, sink, recent, length_shift,
        COPIES=kv_heads // groups, COPIES_POW2=triton.next_power_of_2(kv_heads // groups), READINGS=READINGS_PER_STEP, SLOTS=SLOTS_PER_STEP,
        HAS_VALUES=top_values is not None, num_warps=4,
    )
    return tokens, counts
