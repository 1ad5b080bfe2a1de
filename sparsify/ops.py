"""The ``torch.ops.sparsify.*`` custom ops every rewritten graph may call, whatever its methods: exact attention
(over a materialised mask, or a described one), the checks and guards around a sparse method, the row shifts of a
left-padded batch. Each method's own ops register from its own module (``sparsify/methods/<method>.py``).

Every op has one registration and a fake kernel so that export and Inductor see shapes; one with a Triton kernel
has two implementations behind it: the kernel on CUDA tensors and a vectorised PyTorch implementation on CPU (also
the tests' reference). Ops are opaque to compilers; they are registered when ``sparsify`` is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ShapeError, SparsifyError
from .kernels import block_sparse_attention as kernel
from .kernels import decode as decode_kernels
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
    if q.is_cuda and q.shape[2] == 1 and attn_mask is None and not is_causal and decode_kernels.supports(q, k, v):
        return decode(q, k, v, None, None, False, scale)  # SDPA has no split-KV path for one query row
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.contiguous()


@dense_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# -- attention as transformers' models ask for it, the mask described rather than materialised --------------------
# ``sparsify.hf`` registers an attention implementation with transformers whose mask function returns the 2-D key
# padding and the query offset instead of a (q_len x kv_len) mask, so that no graph holds an N x N tensor.


def _query_positions(q: Tensor, k: Tensor, query_offset: Tensor | None) -> Tensor:
    """Position of each query row in the cache, int64 (Lq,): ``query_offset + i``, or ``Lk - Lq + i``."""
    start = query_offset.to(torch.int64) if query_offset is not None else k.shape[2] - q.shape[2]
    return torch.arange(q.shape[2], device=q.device, dtype=torch.int64) + start


def visible_keys(q: Tensor, k: Tensor, key_padding: Tensor | None, query_offset: Tensor | None, causal: bool,
                 window: int = 0) -> Tensor:
    """The boolean visibility (B or 1, 1, Lq, Lk) that :func:`attention` describes: key j is seen by query i when
    ``key_padding[b, j]``, if ``causal``, ``j <= position(i)``, and if ``window`` > 0, ``position(i) - j <
    window``. Materialised only where a padded batch or a cache offset needs it (and by the tests, as the
    definition)."""
    keys = torch.arange(k.shape[2], device=q.device)
    visible = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    positions = _query_positions(q, k, query_offset)[:, None]
    if causal:
        visible = visible & (keys[None, :] <= positions)
    if window:
        visible = visible & (positions - keys[None, :] < window)
    if key_padding is not None:
        visible = visible & key_padding[:, None, None, :].to(torch.bool)
    return visible


@torch.library.custom_op("sparsify::prefill_is_plain", mutates_args=())
def prefill_is_plain(q: Tensor, k: Tensor, key_padding: Tensor | None, query_offset: Tensor | None) -> Tensor:
    """Whether a prefill call's mask is the plain causal one over its own Lq keys: the queries start at position 0
    (``query_offset`` 0, or Lk == Lq) and no key among the first Lq is padding. A 0-d bool tensor ON THE CPU: one
    host synchronisation per forward (the node is shared by every layer), after which each layer reads it for free
    (transformers' eager SDPA path makes the same check)."""
    plain = _starts_at_zero(q, k, query_offset)
    if key_padding is not None:
        plain = plain & key_padding[:, : q.shape[2]].all()
    return plain.cpu()  # the one synchronisation


def _starts_at_zero(q: Tensor, k: Tensor, query_offset: Tensor | None) -> Tensor:
    """A 0-d bool on q's device: the queries start at position 0 (``query_offset`` 0, or Lk == Lq)."""
    if query_offset is not None:
        return query_offset == 0
    return torch.full((), k.shape[2] == q.shape[2], dtype=torch.bool, device=q.device)


@torch.library.custom_op("sparsify::left_padding", mutates_args=())
def left_padding(q: Tensor, k: Tensor, key_padding: Tensor | None, query_offset: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
    """Whether a prefill call is a left-padded batch from position 0, and where each row starts.

    Returns ``(starts, left_padded)``: ``starts`` (B,) int64 on q's device, the padded keys before row b's first
    real one; ``left_padded`` a 0-d bool ON THE CPU (one host synchronisation per forward, as
    :func:`prefill_is_plain`): the queries start at position 0 and, over the first Lq keys, row b is ``starts[b]``
    padded keys then only real ones. A plain call is left-padded with every start 0."""
    batch, length = q.shape[0], q.shape[2]
    if key_padding is None:
        starts = torch.zeros(batch, dtype=torch.int64, device=q.device)
        return starts, prefill_is_plain(q, k, None, query_offset)
    padding = key_padding[:, :length].to(torch.bool)
    starts = (~padding).sum(dim=1)
    positions = torch.arange(length, device=q.device)
    ok = (padding == (positions[None, :] >= starts[:, None])).all() & _starts_at_zero(q, k, query_offset)
    return starts, ok.cpu()  # the one synchronisation


@left_padding.register_fake
def _(q, k, key_padding, query_offset):
    return q.new_empty((q.shape[0],), dtype=torch.int64), torch.empty((), dtype=torch.bool, device="cpu")


@torch.library.custom_op("sparsify::shift_rows", mutates_args=())
def shift_rows(x: Tensor, starts: Tensor, toward_start: bool) -> Tensor:
    """Move each batch row of x (B, H, L, D) along L by ``starts[b]`` (B,): toward the start (``out[b, :, i] =
    x[b, :, i + starts[b]]``, so a left-padded row begins at position 0) or back (``out[b, :, i] =
    x[b, :, i - starts[b]]``). Positions with no source are zeros. Returns a new contiguous tensor."""
    batch, heads, length, dim = x.shape
    positions = torch.arange(length, device=x.device)
    source = positions[None, :] + starts[:, None] if toward_start else positions[None, :] - starts[:, None]
    valid = (source >= 0) & (source < length)
    index = source.clamp(0, length - 1)[:, None, :, None].expand(batch, heads, length, dim)
    return x.gather(2, index).masked_fill(~valid[:, None, :, None], 0)


@shift_rows.register_fake
def _(x, starts, toward_start):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@prefill_is_plain.register_fake
def _(q, k, key_padding, query_offset):
    return torch.empty((), dtype=torch.bool, device="cpu")


@torch.library.custom_op("sparsify::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None, query_offset: Tensor | None,
              plain: Tensor | None, causal: bool, scale: float, state: list[Tensor], window: int = 0) -> Tensor:
    """Exact attention with the mask given by its description (what a transformers model means by its mask).

    q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), Hq a multiple of Hkv. Query i sits at position
    ``query_offset + i`` (a 0-d integer tensor: static caches, whose Lk is the cache's capacity) or ``Lk - Lq + i``
    (the keys end with the queries). Key j is visible when ``key_padding[b, j]`` (B, Lk) holds (if given) and, if
    ``causal``, ``j <= position(i)``. ``plain`` is :func:`prefill_is_plain`'s answer, computed here when None.
    ``state``: the layer's sequence state (``sparsify.state``), carried into the captured graph for the methods that
    replace this op; exact attention does not read it. ``window`` > 0: the model's own sliding window (Mistral's
    ``sliding_window``): key j is also seen only when ``position(i) - j < window``.

    Decode (Lq == 1) never synchronises with the host: split-KV flash decoding over the visible prefix on CUDA.
    A plain causal prefill runs SDPA with ``is_causal`` over the first Lq keys (the flash kernel); anything else
    (padding, an offset) runs SDPA with the visibility materialised, as transformers itself does there.
    Returns (B, Hq, Lq, Dv), contiguous.
    """
    check_attention_inputs(q, k, v, "sparsify.attention")
    if key_padding is not None and (key_padding.dim() != 2 or tuple(key_padding.shape) != (q.shape[0], k.shape[2])):
        raise ShapeError(f"sparsify.attention: key_padding must be (B, Lk) = ({q.shape[0]}, {k.shape[2]}); "
                         f"got {tuple(key_padding.shape)}")
    gqa = q.shape[1] != k.shape[1]
    if q.shape[2] == 1:
        if window:  # the window as key padding: O(Lk) values, and the decode kernel reads padding
            key_padding = _within_window(q, k, key_padding, query_offset, window)
        return decode(q, k, v, key_padding, query_offset, causal, scale)
    if causal and not window and q.shape[2] < k.shape[2] and takes_chunk(q, k, v):
        # A few new tokens over a longer cache (a rectification's chunk): one tile row per (token, head) in a
        # split-KV program; a prefill kernel would have too few query blocks to spread the cache over the GPU.
        return decode(q, k, v, key_padding, query_offset, causal, scale)
    if causal and bool(plain if plain is not None else prefill_is_plain(q, k, key_padding, query_offset)):
        length = q.shape[2]
        if window and window < length:
            return _sliding_window_prefill(q, k[:, :, :length], v[:, :, :length], window, scale)
        return F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], is_causal=True, scale=scale,
                                              enable_gqa=gqa).contiguous()
    if not causal and key_padding is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa).contiguous()
    return _attention_over_visible_keys(q, k, v, key_padding, query_offset, causal, scale, window)


def _within_window(q: Tensor, k: Tensor, key_padding: Tensor | None, query_offset: Tensor | None, window: int
                   ) -> Tensor:
    """(B or 1, Lk) bool: the keys a single query row sees under the model's sliding window, and the padding."""
    position = _query_positions(q, k, query_offset)[-1]
    keys = torch.arange(k.shape[2], device=q.device)
    within = (position - keys < window)[None, :]
    return within if key_padding is None else within & key_padding.to(torch.bool)


def _sliding_window_prefill(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> Tensor:
    """Exact causal attention under a sliding window (Lq == Lk): the block-sparse kernel over the window's blocks
    (its CPU reference elsewhere), O(N x window) instead of a materialised N x N mask."""
    config = kernel.KernelConfig()
    layout = layouts.sink_window_layout(q.shape[2], k.shape[2], 0, window, config.block_m, config.block_n,
                                        device=q.device)
    if q.is_cuda:
        return kernel.block_sparse_attention(q, k, v, layout, scale, config=config)[0]
    return kernel.block_sparse_attention_reference(q, k, v, layout, scale)[0].contiguous()


def _attention_over_visible_keys(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None,
                                 query_offset: Tensor | None, causal: bool, scale: float, window: int = 0) -> Tensor:
    """SDPA with :func:`visible_keys` materialised: the exact answer wherever no faster path applies."""
    mask = visible_keys(q, k, key_padding, query_offset, causal, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).contiguous()


@attention.register_fake
def _(q, k, v, key_padding, query_offset, plain, causal, scale, state, window=0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def lengths_and_shift(q: Tensor, k: Tensor, query_offset: Tensor | None) -> tuple[Tensor, int]:
    """The positions in use after this call's tokens (:func:`~sparsify.methods.resa.lengths_in_use`) as
    ``(lengths (B,), shift)`` whose sum they are, for the decode kernels, which add the shift themselves:
    ``query_offset`` (expanded, not copied) and ``q_len`` with a static cache, so that no kernel is launched per
    layer to add them; the keys' length and 0 otherwise."""
    if query_offset is not None:
        return query_offset.expand(q.shape[0]), q.shape[2]
    return torch.full((q.shape[0],), k.shape[2], dtype=torch.int64, device=q.device), 0


def takes_chunk(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`decode` runs Lq new tokens per row on the split-KV kernel: CUDA, head sizes and dtype the
    kernel takes, and one token, or Lq x (Hq / Hkv) rows within one program's tile."""
    rows = q.shape[2] * (q.shape[1] // k.shape[1])
    return (q.is_cuda and decode_kernels.supports(q, k, v)
            and (q.shape[2] == 1 or rows <= decode_kernels.MAX_CHUNK_ROWS))


def decode(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None, query_offset: Tensor | None, causal: bool,
           scale: float) -> Tensor:
    """The last Lq positions of each sequence (one new token, or a short chunk) over the keys before and at each
    position, without a host sync. The Triton split-KV kernel on CUDA (each KV head's K/V read once for all its
    query heads and tokens) where :func:`takes_chunk` (several tokens: causal only, the kernel's mask), SDPA with
    the visibility materialised elsewhere."""
    if takes_chunk(q, k, v) and (causal or q.shape[2] == 1):
        lengths, shift = lengths_and_shift(q, k, query_offset if causal else None)
        return decode_kernels.decode_attention(q, k, v, lengths, scale, key_padding=key_padding,
                                               length_shift=shift)[0]
    return _attention_over_visible_keys(q, k, v, key_padding, query_offset, causal, scale)


@torch.library.custom_op("sparsify::prefill_guard", mutates_args=("out", "fallbacks"))
def prefill_guard(out: Tensor, plain: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None,
                  query_offset: Tensor | None, causal: bool, scale: float, fallbacks: Tensor, window: int = 0) -> None:
    """A sparse method computed ``out`` over the first Lq keys as a plain causal prefill; where :func:`prefill_is_plain`
    says the call was not plain (a padded batch, a cache that was not empty), overwrite it with exact attention under
    the described mask and count the call in ``fallbacks`` (a 0-d int64 CPU tensor, read by ``explain``).
    ``plain`` is a CPU tensor: no synchronisation here."""
    if not bool(plain):
        out.copy_(attention(q, k, v, key_padding, query_offset, plain, causal, scale, [], window))
        fallbacks.add_(1)


@torch.library.custom_op("sparsify::mask_is_causal", mutates_args=())
def mask_is_causal(mask: Tensor) -> Tensor:
    """Whether a mask (..., Lq, Lk), boolean (True: attend) or additive (0: attend, -inf or the dtype's minimum:
    not), is exactly the causal mask aligned to the last key (every batch and head alike). A 0-d bool tensor."""
    rows, cols = mask.shape[-2], mask.shape[-1]
    causal = torch.ones(rows, cols, dtype=torch.bool, device=mask.device).tril(cols - rows)
    if mask.dtype == torch.bool:
        return (mask == causal).all()
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return ((mask == 0) == causal).all() & ((mask == 0) | blocked).all()


@mask_is_causal.register_fake
def _(mask):
    return mask.new_empty((), dtype=torch.bool)


@torch.library.custom_op("sparsify::causal_mask_guard", mutates_args=("out", "fallbacks"))
def causal_mask_guard(out: Tensor, is_causal: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor,
                      scale: float, fallbacks: Tensor) -> None:
    """Keep ``out`` (a method's output computed as if the mask were causal) when ``is_causal``; else overwrite it
    with dense attention under the mask itself, so a padded or custom mask never gets a causal method's answer, and
    count the call in ``fallbacks`` (0-d int64, CPU). Reads ``is_causal`` on the host (one sync per call)."""
    if not bool(is_causal):
        out.copy_(dense_attention(q, k, v, attn_mask, False, scale))
        fallbacks.add_(1)


# -- inference only -------------------------------------------------------------------------------------------------


def _no_backward(ctx, *grads):
    raise SparsifyError(
        "sparsify's attention ops compute inference only (they have no backward): run the compiled model under "
        "torch.no_grad() or torch.inference_mode(); to train, train the original model (sparsify.compile returns a "
        "copy that shares its weights)")


def inference_only(*ops) -> None:
    """Give each custom op a backward that says sparsify computes inference only (instead of autograd's generic
    "no autograd formula" error)."""
    for op in ops:
        op.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


inference_only(dense_attention, attention)
