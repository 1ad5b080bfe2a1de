"""Delta Attention's two kernels besides the sparse base: the strided rows (query-sparse, key-dense, causal) and
the correction they feed.

Strided rows: row r sits at key position ``positions[r]`` and sees every key up to it. A GQA group's query heads
are packed into the rows of one tile (``(row, head in group)`` order), so each K/V block a tile loads serves all
the group's heads: K/V are read once per KV head and tile, not once per query head. The tile itself is the
block-sparse kernel's, over :func:`~sparsify.kernels.layout.rows_layout`.

Correction (:class:`~sparsify.kernels.block_sparse_attention.DeltaCorrection` gives the definition): a Triton
elementwise pass here, or fused into the sparse kernel's epilogue (``block_sparse_attention(..., correction=)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_attention import (
    DeltaCorrection,
    KernelConfig,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from .layout import BlockLayout, rows_layout


def packed_rows_layout(positions: torch.Tensor, group: int, kv_len: int, block_m: int, block_n: int) -> BlockLayout:
    """The causal layout of rows at key ``positions`` (int64 ``(R,)``) with a GQA ``group`` of query heads packed
    into consecutive rows (packed row ``r * group + h``): the layout :func:`row_attention` reads. It depends on
    lengths only, so one serves every layer."""
    return rows_layout(positions.repeat_interleave(group), kv_len, block_m, block_n)


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float, *,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """q: (B, Hq, R, D), the selected rows; k, v: (B, Hkv, Lk, D); ``layout`` from :func:`packed_rows_layout`.
    Returns (B, Hq, R, D): each row attends to the keys up to its position. With ``config`` the Triton kernel
    runs (CUDA, or the interpreter), else the PyTorch reference."""
    batch, q_heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    packed = q.reshape(batch, kv_heads, group, rows, dim).transpose(2, 3).reshape(batch, kv_heads, rows * group, dim)
    if config is not None:
        out = block_sparse_attention(packed, k, v, layout, scale, config=config)[0]
    else:
        out = block_sparse_attention_reference(packed, k, v, layout, scale)[0]
    return out.reshape(batch, kv_heads, rows, group, dim).transpose(2, 3).reshape(batch, q_heads, rows, dim)


def delta_correction_reference(sparse_out: torch.Tensor, correction: DeltaCorrection) -> torch.Tensor:
    """PyTorch, float32, returned in ``sparse_out``'s dtype. sparse_out: (B, Hq, N, D)."""
    correction.check(sparse_out)
    length, gamma, strided = sparse_out.shape[2], correction.gamma, correction.n_strided
    row_out = correction.row_out
    delta = row_out[:, :, :strided].float() - sparse_out[:, :, ::gamma].float()
    out = sparse_out.float() + delta.repeat_interleave(gamma, dim=2)[:, :, :length]
    out[:, :, length - correction.tail:] = row_out[:, :, strided:].float()
    return out.to(sparse_out.dtype)


@triton.jit
def _delta_correction(Sparse, RowOut, Out,
                      stride_sb, stride_sh, stride_sm, stride_sd,
                      stride_rb, stride_rh, stride_rm, stride_rd,
                      stride_ob, stride_oh, stride_om, stride_od,
                      heads, length, gamma, n_strided, tail_start,
                      HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // heads, batch_head % heads
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_r[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    s_base = Sparse + batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + offs_d[None, :] * stride_sd
    r_base = RowOut + batch.to(tl.int64) * stride_rb + head.to(tl.int64) * stride_rh + offs_d[None, :] * stride_rd
    group = offs_r // gamma
    sparse = tl.load(s_base + offs_r[:, None].to(tl.int64) * stride_sm, mask=ok, other=0.0).to(tl.float32)
    sparse_first = tl.load(s_base + (group * gamma)[:, None].to(tl.int64) * stride_sm, mask=ok, other=0.0)
    dense_first = tl.load(r_base + group[:, None].to(tl.int64) * stride_rm, mask=ok, other=0.0)
    out = sparse + (dense_first.to(tl.float32) - sparse_first.to(tl.float32))
    in_tail = offs_r >= tail_start
    exact = tl.load(r_base + (n_strided + offs_r - tail_start)[:, None].to(tl.int64) * stride_rm,
                    mask=ok & in_tail[:, None], other=0.0)
    out = tl.where(in_tail[:, None], exact.to(tl.float32), out)
    o_ptrs = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs + offs_r[:, None].to(tl.int64) * stride_om, out.to(Out.dtype.element_ty), mask=ok)


def delta_correction(sparse_out: torch.Tensor, correction: DeltaCorrection, *, block_rows: int = 64) -> torch.Tensor:
    """The correction as one Triton pass (reads O_sparse once, writes O). Same contract as
    :func:`delta_correction_reference`."""
    correction.check(sparse_out)
    batch, heads, length, dim = sparse_out.shape
    out = sparse_out.new_empty(sparse_out.shape)
    grid = (triton.cdiv(length, block_rows), batch * heads)
    _delta_correction[grid](
        sparse_out, correction.row_out, out, *sparse_out.stride(), *correction.row_out.stride(), *out.stride(),
        heads, length, correction.gamma, correction.n_strided, length - correction.tail,
        HEAD_DIM=dim, BLOCK_R=block_rows, BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    return out
