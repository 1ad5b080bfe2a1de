"""Block-sparse flash attention (forward), prefill and bidirectional.

FlashAttention-2 style: one program per (query block, batch x query head); it walks the key blocks its layout
lists — full blocks first, without masking (by arithmetic when they form one contiguous run), then partial
blocks under the layout's token mask — with an online softmax, and writes the output and the log-sum-exp.
GQA reads the KV head ``h // group`` in place (no copies). Rows that see no key get output 0 and lse -inf.
On Hopper and newer, K/V tiles come through TMA tensor descriptors; elsewhere (and under the interpreter)
through pointers.

``block_sparse_attention`` launches it (CUDA tensors); ``block_sparse_attention_reference`` computes the same
function in plain PyTorch (any device) and is what the tests and the CPU path use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsify.errors import ShapeError

from . import hardware
from .layout import BlockLayout

LOG2E = 1.4426950408889634


def fits_epilogue(gamma: int, block_m: int) -> bool:
    """Whether Delta's correction can run in a tile's epilogue: every group of ``gamma`` rows must start inside
    one tile of ``block_m`` rows (``gamma`` a power of 2 dividing ``block_m``)."""
    return gamma & (gamma - 1) == 0 and block_m % gamma == 0


@dataclass(frozen=True)
class DeltaCorrection:
    """Delta Attention's correction, applied to a sparse output O_sparse (B, Hq, N, D):
    ``O[j] = O_sparse[j] + row_out[i // gamma] - O_sparse[i]`` with ``i = j - j % gamma``, and the last ``tail``
    rows replaced by ``row_out[n_strided:]``. ``row_out``: (B, Hq, n_strided + tail, D), the exact rows
    ``0, gamma, 2 gamma, ...`` (``n_strided = ceil(N / gamma)`` of them) then the tail rows."""

    row_out: torch.Tensor
    gamma: int
    tail: int

    @property
    def n_strided(self) -> int:
        return self.row_out.shape[2] - self.tail

    def check(self, sparse_out: torch.Tensor, block_m: int | None = None) -> None:
        """``sparse_out`` is O_sparse or the q it comes from; ``block_m``: the tile rows of a fused epilogue."""
        batch, heads, length, dim = sparse_out.shape
        expected = (batch, heads, -(-length // self.gamma) + self.tail, dim)
        if self.gamma < 1 or not 0 <= self.tail <= length or tuple(self.row_out.shape) != expected:
            raise ShapeError(f"delta correction: gamma must be >= 1 and tail in [0, {length}]; row_out must be "
                             f"{expected}; got gamma={self.gamma}, tail={self.tail}, row_out "
                             f"{tuple(self.row_out.shape)}")
        if block_m is not None and not fits_epilogue(self.gamma, block_m):
            raise ShapeError(f"delta correction in the epilogue: gamma ({self.gamma}) must be a power of 2 that "
                             f"divides block_m ({block_m}); use the separate correction otherwise")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; ``block_m``/``block_n`` must equal the layout's block sizes. ``use_tma`` loads K/V
    through Hopper's tensor-memory accelerator where hardware and strides allow (else through pointers)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False


@triton.jit
def _load_kv(k_ptrs, v_ptrs, k_desc, v_desc, batch, kv_head, kv_block, offs_n, offs_d, kv_len, stride_kn,
             stride_vn, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """K as (BLOCK_D, BLOCK_N) and V as (BLOCK_N, BLOCK_D). Pointer loads mask only where needed: the tail of a
    partial block, and head_dim padding (HEAD_DIM not a power of 2). TMA fills rows past kv_len with zeros."""
    if USE_TMA:
        k = k_desc.load([batch, kv_head, kv_block * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D).T
        v = v_desc.load([batch, kv_head, kv_block * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k_addr = k_ptrs + offs_n[None, :].to(tl.int64) * stride_kn
        v_addr = v_ptrs + offs_n[:, None].to(tl.int64) * stride_vn
        if MASKED:
            in_range = offs_n < kv_len
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_addr, mask=in_range[None, :], other=0.0)
                v = tl.load(v_addr, mask=in_range[:, None], other=0.0)
            else:
                k = tl.load(k_addr, mask=in_range[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
                v = tl.load(v_addr, mask=in_range[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_addr)
                v = tl.load(v_addr)
            else:
                k = tl.load(k_addr, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_addr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return k, v


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, k_desc, v_desc, batch, kv_head, kv_block, offs_m_pos,
                  offs_n_base, offs_d, kv_len, qk_scale, sink, window, limit, stride_kn, stride_vn,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LIMIT: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                  USE_TMA: tl.constexpr):
    offs_n = kv_block * BLOCK_N + offs_n_base
    k, v = _load_kv(k_ptrs, v_ptrs, k_desc, v_desc, batch, kv_head, kv_block, offs_n, offs_d, kv_len, stride_kn,
                    stride_vn, MASKED, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    if IEEE:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    if MASKED:
        visible = offs_n[None, :] < kv_len
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (((offs_m_pos[:, None] - offs_n[None, :]) < window) | (offs_n[None, :] < sink))
        if HAS_LIMIT:
            visible = visible & ((offs_m_pos[:, None] - offs_n[None, :]) < limit)
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 then, so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
    else:
        # Unmasked blocks give every row a finite maximum: the scale folds into one multiply-subtract.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _delta_epilogue(out, ROW_OUT, batch, head, block_m, offs_m, offs_d, stride_rb, stride_rh, stride_rm, stride_rd,
                    n_strided, tail_start, q_len, GAMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    """Delta's correction on a finished tile: each run of GAMMA rows starts at a strided row i (BLOCK_M is a
    multiple of GAMMA), and gets ``O_dense[i] - O_sparse[i]`` added, O_sparse[i] being the tile's own row;
    rows from ``tail_start`` on take their exact values. ROW_OUT: (B, Hq, n_strided + tail, D), strided rows
    first."""
    GROUPS: tl.constexpr = BLOCK_M // GAMMA
    grouped = tl.reshape(out, (GROUPS, GAMMA, BLOCK_D))
    first_of_group = (tl.arange(0, GAMMA) == 0)[None, :, None]
    sparse_first = tl.sum(tl.where(first_of_group, grouped, 0.0), axis=1)
    strided = block_m * GROUPS + tl.arange(0, GROUPS)
    row_base = ROW_OUT + batch.to(tl.int64) * stride_rb + head.to(tl.int64) * stride_rh
    d_ok = offs_d[None, :] < HEAD_DIM
    dense_first = tl.load(row_base + strided[:, None].to(tl.int64) * stride_rm + offs_d[None, :] * stride_rd,
                          mask=(strided[:, None] < n_strided) & d_ok, other=0.0).to(tl.float32)
    out = tl.reshape(grouped + (dense_first - sparse_first)[:, None, :], (BLOCK_M, BLOCK_D))
    in_tail = (offs_m >= tail_start) & (offs_m < q_len)
    exact_row = n_strided + offs_m - tail_start
    exact = tl.load(row_base + exact_row[:, None].to(tl.int64) * stride_rm + offs_d[None, :] * stride_rd,
                    mask=in_tail[:, None] & d_ok, other=0.0)
    return tl.where(in_tail[:, None], exact.to(tl.float32), out)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, K_DESC, V_DESC, Out, Lse, Q_POS,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im,
    q_heads, group, q_len, kv_len, qk_scale, sink, window, limit,
    ROW_OUT, stride_rb, stride_rh, stride_rm, stride_rd, n_strided, tail_start,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LIMIT: tl.constexpr, IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
    HAS_Q_POS: tl.constexpr, GAMMA: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // q_heads
    head = batch_head % q_heads
    kv_head = head // group

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_base = tl.arange(0, BLOCK_N)
    if HAS_Q_POS:  # rows at given positions (Delta's strided rows), else the last q_len positions
        offs_m_pos = tl.load(Q_POS + offs_m, mask=offs_m < q_len, other=0)
    else:
        offs_m_pos = offs_m + (kv_len - q_len)

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_ptrs = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_ptrs = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    row = batch * stride_nb + head * stride_nh + block_m * stride_nm
    index_row = batch.to(tl.int64) * stride_ib + head.to(tl.int64) * stride_ih + block_m.to(tl.int64) * stride_im
    # Full blocks, sorted: a head of sink blocks (none without a sink), then one contiguous run in causal and
    # sliding-window layouts. The head is walked by index and the run by arithmetic: reading every index from
    # memory puts a dependent load before each K/V load (it cost ~18% on an H100). When the rest is not one run
    # (block top-k), the head takes every block. Both loops sit at top level: loops nested in a data-dependent
    # `if` pipelined worse (measured).
    n_full = tl.load(FULL_NUM + row)
    n_head = tl.minimum((sink + BLOCK_N - 1) // BLOCK_N, n_full)
    run_first = tl.load(FULL_IDX + index_row + n_head, mask=n_head < n_full, other=0)
    last = tl.load(FULL_IDX + index_row + n_full - 1, mask=n_full > 0, other=-1)
    n_head = tl.where(last - run_first + 1 == n_full - n_head, n_head, n_full)
    for i in range(0, n_head):
        kv_block = tl.load(FULL_IDX + index_row + i)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, K_DESC, V_DESC, batch, kv_head, kv_block,
                                      offs_m_pos, offs_n_base, offs_d, kv_len, qk_scale, sink, window, limit,
                                      stride_kn, stride_vn, False, CAUSAL, HAS_WINDOW, HAS_LIMIT, BLOCK_N, HEAD_DIM,
                                      BLOCK_D, IEEE, USE_TMA)
    for i in range(n_head, n_full):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, K_DESC, V_DESC, batch, kv_head,
                                      run_first + (i - n_head), offs_m_pos, offs_n_base, offs_d, kv_len, qk_scale,
                                      sink, window, limit, stride_kn, stride_vn, False, CAUSAL, HAS_WINDOW,
                                      HAS_LIMIT, BLOCK_N, HEAD_DIM, BLOCK_D, IEEE, USE_TMA)
    n_partial = tl.load(KV_NUM + row)
    for i in range(0, n_partial):
        kv_block = tl.load(KV_IDX + index_row + i)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, K_DESC, V_DESC, batch, kv_head, kv_block,
                                      offs_m_pos, offs_n_base, offs_d, kv_len, qk_scale, sink, window, limit,
                                      stride_kn, stride_vn, True, CAUSAL, HAS_WINDOW, HAS_LIMIT, BLOCK_N, HEAD_DIM,
                                      BLOCK_D, IEEE, USE_TMA)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if GAMMA > 0:
        out = _delta_epilogue(out, ROW_OUT, batch, head, block_m, offs_m, offs_d, stride_rb, stride_rh, stride_rm,
                              stride_rd, n_strided, tail_start, q_len, GAMMA, BLOCK_M, BLOCK_D, HEAD_DIM)
    # lse in natural log: m and l are in base 2 (scores were scaled by log2(e)).
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_m < q_len
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + batch * stride_lb + head * stride_lh + offs_m * stride_lm, lse, mask=row_ok)


def check_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, q_heads, q_len, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != dim:
        raise ShapeError(f"k and v must be (B, Hkv, kv_len, D) alike, with q's B and D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q_heads % k.shape[1]:
        raise ShapeError(f"query heads ({q_heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if (layout.q_len, layout.kv_len) != (q_len, k.shape[2]):
        raise ShapeError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}; inputs have "
                         f"q_len={q_len}, kv_len={k.shape[2]}")
    if layout.kv_indices.shape != layout.full_kv_indices.shape or \
            layout.kv_num_blocks.shape != layout.full_kv_num_blocks.shape:
        # The kernel walks both lists with one set of strides.
        raise ShapeError(f"layout: the partial and full lists must have one shape; got counts "
                         f"{tuple(layout.kv_num_blocks.shape)} and {tuple(layout.full_kv_num_blocks.shape)}, indices "
                         f"{tuple(layout.kv_indices.shape)} and {tuple(layout.full_kv_indices.shape)}")
    lb, lh = layout.kv_num_blocks.shape[:2]
    if lb not in (1, batch) or lh not in (1, q_heads) or layout.kv_num_blocks.shape[2] != layout.n_q_blocks:
        raise ShapeError(f"layout grid {tuple(layout.kv_num_blocks.shape)} does not fit batch {batch}, "
                         f"{q_heads} query heads, {layout.n_q_blocks} query blocks (sizes 1 broadcast)")


def block_sparse_attention_reference(q, k, v, layout: BlockLayout, scale: float | None = None, *,
                                     chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the same function as the kernel, computed in float32, ``chunk`` query rows at a time.

    Each chunk reads only the key blocks that some head of some row in it visits, so its cost follows the layout's
    density as the kernel's does (on the CPU this is the op's path, which the cost model prices as sparse; on a GPU
    it checks the kernel).
    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D). Returns out (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq) float32.
    """
    check_layout(q, k, v, layout)
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    full, partial = layout.block_masks()
    positions = layout.positions(q.device)
    keys = torch.arange(layout.kv_len, device=q.device)
    key_block = keys // layout.block_n
    qf, kf, vf = q.float(), k.float(), v.float()
    outs, lses = [], []
    for start in range(0, q_len, chunk):
        rows = torch.arange(start, min(start + chunk, q_len), device=q.device)
        row_blocks = torch.unique(rows // layout.block_m)
        chunk_full, chunk_partial = full[..., row_blocks, :], partial[..., row_blocks, :]
        read = (chunk_full | chunk_partial).flatten(0, -2).any(0)                  # (n_kv_blocks,)
        sel = torch.nonzero(read[key_block]).flatten()                           # the keys read, ascending
        local = torch.searchsorted(row_blocks, rows // layout.block_m)           # row -> index in row_blocks
        blocks = key_block[sel]
        visible = chunk_full[..., local, :][..., blocks] | (
            chunk_partial[..., local, :][..., blocks]
            & layout.mask.visible(positions[rows][:, None], keys[sel][None, :], layout.kv_len))
        visible = visible.expand(batch, q_heads, -1, -1)                          # (B, Hq, rows, keys read)
        if sel.numel() == 0:  # no row of the chunk sees a key
            outs.append(qf.new_zeros(batch, q_heads, len(rows), v.shape[-1]))
            lses.append(qf.new_full((batch, q_heads, len(rows)), float("-inf")))
            continue
        out, lse = _attend(qf[:, :, start:start + len(rows)], kf[:, :, sel].repeat_interleave(group, 1),
                           vf[:, :, sel].repeat_interleave(group, 1), visible, scale)
        empty = ~visible.any(-1)                                                  # rows that see no key
        outs.append(out.masked_fill(empty[..., None], 0.0))
        lses.append(lse.masked_fill(empty, float("-inf")))
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention and its log-sum-exp, float32, q: (B, H, R, D), k/v: (B, H, K, D), visible (B, H, R, K).
    On the CPU PyTorch's fused attention (it returns the log-sum-exp too, and has no CUDA kernel); elsewhere
    plain matmuls. Rows without a visible key come out undefined: the caller sets them."""
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, float("-inf"))
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs, v), lse


def _tma_usable(k: torch.Tensor, v: torch.Tensor, dim: int) -> bool:
    """TMA copies need Hopper or newer, 16-byte aligned strides, a power-of-2 head_dim and 2-byte elements."""
    if not (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    aligned = all(s * k.element_size() % 16 == 0 for t in (k, v) for s in t.stride()[:-1])
    return (aligned and k.stride(-1) == 1 and v.stride(-1) == 1 and dim == triton.next_power_of_2(dim)
            and k.element_size() == 2)


def stages_that_fit(config: KernelConfig, block_d: int, element_size: int, shared_memory_bytes: int | None) -> int:
    """``config.num_stages``, lowered until the pipelined K and V tiles (``stages * 2 * block_n * block_d``
    elements) fit ``shared_memory_bytes`` (:func:`hardware.stages_that_fit`)."""
    return hardware.stages_that_fit(
        config.num_stages, 2 * config.block_n * block_d * element_size, shared_memory_bytes,
        f"config: {config.block_m}x{config.block_n} tiles with head_dim {block_d} in {element_size}-byte elements")


def block_sparse_attention(q, k, v, layout: BlockLayout, scale: float | None = None, *,
                           config: KernelConfig | None = None, correction: DeltaCorrection | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel. Same contract as :func:`block_sparse_attention_reference`.

    Takes float16/bfloat16 (and float32, computed in IEEE float32) on CUDA, or anything under TRITON_INTERPRET=1.
    With ``correction``, the output rows get Delta's correction in the epilogue (the lse stays the sparse one).
    """
    check_layout(q, k, v, layout)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"dtype: q, k, v must share float16, bfloat16 or float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, q_heads, q_len, dim = q.shape
    config = config or KernelConfig(layout.block_m, layout.block_n)
    if (config.block_m, config.block_n) != (layout.block_m, layout.block_n):
        raise ShapeError(f"config blocks {config.block_m}x{config.block_n} differ from the layout's "
                         f"{layout.block_m}x{layout.block_n}")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(dim))
    num_stages = stages_that_fit(config, block_d, q.element_size(), hardware.shared_memory(q.device))
    out = q.new_empty(q.shape)  # contiguous whatever q's strides: the ops' fake kernels promise it
    lse = torch.empty((batch, q_heads, q_len), device=q.device, dtype=torch.float32)
    grid = (layout.n_q_blocks, batch * q_heads)
    n, idx, fn, fidx = layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices
    if fn.stride() != n.stride() or fidx.stride() != idx.stride():
        fn, fidx, n, idx = fn.contiguous(), fidx.contiguous(), n.contiguous(), idx.contiguous()

    def broadcast_stride(t, dim_):
        return 0 if t.shape[dim_] == 1 else t.stride(dim_)

    use_tma = config.use_tma and _tma_usable(k, v, dim)
    if use_tma:
        block = [1, 1, config.block_n, dim]
        k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), block)
        v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), block)
    else:
        k_desc = v_desc = k  # placeholders: the kernel reads K/V through pointers then
    q_positions = layout.q_positions.to(device=q.device, dtype=torch.int32) if layout.q_positions is not None else q
    if correction is not None:
        correction.check(q, config.block_m)
        row_out, row_strides = correction.row_out, correction.row_out.stride()
    else:
        row_out, row_strides = q, (0, 0, 0, 0)  # placeholders: GAMMA=0 compiles the epilogue out
    _block_sparse_fwd[grid](
        q, k, v, k_desc, v_desc, out, lse, q_positions, n, idx, fn, fidx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        broadcast_stride(n, 0), broadcast_stride(n, 1), n.stride(2),
        broadcast_stride(idx, 0), broadcast_stride(idx, 1), idx.stride(2),
        q_heads, q_heads // k.shape[1], q_len, k.shape[2], scale * LOG2E,
        layout.mask.sink, layout.mask.window, layout.mask.limit,
        row_out, *row_strides, correction.n_strided if correction else 0,
        q_len - correction.tail if correction else q_len,
        GAMMA=correction.gamma if correction else 0,
        HEAD_DIM=dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
        CAUSAL=layout.mask.causal, HAS_WINDOW=layout.mask.window > 0, HAS_LIMIT=layout.mask.limit > 0,
        IEEE=q.dtype == torch.float32, USE_TMA=use_tma,
        HAS_Q_POS=layout.q_positions is not None,
        num_warps=config.num_warps, num_stages=num_stages,
    )
    return out, lse
