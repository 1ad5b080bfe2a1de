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
    kv_heads, n_blocks, local_blocks,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK blocks (``program_id(0)``) of one (batch, KV head) (``program_id(1)``): their bounds, -inf past the
    row's blocks in use, +inf for its last ``local_blocks`` in use."""
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // kv_heads).to(tl.int64)
    head = (batch_head % kv_heads).to(tl.int64)
    offs_n = chunk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    exists = offs_n < n_blocks
    query = tl.load(Query + batch * stride_qb + head * stride_qh + offs_d * stride_qd).to(tl.float32)
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
    if query.shape != (batch, kv_heads, dim):
        raise ShapeError(f"block_bounds: query must be (B, Hkv, D) = ({batch}, {kv_heads}, {dim}); got "
                         f"{tuple(query.shape)}")
    if in_use.shape != (batch,) or in_use.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"block_bounds: in_use must be an int32 or int64 tensor of shape ({batch},); got "
                         f"{in_use.dtype} {tuple(in_use.shape)}")
    for name, t in (("kmin", kmin), ("kmax", kmax), ("in_use", in_use)):
        if t.device != query.device:
            raise ShapeError(f"block_bounds: {name} is on {t.device}, query on {query.device}; all must share a "
                             "device")


def block_bounds_reference(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, in_use: torch.Tensor,
                           local_blocks: int) -> torch.Tensor:
    """(B, Hkv, n_blocks) float32: ``sum_d max(q_d kmin_d, q_d kmax_d)`` per block, in float32.

    query: (B, Hkv, D) (the selection query of each KV head, already scaled); kmin, kmax: (B, Hkv, n_blocks, D);
    in_use: (B,) the blocks row b has in use. Blocks from ``in_use[b]`` on score -inf; the last ``local_blocks``
    in use score +inf (always kept)."""
    _check(query, kmin, kmax, in_use)
    query = query.float()[:, :, None]
    bound = torch.maximum(query * kmin.float(), query * kmax.float()).sum(-1)
    j = torch.arange(kmin.shape[2], device=kmin.device)[None, :]
    used = j < in_use[:, None]
    local = used & (j >= in_use[:, None] - local_blocks)
    return bound.masked_fill(~used[:, None], float("-inf")).masked_fill(local[:, None], float("inf"))


def block_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, in_use: torch.Tensor,
                 local_blocks: int) -> torch.Tensor:
    """Launch the kernel. Same contract as :func:`block_bounds_reference`; D a power of 2 in [16, 256], any float
    dtype of the summaries, any strides. No host synchronisation: CUDA-graph capturable."""
    _check(query, kmin, kmax, in_use)
    batch, kv_heads, n_blocks, dim = kmin.shape
    if not supports(dim):
        raise ShapeError(f"block_bounds: head_dim D = {dim}; the kernel takes powers of 2 in [16, 256]")
    if not kmin.is_cuda and not hardware.interpreting():
        raise ShapeError(f"block_bounds: the summaries are on {kmin.device}; the Triton kernel needs CUDA tensors "
                         "(or TRITON_INTERPRET=1). Use block_bounds_reference there")
    scores = torch.empty((batch, kv_heads, n_blocks), device=kmin.device, dtype=torch.float32)
    block = min(BLOCKS_PER_PROGRAM, triton.next_power_of_2(max(1, n_blocks)))
    _block_bounds[(triton.cdiv(n_blocks, block), batch * kv_heads)](
        query, kmin, kmax, in_use, scores, *query.stride(), *kmin.stride(), *kmax.stride(), in_use.stride(0),
        *scores.stride(), kv_heads, n_blocks, local_blocks, HEAD_DIM=dim, BLOCK=block, num_warps=4)
    return scores
