"""The ``torch.ops.sparsify.*`` custom ops that rewritten graphs call.

Every op has one registration with two implementations behind it: the Triton kernel on CUDA tensors and a
vectorised PyTorch implementation on CPU (also the tests' reference), plus a fake kernel so that export and
Inductor see shapes. Ops are opaque to compilers; they are registered when ``sparsify`` is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ShapeError
from .kernels import block_sparse_attention as kernel
from .kernels import layout as layouts


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, op: str) -> None:
    """q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); Hq a multiple of Hkv; one dtype and device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"{op}: q, k, v must be 4-D (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or q.shape[0] != k.shape[0] or v.shape[0] != q.shape[0]:
        raise ShapeError(f"{op}: k and v must share batch, heads and length with each other and batch with q; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"{op}: q and k head_dim differ ({q.shape[-1]} vs {k.shape[-1]})")
    if q.shape[1] % k.shape[1]:
        raise ShapeError(f"{op}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"{op}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


@torch.library.custom_op("sparsify::dense_attention", mutates_args=())
def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float
) -> Tensor:
    """Dense attention with SDPA's semantics (causal is top-left aligned, as SDPA's ``is_causal``).

    q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, Dv) with Hq a multiple of Hkv (GQA without copies).
    Returns (B, Hq, Lq, Dv), contiguous.
    """
    check_attention_inputs(q, k, v, "sparsify.dense_attention")
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.contiguous()


@dense_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# -- block-sparse attention and the layouts it reads --------------------------------------------------------------
# A layout travels between ops as its four index tensors (counts and indices, partial then full); block sizes and
# the token mask travel as plain arguments.


@torch.library.custom_op("sparsify::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor,
    kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
    block_m: int, block_n: int, causal: bool, sink: int, window: int, scale: float, num_warps: int, num_stages: int,
    use_tma: bool,
) -> tuple[Tensor, Tensor]:
    """Attention over the key blocks of a layout. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D).

    Returns out (B, Hq, Lq, D) and lse (B, Hq, Lq) float32. Triton on CUDA, the PyTorch reference elsewhere.
    """
    check_attention_inputs(q, k, v, "sparsify.block_sparse_attention")
    layout = layouts.BlockLayout(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n,
                                 q.shape[2], k.shape[2], layouts.TokenMask(causal, sink, window))
    if q.is_cuda:
        config = kernel.KernelConfig(block_m, block_n, num_warps, num_stages, use_tma)
        return kernel.block_sparse_attention(q, k, v, layout, scale, config=config)
    return kernel.block_sparse_attention_reference(q, k, v, layout, scale)


@block_sparse_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_m, block_n, causal, sink,
      window, scale, num_warps, num_stages, use_tma):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _layout_tensors(layout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices


def _fake_layout(heads_grid: tuple, q: Tensor, k: Tensor, block_m: int, block_n: int):
    n_q, n_kv = -(-q.shape[2] // block_m), -(-k.shape[2] // block_n)
    counts = q.new_empty((*heads_grid, n_q), dtype=torch.int32)
    indices = q.new_empty((*heads_grid, n_q, n_kv), dtype=torch.int32)
    return counts, indices, counts.clone(), indices.clone()


@torch.library.custom_op("sparsify::sink_window_layout", mutates_args=())
def sink_window_layout(q: Tensor, k: Tensor, sink: int, window: int, block_m: int, block_n: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sink + sliding-window layout for q's and k's lengths (on their device), shared by all heads."""
    return _layout_tensors(layouts.sink_window_layout(q.shape[2], k.shape[2], sink, window, block_m, block_n,
                                                      device=q.device))


@sink_window_layout.register_fake
def _(q, k, sink, window, block_m, block_n):
    return _fake_layout((1, 1), q, k, block_m, block_n)


@torch.library.custom_op("sparsify::block_topk_layout", mutates_args=())
def block_topk_layout(q: Tensor, k: Tensor, density: float, block_m: int, block_n: int, sink_blocks: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query head, the top ``density`` share of key blocks by pooled scores (plus diagonal and sink blocks)."""
    return _layout_tensors(layouts.block_topk_layout(q, k, density=density, block_m=block_m, block_n=block_n,
                                                     sink_blocks=sink_blocks))


@block_topk_layout.register_fake
def _(q, k, density, block_m, block_n, sink_blocks):
    return _fake_layout((q.shape[0], q.shape[1]), q, k, block_m, block_n)


# -- Delta Attention: strided dense rows and the correction -------------------------------------------------------


def delta_tail(length: int, gamma: int, tail: int) -> int:
    """Rows at the end made exact: ``tail`` if given (>= 0), else ``length % gamma + max(128, gamma)``; at most
    ``length``."""
    rows = tail if tail >= 0 else length % gamma + max(128, gamma)
    return min(length, rows) if isinstance(rows, int) and isinstance(length, int) else torch.sym_min(length, rows)


@torch.library.custom_op("sparsify::delta_rows", mutates_args=())
def delta_rows(q: Tensor, gamma: int, tail: int) -> Tensor:
    """Query rows Delta computes densely, int64: every ``gamma``-th row (``i % gamma == 0``), then the tail rows."""
    length = q.shape[2]
    strided = torch.arange(0, length, gamma, device=q.device)
    exact = torch.arange(length - delta_tail(length, gamma, tail), length, device=q.device)
    return torch.cat([strided, exact])


@delta_rows.register_fake
def _(q, gamma, tail):
    length = q.shape[2]
    return q.new_empty(((length + gamma - 1) // gamma + delta_tail(length, gamma, tail),), dtype=torch.int64)


@torch.library.custom_op("sparsify::row_attention", mutates_args=())
def row_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float, block_m: int, block_n: int,
                  num_warps: int, num_stages: int, use_tma: bool) -> Tensor:
    """Query-sparse, key-dense causal attention: the query rows ``rows`` (positions ``rows + kv_len - q_len``),
    each over every key up to its own position. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) -> (B, Hq, R, D)."""
    check_attention_inputs(q, k, v, "sparsify.row_attention")
    positions = rows + (k.shape[2] - q.shape[2])
    layout = layouts.rows_layout(positions, k.shape[2], block_m, block_n)
    selected = q[:, :, rows].contiguous()
    if q.is_cuda:
        config = kernel.KernelConfig(block_m, block_n, num_warps, num_stages, use_tma)
        return kernel.block_sparse_attention(selected, k, v, layout, scale, config=config)[0]
    return kernel.block_sparse_attention_reference(selected, k, v, layout, scale)[0]


@row_attention.register_fake
def _(q, k, v, rows, scale, block_m, block_n, num_warps, num_stages, use_tma):
    return q.new_empty((q.shape[0], q.shape[1], rows.shape[0], v.shape[-1]))


@torch.library.custom_op("sparsify::delta_correction", mutates_args=())
def delta_correction(sparse_out: Tensor, row_out: Tensor, gamma: int, tail: int) -> Tensor:
    """Delta's correction: ``O[j] = O_sparse[j] + (O_dense[i] - O_sparse[i])`` with ``i = j - j % gamma``, then
    the tail rows replaced by their exact values. ``row_out`` holds the rows of :func:`delta_rows` in order.
    Computed in float32, returned in ``sparse_out``'s dtype."""
    length = sparse_out.shape[2]
    strided = (length + gamma - 1) // gamma
    delta = row_out[:, :, :strided].float() - sparse_out[:, :, ::gamma].float()
    out = sparse_out.float() + delta.repeat_interleave(gamma, dim=2)[:, :, :length]
    exact = delta_tail(length, gamma, tail)
    out[:, :, length - exact:] = row_out[:, :, strided:].float()
    return out.to(sparse_out.dtype)


@delta_correction.register_fake
def _(sparse_out, row_out, gamma, tail):
    return torch.empty_like(sparse_out)
