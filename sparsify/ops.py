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
