"""Flash-decoding (split-KV) attention: one new query token per sequence against its KV cache, the decode step
(or a short chunk of T new tokens, causal over the cache: a rectification's).

One query row per head leaves a prefill tile almost empty and one program per (batch, head) too few programs to
fill the GPU, so the keys are split instead: the grid is ``(num_splits, B * Hkv)``. A program takes ALL the G
query heads of one KV group (times the T tokens of a chunk) as the rows of its tile (the M of a ``tl.dot``,
padded to >= 16 rows under a mask), so each K/V tile is read from memory once per group, not once per query
head; it walks its share of the key blocks with an online softmax and writes a partial output and log-sum-exp
to a float32 workspace. A second small kernel combines the splits by their lse (with one split the first kernel
writes the result itself).

Nothing on the host depends on a tensor's values: the number of splits comes from static shapes and the device's
multiprocessor count, the lengths (``kv_lengths``) and block lists are read by the kernel, and each split takes
its share of the blocks a row actually has. So the launch can be captured in a CUDA graph, and a growing cache
changes no compiled kernel and no grid.

``decode_attention`` launches the kernels (CUDA tensors, or any device under TRITON_INTERPRET=1);
``decode_attention_reference`` computes the same function in plain PyTorch (any device).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import ShapeError
from . import hardware

LOG2E = 1.4426950408889634

# Programs the split grid aims for, per multiprocessor: a decode step is bound by reading the cache, and a few
# resident programs per SM hide the load latency of each other. Off CUDA (the interpreter) a nominal device.
PROGRAMS_PER_SM = 4
# A chunk of T new tokens per row puts T x G rows in each program's tile: at most this many (a 128 x D float32
# accumulator per program, with 8 warps).
MAX_CHUNK_ROWS = 128
MAX_SPLITS = 128
INTERPRETER_MULTIPROCESSORS = 4


def decode_num_splits(batch: int, kv_heads: int, n_blocks: int, multiprocessors: int, *,
                      programs_per_sm: int = PROGRAMS_PER_SM, max_splits: int = MAX_SPLITS) -> int:
    """How many splits the keys of one (batch, KV head) get: enough that ``splits * batch * kv_heads`` programs
    reach ``programs_per_sm * multiprocessors``, at most one split per key block (``n_blocks``: the cache's
    blocks, or the width S of the block lists — static sizes, never the lengths in use) and ``max_splits``, at
    least 1. Static shapes in, so it never syncs and never changes as the cache fills."""
    wanted = -(-programs_per_sm * multiprocessors // max(1, batch * kv_heads))
    return max(1, min(wanted, n_blocks, max_splits))


# A pass that also writes every score (a LessIsMore selection layer's): 128-key tiles, 2 stages, and splits for a
# quarter of the multiprocessors. The best of a sweep on the H200 at 32/8 heads, D=128, B=1 and B=8
# (benchmarks/results/lessismore-launch-probe-2026-12-04.log): 33 splits took 0.050 / 0.151 ms at 32K / 128K B=1
# (the decode defaults 0.056 / 0.182; 66 splits 0.055 / 0.153) and 0.282 / 1.061 at B=8 (defaults 0.307 / 1.203).
# Other head counts (a tensor-parallel rank's) were not swept.
SCORES_BLOCK_N, SCORES_STAGES, SCORES_SMS_PER_SPLIT = 128, 2, 4


def scores_pass_launch(length: int, device) -> dict:
    """The launch arguments (``block_n``, ``num_stages``, ``num_splits``) of :func:`decode_attention` for a pass
    with ``scores_out`` over a cache of ``length`` keys; static shapes only, like :func:`decode_num_splits`."""
    multiprocessors = hardware.multiprocessors(device, INTERPRETER_MULTIPROCESSORS)
    splits = max(1, min(multiprocessors // SCORES_SMS_PER_SPLIT, -(-length // SCORES_BLOCK_N), MAX_SPLITS))
    return {"block_n": SCORES_BLOCK_N, "num_stages": SCORES_STAGES, "num_splits": splits}


# A pass over a token list (a LessIsMore sparse layer's, 2048 positions): 128-token tiles, 2 stages, and splits
# for about 2 programs per multiprocessor, at most one a tile. A list is short, so the decode default (64-key
# tiles, 4 programs per SM) spends more on the combine and the partial writes than it saves in latency. The best
# of a sweep on the H200 at 32/8 heads, D=128, 128K, each layer's marginal time in a graph of 28
# (benchmarks/results/lessismore-launch-probe-2026-12-04b.log): B=1 16 splits 8.0 us (the default 9.6), B=8 4
# splits 25.5 us (33.4); the same at 32K.
TOKENS_BLOCK_N, TOKENS_STAGES, TOKENS_PROGRAMS_PER_SM = 128, 2, 2


def token_pass_launch(batch: int, kv_heads: int, listed: int, device) -> dict:
    """The launch arguments (``block_n``, ``num_stages``, ``num_splits``) of :func:`decode_attention` for token
    lists of ``listed`` positions per (row, KV head); static shapes only, like :func:`decode_num_splits`."""
    multiprocessors = hardware.multiprocessors(device, INTERPRETER_MULTIPROCESSORS)
    tiles = -(-listed // TOKENS_BLOCK_N)
    wanted = decode_num_splits(batch, kv_heads, tiles, multiprocessors, programs_per_sm=TOKENS_PROGRAMS_PER_SM)
    per_split = -(-tiles // wanted)
    # The kernel gives each split ceil(tiles / splits) tiles: no more splits than that fills (none left empty).
    return {"block_n": TOKENS_BLOCK_N, "num_stages": TOKENS_STAGES, "num_splits": -(-tiles // per_split)}


# A pass over block lists (ReSA's: 256 blocks of 16 at a 4K-token budget): 128-key tiles (each gathering 8 listed
# blocks), 2 stages, the default splits. On the H100 at 32/8 heads, D=128, 128K, each layer's marginal time in a
# graph of 32 (benchmarks/results/resa-probe-2026-12-06.log): B=1 10.5 us (the decode default, 64-key tiles and
# 3 stages, 14.1), B=8 58.6 (59.3).
BLOCKS_BLOCK_N, BLOCKS_STAGES = 128, 2


def block_pass_launch() -> dict:
    """The launch arguments (``block_n``, ``num_stages``) of :func:`decode_attention` for block lists."""
    return {"block_n": BLOCKS_BLOCK_N, "num_stages": BLOCKS_STAGES}


def stages_for_decode(num_stages: int, block_n: int, head_dim: int, head_dim_v: int, element_size: int,
                      shared_memory: int | None) -> int:
    """``num_stages``, lowered until the pipelined K and V tiles (``stages * block_n * (D + Dv)`` elements) fit
    ``shared_memory`` bytes (:func:`hardware.stages_that_fit`)."""
    return hardware.stages_that_fit(
        num_stages, block_n * (head_dim + head_dim_v) * element_size, shared_memory,
        f"decode_attention: block_n={block_n} K/V tiles with D={head_dim}, Dv={head_dim_v} in {element_size}-byte "
        "elements")


@triton.jit
def _attend_keys(acc, m_i, l_i, q, k_base, v_base, pad_base, start, end, row_limit, offs_t, k_cols, v_cols,
                 qk_scale, stride_kn, stride_vn, stride_pn, HAS_PADDING: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One tile of BLOCK_N keys from position ``start``; keys at ``end`` and past are invisible (``end`` <= the
    row's length <= L, so masked loads never leave the cache). Every tile is masked: only the last of a row needs
    it without padding, but a decode step is bound by the K/V bytes, not by a compare and a select. ``k_cols`` and
    ``v_cols``: the D and Dv offsets, already times their strides."""
    offs_n = start + offs_t
    return _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, offs_n, offs_n < end, row_limit, k_cols, v_cols,
                   qk_scale, stride_kn, stride_vn, stride_pn, HAS_PADDING, IEEE, UPCAST)


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, offs_n, visible, row_limit, k_cols, v_cols, qk_scale,
            stride_kn, stride_vn, stride_pn, HAS_PADDING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """The keys at positions ``offs_n`` (BLOCK_N of them, contiguous or listed) where ``visible`` (and not padding)
    folded into the online softmax of the tile's rows, row r seeing positions below ``row_limit[r]`` (a chunk's
    causal mask; the row's length for one new token); also the tile's scores (scaled by ``qk_scale``, -inf where
    invisible)."""
    if HAS_PADDING:
        attend = tl.load(pad_base + offs_n.to(tl.int64) * stride_pn, mask=visible, other=0)
        visible = visible & (attend != 0)
    # Padded keys are not even read: the masked lanes fetch nothing.
    k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + k_cols[:, None], mask=visible[None, :],
                other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + v_cols[None, :], mask=visible[:, None],
                other=0.0)
    if UPCAST:  # the interpreter's tl.dot multiplies bfloat16 bit patterns (triton#11584): float32 operands there
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    elif IEEE:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    qk = tl.where(visible[None, :] & (offs_n[None, :] < row_limit[:, None]), qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen only invisible keys keeps m = -inf; shift by 0 then, so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:  # p still rounded to v's dtype, as on the GPU
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i, qk


@triton.jit
def _decode_split(
    Q, K, V, KV_LENGTHS, PAD, BLOCK_IDX, BLOCK_CNT, BLOCK_OFFSET, Out, Lse, Scores, SCORES_START,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_len, stride_offset, stride_ss,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_sb, stride_sh, stride_sn,
    kv_heads, group, q_len, cache_len, n_listed, n_cache_blocks, qk_scale, length_shift, scores_skip_first,
    scores_skip_last,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_BLOCKS: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_TOKENS: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_SCORES_START: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split ``program_id(0)`` of (batch, KV head) ``program_id(1)``: rows are the group's query heads, for each
    of the ``q_len`` new tokens (row r: token r // group, head r % group; token t sees the positions below
    ``length - (q_len - 1 - t)``). Writes out (normalised by its own sum) and natural-log lse at index ``split``
    of Out/Lse, whose rows are (query head, token) flattened: the float32 workspace, or the final tensors when
    there is one split. A split with no visible key writes out 0 and lse -inf. The row's length is
    ``KV_LENGTHS[b] + length_shift``. With HAS_SCORES (no lists) also every position of Scores for every row:
    the key's score where it is visible and in ``[SCORES_START[b] + scores_skip_first, length -
    scores_skip_last)`` (SCORES_START read only with HAS_SCORES_START, else 0), else -inf; the
    positions past the length are shared out among the splits like the keys."""
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    batch_head = tl.program_id(1)
    batch = batch_head // kv_heads
    kv_head = batch_head % kv_heads

    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_r < q_len * group
    token = offs_r // group
    heads = (kv_head * group + offs_r % group).to(tl.int64)
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + token[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    # Lengths past the cache are clamped to it and negative ones to 0: a bad length can only hide keys.
    kv_len = tl.load(KV_LENGTHS + batch * stride_len) + length_shift
    kv_len = tl.minimum(tl.maximum(kv_len, 0), cache_len).to(tl.int32)
    row_limit = kv_len - (q_len - 1 - token)
    rows = heads * q_len + token  # the row of (query head, token) in Out and Lse

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    pad_base = PAD + batch.to(tl.int64) * stride_pb
    score_base = Scores + batch.to(tl.int64) * stride_sb
    # Unit strides along D are compiled in (Triton specialises stride 1), which keeps the loads vectorised.
    offs_kd = offs_d * stride_kd
    offs_vd = offs_dv * stride_vd

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_V], dtype=tl.float32)

    # Each split takes a contiguous share of the blocks this row really has (its length or list count, read
    # here), not of the cache's capacity: the work stays balanced however full the cache is.
    if HAS_BLOCKS or HAS_TOKENS:
        count = tl.load(BLOCK_CNT + batch.to(tl.int64) * stride_cb + kv_head.to(tl.int64) * stride_ch)
        count = tl.minimum(tl.maximum(count, 0), n_listed).to(tl.int32)
        index_row = BLOCK_IDX + batch.to(tl.int64) * stride_ib + kv_head.to(tl.int64) * stride_ih
        # A split's share in units of list entries per tile: BLOCK_N tokens, BLOCKS_PER_TILE small blocks, or
        # one block (which takes one or more tiles).
        n_units = tl.cdiv(count, BLOCK_N if HAS_TOKENS else BLOCKS_PER_TILE)
        per_split = tl.cdiv(n_units, num_splits)
        first = split * per_split
        last = tl.minimum(first + per_split, n_units)
    # Row b's blocks start at its offset (a left-padded row's first real position), as they would alone.
    offset = 0
    if HAS_OFFSETS:
        offset = tl.load(BLOCK_OFFSET + batch * stride_offset).to(tl.int32)
    if HAS_BLOCKS and BLOCKS_PER_TILE > 1:
        # Blocks smaller than a tile: each tile gathers BLOCKS_PER_TILE listed blocks, so that a tile's loads
        # are BLOCK_N keys in flight, not one small block behind its index load.
        lane_block = offs_t // BLOCK_SIZE
        lane_key = offs_t % BLOCK_SIZE
        for j in range(first, last):
            slot = j * BLOCKS_PER_TILE + lane_block
            listed = (lane_block < BLOCKS_PER_TILE) & (slot < count)
            block = tl.load(index_row + slot * stride_is, mask=listed, other=-1).to(tl.int32)
            positions = block * BLOCK_SIZE + offset + lane_key
            # An index outside the cache is ignored instead of read out of bounds.
            visible = listed & (block >= 0) & (block < n_cache_blocks) & (positions < kv_len)
            acc, m_i, l_i, _ = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, tl.where(visible, positions, 0),
                                       visible, row_limit, offs_kd, offs_vd, qk_scale, stride_kn, stride_vn,
                                       stride_pn, HAS_PADDING, IEEE, UPCAST)
    elif HAS_BLOCKS:
        for i in range(first, last):
            block = tl.load(index_row + i * stride_is).to(tl.int32)
            # An index outside the cache is ignored (end = start hides every key) instead of read out of bounds.
            in_cache = (block >= 0) & (block < n_cache_blocks)
            block_start = tl.minimum(tl.where(in_cache, block, 0) * BLOCK_SIZE + offset, kv_len)
            block_end = tl.where(in_cache, tl.minimum(block_start + BLOCK_SIZE, kv_len), block_start)
            for chunk in range(0, BLOCK_SIZE, BLOCK_N):
                acc, m_i, l_i, _ = _attend_keys(acc, m_i, l_i, q, k_base, v_base, pad_base, block_start + chunk,
                                                block_end, row_limit, offs_t, offs_kd, offs_vd, qk_scale, stride_kn,
                                                stride_vn, stride_pn, HAS_PADDING, IEEE, UPCAST)
    elif HAS_TOKENS:
        # The lists hold token positions: BLOCK_N of them per tile, their K/V rows gathered.
        for j in range(first, last):
            slots = j * BLOCK_N + offs_t
            listed = slots < count
            positions = tl.load(index_row + slots * stride_is, mask=listed, other=0).to(tl.int32)
            # A position outside the keys in use is ignored instead of read out of bounds.
            visible = listed & (positions >= 0) & (positions < kv_len)
            acc, m_i, l_i, _ = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, tl.where(visible, positions, 0),
                                    visible, row_limit, offs_kd, offs_vd, qk_scale, stride_kn, stride_vn, stride_pn,
                                    HAS_PADDING, IEEE, UPCAST)
    else:
        n_blocks = tl.cdiv(kv_len, BLOCK_N)
        per_split = tl.cdiv(n_blocks, num_splits)
        first = split * per_split
        last = tl.minimum(first + per_split, n_blocks)
        if HAS_SCORES:
            scored_from = scores_skip_first
            if HAS_SCORES_START:
                scored_from += tl.load(SCORES_START + batch * stride_ss).to(tl.int32)
            scored_to = kv_len - scores_skip_last
        for j in range(first, last):
            acc, m_i, l_i, qk = _attend_keys(acc, m_i, l_i, q, k_base, v_base, pad_base, j * BLOCK_N, kv_len,
                                             row_limit, offs_t, offs_kd, offs_vd, qk_scale, stride_kn, stride_vn,
                                             stride_pn,
                                             HAS_PADDING, IEEE, UPCAST)
            if HAS_SCORES:  # the same pass over K gives a selection its scores (natural units: q.k * scale)
                offs_n = j * BLOCK_N + offs_t
                scored = (offs_n >= scored_from) & (offs_n < scored_to)
                tl.store(score_base + heads[:, None] * stride_sh + offs_n[None, :].to(tl.int64) * stride_sn,
                         tl.where(scored[None, :], qk * 0.6931471805599453, float("-inf")),
                         mask=row_ok[:, None] & (offs_n < cache_len)[None, :])
        if HAS_SCORES:  # the tiles past the length: -inf, without reading K
            n_tiles = tl.cdiv(cache_len, BLOCK_N)
            per_split_past = tl.cdiv(n_tiles - n_blocks, num_splits)
            first_past = n_blocks + split * per_split_past
            for j in range(first_past, tl.minimum(first_past + per_split_past, n_tiles)):
                offs_n = j * BLOCK_N + offs_t
                tl.store(score_base + heads[:, None] * stride_sh + offs_n[None, :].to(tl.int64) * stride_sn,
                         tl.full([BLOCK_R, BLOCK_N], float("-inf"), tl.float32),
                         mask=row_ok[:, None] & (offs_n < cache_len)[None, :])

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # lse in natural log: m and l are in base 2 (scores were scaled by log2(e)).
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = (Out + batch.to(tl.int64) * stride_ob + rows[:, None] * stride_oh + split.to(tl.int64) * stride_os
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + batch.to(tl.int64) * stride_lb + rows * stride_lh + split.to(tl.int64) * stride_ls, lse,
             mask=row_ok)


@triton.jit
def _decode_combine(
    OutPart, LsePart, Out, Lse,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_qb, stride_qh, stride_qs,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    rows, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One row (a query head, or a (query head, token) of a chunk): ``out = sum_s exp(lse_s - lse) out_s``,
    ``lse = log sum_s exp(lse_s)``, splits read BLOCK_S at a time (two passes: the max first, so no exp
    overflows). Splits with lse -inf weigh 0; a row whose splits are all empty gets out 0, lse -inf."""
    batch_head = tl.program_id(0)
    batch = batch_head // rows
    head = batch_head % rows
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    lse_base = LsePart + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    out_base = OutPart + batch.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph

    m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + offs_s
        m = tl.maximum(m, tl.load(lse_base + splits * stride_qs, mask=splits < num_splits, other=float("-inf")))
    m_max = tl.max(m, 0)
    m_shift = tl.where(m_max == float("-inf"), 0.0, m_max)

    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM_V], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + offs_s
        in_range = splits < num_splits
        weight = tl.exp(tl.load(lse_base + splits * stride_qs, mask=in_range, other=float("-inf")) - m_shift)
        part = tl.load(out_base + splits[:, None].to(tl.int64) * stride_ps + offs_dv[None, :] * stride_pd,
                       mask=in_range[:, None], other=0.0)
        acc += tl.sum(weight[:, None] * part, 0)
        total += weight
    total_sum = tl.sum(total, 0)
    empty = total_sum == 0.0
    out = acc / tl.where(empty, 1.0, total_sum)
    lse = tl.where(empty, float("-inf"), m_shift + tl.log(tl.where(empty, 1.0, total_sum)))
    tl.store(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_dv * stride_od,
             out.to(Out.dtype.element_ty))
    tl.store(Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh, lse)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these head sizes and dtypes (callers use SDPA otherwise): D and Dv powers of 2 in
    [16, 256], one dtype among float16, bfloat16 and float32."""
    sizes_fit = all(16 <= d <= 256 and d & (d - 1) == 0 for d in (q.shape[-1], v.shape[-1]))
    return sizes_fit and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def check_decode_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                        key_padding: torch.Tensor | None, kv_block_indices: torch.Tensor | None,
                        kv_block_counts: torch.Tensor | None, block_size: int | None,
                        block_offsets: torch.Tensor | None = None, kv_token_indices: torch.Tensor | None = None,
                        kv_token_counts: torch.Tensor | None = None, scores_out: torch.Tensor | None = None,
                        scores_start: torch.Tensor | None = None, scores_skip: tuple[int, int] = (0, 0),
                        length_shift: int = 0) -> None:
    """Shapes, index dtypes and devices (never values: reading them would sync with the device)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"decode_attention: q must be (B, Hq, T, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, q_heads, q_len, dim = q.shape
    if q_len < 1:
        raise ShapeError(f"decode_attention: q must be (B, Hq, T, D) with T >= 1 new tokens; got {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[-1] != dim or v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"decode_attention: k must be (B, Hkv, L, D) and v (B, Hkv, L, Dv) with q's B={batch} and "
                         f"D={dim}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    kv_heads, length = k.shape[1], k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ShapeError(f"decode_attention: query heads ({q_heads}) must be a multiple of key/value heads "
                         f"({kv_heads})")
    if kv_lengths.shape != (batch,) or kv_lengths.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"decode_attention: kv_lengths must be an int32 or int64 tensor of shape ({batch},); got "
                         f"{kv_lengths.dtype} {tuple(kv_lengths.shape)}")
    if key_padding is not None and (key_padding.shape != (batch, length) or key_padding.is_floating_point()
                                    or key_padding.is_complex()):
        raise ShapeError(f"decode_attention: key_padding must be a bool (or integer, nonzero = attend) tensor of "
                         f"shape ({batch}, {length}); got {key_padding.dtype} {tuple(key_padding.shape)}")
    _check_lists("kv_block", kv_block_indices, kv_block_counts, batch, kv_heads, "S")
    if kv_block_indices is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ShapeError(f"decode_attention: block_size must be a positive int with kv_block_indices; got "
                         f"{block_size!r}")
    _check_lists("kv_token", kv_token_indices, kv_token_counts, batch, kv_heads, "T")
    if kv_token_indices is not None and kv_block_indices is not None:
        raise ShapeError("decode_attention: block lists or token lists, not both")
    if block_offsets is not None and (kv_block_indices is None or block_offsets.shape != (batch,)
                                      or block_offsets.dtype not in (torch.int32, torch.int64)):
        raise ShapeError(f"decode_attention: block_offsets must be an int32 (or int64) tensor of shape ({batch},), "
                         f"with kv_block_indices; got {getattr(block_offsets, 'dtype', None)} "
                         f"{tuple(getattr(block_offsets, 'shape', ()))}")
    if scores_out is not None and (scores_out.shape != (batch, q_heads, length)
                                   or scores_out.dtype not in (torch.float32, q.dtype)
                                   or kv_block_indices is not None or kv_token_indices is not None):
        raise ShapeError(f"decode_attention: scores_out must be a float32 (or {q.dtype}, q's dtype) tensor of shape "
                         f"({batch}, {q_heads}, {length}), without block or token lists; got {scores_out.dtype} "
                         f"{tuple(scores_out.shape)}" + (" with lists" if kv_block_indices is not None
                                                        or kv_token_indices is not None else ""))
    if scores_start is not None and (scores_out is None or scores_start.shape != (batch,)
                                     or scores_start.dtype not in (torch.int32, torch.int64)):
        raise ShapeError(f"decode_attention: scores_start must be an int32 (or int64) tensor of shape ({batch},), "
                         f"with scores_out; got {scores_start.dtype} {tuple(scores_start.shape)}"
                         + ("" if scores_out is not None else " without scores_out"))
    if len(scores_skip) != 2 or not all(isinstance(n, int) and n >= 0 for n in scores_skip):
        raise ShapeError(f"decode_attention: scores_skip must be two ints >= 0 (positions left unscored after "
                         f"scores_start and before the length); got {scores_skip!r}")
    if not isinstance(length_shift, int):
        raise ShapeError(f"decode_attention: length_shift must be an int (added to every kv_lengths entry); got "
                         f"{length_shift!r}")
    if q_len > 1 and (kv_block_indices is not None or kv_token_indices is not None or scores_out is not None):
        raise ShapeError(f"decode_attention: {q_len} new tokens per row (a chunk) take no block or token lists and "
                         "no scores_out; those are for one token per row")
    if q_len > 1 and q_len * (q_heads // kv_heads) > MAX_CHUNK_ROWS:
        raise ShapeError(f"decode_attention: {q_len} new tokens x {q_heads // kv_heads} query heads per KV head = "
                         f"{q_len * (q_heads // kv_heads)} rows per program; the kernel takes at most "
                         f"{MAX_CHUNK_ROWS} (chunks of up to {MAX_CHUNK_ROWS // (q_heads // kv_heads)} tokens here)")
    for name, t in (("k", k), ("v", v), ("kv_lengths", kv_lengths), ("key_padding", key_padding),
                    ("kv_block_indices", kv_block_indices), ("kv_block_counts", kv_block_counts),
                    ("block_offsets", block_offsets), ("kv_token_indices", kv_token_indices),
                    ("kv_token_counts", kv_token_counts), ("scores_out", scores_out), ("scores_start", scores_start)):
        if t is not None and t.device != q.device:
            raise ShapeError(f"decode_attention: {name} is on {t.device}, q on {q.device}; all must share a device")


def _check_lists(kind: str, indices: torch.Tensor | None, counts: torch.Tensor | None, batch: int, kv_heads: int,
                 width: str) -> None:
    """``<kind>_indices`` (B, Hkv, width) and ``<kind>_counts`` (B, Hkv), int32 or int64, both or neither."""
    if (indices is None) != (counts is None):
        raise ShapeError(f"decode_attention: {kind}_indices and {kind}_counts come together (both or neither)")
    if indices is None:
        return
    integer = (torch.int32, torch.int64)
    if indices.dim() != 3 or indices.shape[:2] != (batch, kv_heads) or indices.dtype not in integer:
        raise ShapeError(f"decode_attention: {kind}_indices must be an int32 (or int64) tensor of shape ({batch}, "
                         f"{kv_heads}, {width}); got {indices.dtype} {tuple(indices.shape)}")
    if counts.shape != (batch, kv_heads) or counts.dtype not in integer:
        raise ShapeError(f"decode_attention: {kind}_counts must be an int32 (or int64) tensor of shape ({batch}, "
                         f"{kv_heads}); got {counts.dtype} {tuple(counts.shape)}")


def decode_attention_reference(q, k, v, kv_lengths, scale, *, key_padding=None, kv_block_indices=None,
                               kv_block_counts=None, block_size=None, block_offsets=None, kv_token_indices=None,
                               kv_token_counts=None, scores_out=None, scores_start=None, scores_skip=(0, 0),
                               length_shift=0, num_splits=None, block_n=None, num_warps=None, num_stages=None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, float32: the function :func:`decode_attention` computes (its launch arguments
    ``num_splits``, ``block_n``, ``num_warps``, ``num_stages`` are accepted and ignored).

    q: (B, Hq, T, D); k: (B, Hkv, L, D); v: (B, Hkv, L, Dv); Hq a multiple of Hkv, query head h reading KV head
    h // (Hq / Hkv). T is 1 (decode), or a chunk of T new tokens, the last T positions in use (a rectification),
    token t seeing the keys below ``kv_lengths[b] - (T - 1 - t)`` (causal), without lists or scores; at most
    MAX_CHUNK_ROWS / (Hq / Hkv) tokens. Row b's length is ``kv_lengths[b] + length_shift`` (clamped to [0, L];
    the shift lets a caller pass a static cache's offset, not launch an add). Row b sees key j when ``j`` is
    below its length, ``key_padding[b, j]`` (if given) and, with block lists, ``(j - block_offsets[b]) //
    block_size`` (offsets 0 when None: row b's blocks start at its offset, a left-padded row's first real
    position) is one of ``kv_block_indices[b, g, :kv_block_counts[b, g]]`` (count clamped to [0, S]; indices
    outside the cache are ignored; positions before the offset are in no block); with token lists, ``j`` is one
    of ``kv_token_indices[b, g, :kv_token_counts[b, g]]`` (positions outside [0, L) ignored; LessIsMore's
    selections). ``scale`` None means 1/sqrt(D). ``scores_out`` (B, Hq, L) float32 or q's dtype (then the
    float32 scores rounded to it), without lists: also written, at every position, with query head h's score
    ``q_h . k_j * scale`` where key j is visible and in the scored window ``[scores_start[b] + scores_skip[0],
    length - scores_skip[1])`` (``scores_start`` (B,) int, None: 0), and -inf everywhere else, past the length
    too (LessIsMore's selection layers: the scores come from the same pass over K as the attention, ready for a
    top-k over the middle region).
    Returns out (B, Hq, T, Dv) in q's dtype and lse (B, Hq, T) float32, natural log; a row that sees no key gets
    out 0 and lse -inf.
    """
    check_decode_inputs(q, k, v, kv_lengths, key_padding, kv_block_indices, kv_block_counts, block_size,
                        block_offsets, kv_token_indices, kv_token_counts, scores_out, scores_start, scores_skip,
                        length_shift)
    batch, q_heads, q_len, dim = q.shape
    kv_heads, length, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    kv_lengths = kv_lengths.long() + length_shift
    keys = torch.arange(length, device=q.device)
    visible = keys[None, :] < kv_lengths.clamp(0, length)[:, None]                        # (B, L)
    if key_padding is not None:
        visible = visible & key_padding.bool()
    visible = visible[:, None].expand(batch, kv_heads, length)                            # (B, Hkv, L)
    if kv_block_indices is not None:
        n_cache_blocks = -(-length // block_size)
        chosen = _listed(kv_block_indices, kv_block_counts, n_cache_blocks)
        offsets = block_offsets.long() if block_offsets is not None else torch.zeros(batch, dtype=torch.long,
                                                                                      device=q.device)
        relative = keys[None, :] - offsets[:, None]                                       # (B, L)
        key_block = relative.clamp(min=0) // block_size
        # Positions before the offset are in no block (not in the rejects' column either, which is set whenever
        # a list has entries past its count).
        in_a_block = (relative >= 0)[:, None] & chosen.gather(2, key_block[:, None].expand(batch, kv_heads, length))
        visible = visible & in_a_block
    if kv_token_indices is not None:
        visible = visible & _listed(kv_token_indices, kv_token_counts, length)[..., :length]
    qf = q.float().reshape(batch, kv_heads, group, q_len, dim)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)[:, :, None]) * scale           # (B, Hkv, G, T, L)
    limit = kv_lengths.clamp(0, length)[:, None] - (q_len - 1 - torch.arange(q_len, device=q.device))  # (B, T)
    causal = keys[None, None, :] < limit[:, :, None]                                      # (B, T, L)
    scores = scores.masked_fill(~(visible[:, :, None, None] & causal[:, None, None]), float("-inf"))
    if scores_out is not None:
        scored_from = (scores_start.long()[:, None] if scores_start is not None else 0) + scores_skip[0]
        scored = (keys >= scored_from) & (keys < kv_lengths.clamp(0, length)[:, None] - scores_skip[1])  # (B, L)
        scores_out.copy_(scores.reshape(batch, q_heads, length).masked_fill(~scored[:, None], float("-inf")))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    # Values no row sees are never read, as in the kernel's masked loads: a preallocated cache may hold anything
    # (NaN too) past the lengths, and 0 x NaN would poison the sum.
    seen = v.float().masked_fill(~visible[..., None], 0.0)
    out = torch.matmul(probs, seen[:, :, None])                                           # (B, Hkv, G, T, Dv)
    return out.reshape(batch, q_heads, q_len, dim_v).to(q.dtype), lse.reshape(batch, q_heads, q_len)


def _listed(indices: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, n + 1) bool: which of n blocks (or tokens) the first ``counts`` entries of ``indices`` name (an
    entry outside [0, n) is ignored; the extra last column takes the rejects)."""
    listed = indices.shape[-1]
    slots = torch.arange(listed, device=indices.device) < counts.clamp(0, listed)[..., None]
    idx = indices.long()
    keep = slots & (idx >= 0) & (idx < n)
    chosen = torch.zeros(*indices.shape[:2], n + 1, dtype=torch.bool, device=indices.device)
    return chosen.scatter_(2, torch.where(keep, idx, n), True)


def decode_attention(q, k, v, kv_lengths, scale, *, key_padding=None, kv_block_indices=None, kv_block_counts=None,
                     block_size=None, block_offsets=None, kv_token_indices=None, kv_token_counts=None,
                     scores_out=None, scores_start=None, scores_skip: tuple[int, int] = (0, 0),
                     length_shift: int = 0,
                     num_splits=None, block_n: int = 64, num_warps: int = 4, num_stages: int = 3
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the split-KV kernels. Same contract as :func:`decode_attention_reference`.

    Takes float16/bfloat16 (and float32, computed in IEEE float32) with D and Dv powers of 2 in [16, 256], on
    CUDA, or on any device under TRITON_INTERPRET=1. k/v may have any strides (a slice of a preallocated cache).
    ``block_n``: keys per tile (a power of 2 >= 16). With block lists of blocks at most half a tile, a tile gathers
    ``block_n // block_size`` listed blocks; otherwise a tile is min(block_n, block_size rounded up to a power of
    2) keys, a block taking several tiles when larger. ``num_splits`` None: :func:`decode_num_splits`.
    ``num_stages`` is lowered to fit shared memory. No host synchronisation: CUDA-graph capturable.
    The listed blocks of a (row, KV head) must be distinct (sorted, as the layouts give them; the kernel itself
    needs no order): a repeated block would count twice here, once in the reference. Token lists likewise: each
    split takes tiles of ``block_n`` listed positions and gathers their K/V rows.
    """
    check_decode_inputs(q, k, v, kv_lengths, key_padding, kv_block_indices, kv_block_counts, block_size,
                        block_offsets, kv_token_indices, kv_token_counts, scores_out, scores_start, scores_skip,
                        length_shift)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"decode_attention: dtype: q, k, v must share float16, bfloat16 or float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    batch, q_heads, _, dim = q.shape
    kv_heads, length, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    for name, size in (("head_dim D", dim), ("value head_dim Dv", dim_v)):
        if size < 16 or size > 256 or size & (size - 1):
            raise ShapeError(f"decode_attention: {name} = {size}; the kernel takes powers of 2 in [16, 256]")
    if block_n < 16 or block_n & (block_n - 1):
        raise ShapeError(f"decode_attention: block_n = {block_n}; must be a power of 2 >= 16")
    if not q.is_cuda and not hardware.interpreting():
        raise ShapeError(f"decode_attention: q is on {q.device}; the Triton kernel needs CUDA tensors (or "
                         f"TRITON_INTERPRET=1). Use decode_attention_reference there")
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    has_blocks, has_tokens = kv_block_indices is not None, kv_token_indices is not None
    blocks_per_tile = 1
    if has_blocks:
        n_cache_blocks = -(-length // block_size)
        if 2 * block_size <= block_n:  # several listed blocks per tile
            tile, blocks_per_tile = block_n, block_n // block_size
        else:
            tile = min(block_n, max(16, triton.next_power_of_2(block_size)))
        n_units = -(-kv_block_indices.shape[-1] // blocks_per_tile)
    elif has_tokens:
        tile = block_n
        n_units = -(-kv_token_indices.shape[-1] // tile)  # tiles of listed tokens
        n_cache_blocks = -(-length // block_n)
    else:
        tile = block_n
        n_units = n_cache_blocks = -(-length // block_n)
    if num_splits is None:
        num_splits = decode_num_splits(batch, kv_heads, n_units,
                                       hardware.multiprocessors(q.device, INTERPRETER_MULTIPROCESSORS))
    elif not isinstance(num_splits, int) or num_splits < 1:
        raise ShapeError(f"decode_attention: num_splits must be a positive int; got {num_splits!r}")
    stages = stages_for_decode(num_stages, tile, dim, dim_v, q.element_size(), hardware.shared_memory(q.device))

    q_len = q.shape[2]
    out = torch.empty((batch, q_heads, q_len, dim_v), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, q_heads, q_len), device=q.device, dtype=torch.float32)
    rows = q_heads * q_len  # the kernels' rows: (query head, token), flattened
    if num_splits == 1:  # the split kernel writes the result itself
        part_out, part_lse = out.view(batch, rows, 1, dim_v), lse.view(batch, rows, 1)
    else:
        part_out = torch.empty((batch, rows, num_splits, dim_v), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((batch, rows, num_splits), device=q.device, dtype=torch.float32)

    if key_padding is not None:
        pad = key_padding.view(torch.uint8) if key_padding.dtype == torch.bool else key_padding
        pad_strides = pad.stride()
    else:
        pad, pad_strides = kv_lengths, (0, 0)  # placeholder: HAS_PADDING=False compiles the loads out
    if has_blocks or has_tokens:
        idx, cnt = (kv_block_indices, kv_block_counts) if has_blocks else (kv_token_indices, kv_token_counts)
        idx_strides, cnt_strides = idx.stride(), cnt.stride()
    else:
        idx = cnt = kv_lengths  # placeholders
        idx_strides, cnt_strides = (0, 0, 0), (0, 0)
    # Without offsets, a placeholder the compiled-out branch never reads.
    offsets, offset_stride = (block_offsets, block_offsets.stride(0)) if block_offsets is not None else (idx, 0)
    scores, score_strides = (scores_out, scores_out.stride()) if scores_out is not None else (part_lse, (0, 0, 0))
    scored_from, scored_from_stride = (scores_start, scores_start.stride(0)) if scores_start is not None else (
        kv_lengths, 0)  # a placeholder HAS_SCORES_START=False never reads

    _decode_split[(num_splits, batch * kv_heads)](
        q, k, v, kv_lengths, pad, idx, cnt, offsets, part_out, part_lse, scores, scored_from,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), kv_lengths.stride(0), offset_stride, scored_from_stride,
        *k.stride(), *v.stride(), *pad_strides, *idx_strides, *cnt_strides,
        *part_out.stride(), *part_lse.stride(), *score_strides,
        kv_heads, group, q_len, length, idx.shape[-1] if has_blocks or has_tokens else 0, n_cache_blocks,
        scale * LOG2E, length_shift, *scores_skip,
        HEAD_DIM=dim, HEAD_DIM_V=dim_v, BLOCK_R=max(16, triton.next_power_of_2(group * q_len)), BLOCK_N=tile,
        BLOCK_SIZE=block_size if has_blocks else tile, BLOCKS_PER_TILE=blocks_per_tile,
        HAS_PADDING=key_padding is not None, HAS_BLOCKS=has_blocks,
        HAS_OFFSETS=block_offsets is not None, HAS_TOKENS=has_tokens, HAS_SCORES=scores_out is not None,
        HAS_SCORES_START=scores_start is not None,
        IEEE=q.dtype == torch.float32, UPCAST=q.dtype == torch.bfloat16 and hardware.interpreting(),
        num_warps=num_warps if group * q_len <= 16 else max(num_warps, 8), num_stages=stages,
    )
    if num_splits > 1:
        flat_out, flat_lse = out.view(batch, rows, dim_v), lse.view(batch, rows)
        _decode_combine[(batch * rows,)](
            part_out, part_lse, flat_out, flat_lse, *part_out.stride(), *part_lse.stride(),
            *flat_out.stride(), *flat_lse.stride(),
            rows, num_splits,
            HEAD_DIM_V=dim_v, BLOCK_S=min(32, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out, lse
