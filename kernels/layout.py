"""Block layouts: which key blocks each query block visits, in FlexAttention's compressed form.

A :class:`BlockLayout` over queries cut into blocks of ``block_m`` and keys into blocks of ``block_n`` holds, per
(batch, head, query block), two sorted index lists:

* ``full_kv_indices[b, h, m, :full_kv_num_blocks[b, h, m]]`` — key blocks whose every token is visible to every
  query of the block (the kernel skips masking);
* ``kv_indices[b, h, m, :kv_num_blocks[b, h, m]]`` — partial key blocks, where the layout's :class:`TokenMask`
  decides each (query, key) pair (the causal diagonal, a window's edge, the sequence tail).

Index tensors are int32 of shape ``(B', H', n_q_blocks)`` and ``(B', H', n_q_blocks, W)``, with B' in {1, B},
H' in {1, Hq} (size 1 broadcasts) and W at least the largest count (``n_kv_blocks`` from the rule builders, the
candidate count from block top-k); entries past the count are unused. A block is never in both lists.
Builders work on block-level tensors, never on an N x N token mask (``to_dense_mask`` does, for tests only).

Positions: with ``q_len < kv_len`` the queries are the last ``q_len`` positions (bottom-right alignment, as with
a KV cache): query row i sits at position ``i + kv_len - q_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparsify.errors import ShapeError


@dataclass(frozen=True)
class TokenMask:
    """Token-level rule applied inside partial blocks (and guaranteed by the builders for full blocks).

    Key j is visible to the query at position p when: ``j < kv_len``; if ``causal``, ``j <= p``; if ``window`` > 0,
    ``p - j < window`` or ``j < sink``; if ``limit`` > 0, ``p - j < limit`` (a hard window, sink or not: the model's
    own sliding window, e.g. Mistral's, intersected with a method's pattern).
    """

    causal: bool = True
    sink: int = 0
    window: int = 0
    limit: int = 0

    def __post_init__(self):
        if self.sink < 0 or self.window < 0 or self.limit < 0:
            raise ShapeError(f"TokenMask: sink, window and limit must be >= 0, got sink={self.sink}, "
                             f"window={self.window}, limit={self.limit}")
        if (self.window or self.limit) and not self.causal:
            raise ShapeError("TokenMask: a window or limit needs causal=True (it counts back from the query)")

    def visible(self, positions: torch.Tensor, keys: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Broadcasting predicate over query positions and key indices."""
        ok = keys < kv_len
        if self.causal:
            ok = ok & (keys <= positions)
        if self.window:
            ok = ok & ((positions - keys < self.window) | (keys < self.sink))
        if self.limit:
            ok = ok & (positions - keys < self.limit)
        return ok


@dataclass(frozen=True)
class BlockLayout:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    mask: TokenMask
    # Position of each query row (int64, (q_len,)) when the rows are not the last q_len positions (Delta's
    # strided rows); None for the usual bottom-right alignment.
    q_positions: torch.Tensor | None = field(default=None, compare=False)

    @property
    def n_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_m)

    @property
    def n_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_n)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    def positions(self, device=None) -> torch.Tensor:
        """The position of every query row, ``(q_len,)``."""
        if self.q_positions is not None:
            return self.q_positions.to(device or self.q_positions.device)
        return torch.arange(self.q_len, device=device) + self.offset

    def density(self) -> float:
        """Visited key blocks over all key blocks of a dense (non-causal) pass."""
        visited = (self.kv_num_blocks + self.full_kv_num_blocks).float().mean().item()
        return visited / self.n_kv_blocks

    def block_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial) bool tensors of shape ``(B', H', n_q_blocks, n_kv_blocks)``."""
        return (_expand_indices(self.full_kv_num_blocks, self.full_kv_indices, self.n_kv_blocks),
                _expand_indices(self.kv_num_blocks, self.kv_indices, self.n_kv_blocks))

    def to_dense_mask(self) -> torch.Tensor:
        """Token-level bool mask ``(B', H', q_len, kv_len)``. O(N^2) memory: tests and small N only."""
        full, partial = self.block_masks()
        device = full.device
        rows = torch.arange(self.q_len, device=device)
        keys = torch.arange(self.kv_len, device=device)
        row_block, key_block = rows // self.block_m, keys // self.block_n
        full_tokens = full[..., row_block, :][..., key_block]
        partial_tokens = partial[..., row_block, :][..., key_block]
        rule = self.mask.visible(self.positions(device)[:, None], keys[None, :], self.kv_len)
        return full_tokens | (partial_tokens & rule)

    def __repr__(self) -> str:
        shape = tuple(self.kv_num_blocks.shape)
        return (f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, blocks={self.block_m}x{self.block_n}, "
                f"grid={shape}, mask={self.mask}, density={self.density():.3f})")

    # -- conversions ------------------------------------------------------------------------------------------
    def to_block_mask(self):
        """A FlexAttention ``BlockMask`` with the same blocks and token rule (for comparisons)."""
        from torch.nn.attention.flex_attention import BlockMask

        if self.q_positions is not None:
            raise ShapeError("to_block_mask: FlexAttention has no per-row query positions")
        mask, offset, kv_len = self.mask, self.offset, self.kv_len

        def mask_mod(b, h, q_idx, kv_idx):
            return mask.visible(q_idx + offset, kv_idx, kv_len)

        return BlockMask.from_kv_blocks(
            self.kv_num_blocks, _full_width(self.kv_num_blocks, self.kv_indices, self.n_kv_blocks),
            self.full_kv_num_blocks, _full_width(self.full_kv_num_blocks, self.full_kv_indices, self.n_kv_blocks),
            BLOCK_SIZE=(self.block_m, self.block_n), mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len),
        )

    @classmethod
    def from_block_mask(cls, block_mask, mask: TokenMask) -> "BlockLayout":
        """From a FlexAttention ``BlockMask``; its ``mask_mod`` is opaque, so give the equivalent ``mask``."""
        q_len, kv_len = block_mask.seq_lengths
        block_m, block_n = block_mask.BLOCK_SIZE
        full_num = block_mask.full_kv_num_blocks
        full_idx = block_mask.full_kv_indices
        if full_num is None:
            full_num = torch.zeros_like(block_mask.kv_num_blocks)
            full_idx = torch.zeros_like(block_mask.kv_indices)
        return cls(block_mask.kv_num_blocks.int(), block_mask.kv_indices.int(), full_num.int(), full_idx.int(),
                   block_m, block_n, q_len, kv_len, mask)

    # -- set algebra ------------------------------------------------------------------------------------------
    def union(self, other: "BlockLayout") -> "BlockLayout":
        full_a, part_a = self.block_masks()
        full_b, part_b = other.block_masks()
        self._check_compatible(other)
        full = full_a | full_b
        return from_block_masks(full, (part_a | part_b) & ~full, self._geometry())

    def intersection(self, other: "BlockLayout") -> "BlockLayout":
        full_a, part_a = self.block_masks()
        full_b, part_b = other.block_masks()
        self._check_compatible(other)
        full = full_a & full_b
        return from_block_masks(full, ((full_a | part_a) & (full_b | part_b)) & ~full, self._geometry())

    def _check_compatible(self, other: "BlockLayout") -> None:
        mine, theirs = self._geometry(), other._geometry()
        if mine != theirs:
            raise ShapeError(f"layouts differ in geometry or token mask: {mine} vs {theirs}")

    def _geometry(self) -> "Geometry":
        return Geometry(self.q_len, self.kv_len, self.block_m, self.block_n, self.mask)


@dataclass(frozen=True)
class Geometry:
    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    mask: TokenMask

    def __post_init__(self):
        for name in ("q_len", "kv_len", "block_m", "block_n"):
            if getattr(self, name) <= 0:
                raise ShapeError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.q_len > self.kv_len:
            raise ShapeError(f"q_len ({self.q_len}) > kv_len ({self.kv_len}): queries are the last q_len positions")

    def block_bounds(self, device) -> tuple[torch.Tensor, ...]:
        """Per query block the first and last query position, per key block the first and last key index.

        Query blocks are clipped to q_len and key blocks to kv_len, so tails are handled exactly."""
        n_q, n_kv = _cdiv(self.q_len, self.block_m), _cdiv(self.kv_len, self.block_n)
        q_first = torch.arange(n_q, device=device) * self.block_m
        q_last = torch.clamp(q_first + self.block_m - 1, max=self.q_len - 1)
        k_first = torch.arange(n_kv, device=device) * self.block_n
        k_last = torch.clamp(k_first + self.block_n - 1, max=self.kv_len - 1)
        offset = self.kv_len - self.q_len
        return (q_first + offset)[:, None], (q_last + offset)[:, None], k_first[None, :], k_last[None, :]

    def rule_blocks(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(any visible, all visible) per (query block, key block) under the token mask, shape (n_q, n_kv)."""
        return _rule_blocks(*self.block_bounds(device), self.mask, self.kv_len, self.block_n)


def _rule_blocks(p0, p1, k0, k1, mask: TokenMask, kv_len: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any visible, all visible) for query blocks spanning positions [p0, p1] and key blocks [k0, k1]."""
    tail = ((k0 + block_n) > kv_len)  # a partial last key block always needs masking
    if mask.causal:
        any_visible, all_visible = k0 <= p1, k1 <= p0
    else:
        any_visible = torch.ones_like(k0 <= p1)
        all_visible = any_visible.clone()
    if mask.window:
        # Some pair within the window: the nearest pair is (p0, k1), or distance 0 where the blocks overlap.
        near = (k0 < mask.sink) | (torch.clamp(p0 - k1, min=0) < mask.window)
        # Every pair within the window or in the sink: the farthest pair is (p1, k0).
        far = (k1 < mask.sink) | (p1 - k0 < mask.window)
        any_visible, all_visible = any_visible & near, all_visible & far
    if mask.limit:  # the same nearest and farthest pairs, with no sink exception
        any_visible = any_visible & (torch.clamp(p0 - k1, min=0) < mask.limit)
        all_visible = all_visible & (p1 - k0 < mask.limit)
    return any_visible, all_visible & ~tail


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _full_width(counts: torch.Tensor, indices: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """Index lists padded to ``n_kv_blocks`` columns with 0 past each count (FlexAttention's own form)."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    indices = torch.where(valid, indices, 0)
    return torch.nn.functional.pad(indices, (0, n_kv_blocks - indices.shape[-1]))


def _expand_indices(counts: torch.Tensor, indices: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    dense = torch.zeros((*counts.shape, n_kv_blocks + 1), dtype=torch.bool, device=counts.device)
    dense.scatter_(-1, torch.where(valid, indices.long(), n_kv_blocks), True)
    return dense[..., :n_kv_blocks]


def compress(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(..., n_kv)`` -> (counts int32 ``(...)``, sorted indices int32 ``(..., n_kv)``)."""
    counts = selected.sum(-1, dtype=torch.int32)
    # Stable sort puts selected blocks first, in ascending order.
    indices = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts, indices


def compress_candidates(candidates: torch.Tensor, valid: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate block indices ``(..., k)`` with a validity mask -> (counts, valid indices sorted first).

    Entries past a row's count hold ``n_kv`` and are never read."""
    keyed = torch.where(valid, candidates, n_kv)
    return valid.sum(-1, dtype=torch.int32), keyed.sort(-1).values.to(torch.int32)


def from_block_masks(full: torch.Tensor, partial: torch.Tensor, geometry: Geometry) -> BlockLayout:
    """Build a layout from block-level masks ``(B', H', n_q, n_kv)``; ``partial`` must exclude ``full``."""
    if full.dim() != 4 or partial.shape != full.shape:
        raise ShapeError(f"block masks must be 4-D and alike, got {tuple(full.shape)} and {tuple(partial.shape)}")
    full_num, full_idx = compress(full)
    part_num, part_idx = compress(partial & ~full)
    return BlockLayout(part_num, part_idx, full_num, full_idx, geometry.block_m, geometry.block_n,
                       geometry.q_len, geometry.kv_len, geometry.mask)


def _from_rule(geometry: Geometry, selected: torch.Tensor | None, device) -> BlockLayout:
    """Layout of the token rule, optionally restricted to ``selected`` blocks ``(B', H', n_q, n_kv)``."""
    any_visible, all_visible = geometry.rule_blocks(device)
    any_visible, all_visible = any_visible[None, None], all_visible[None, None]
    if selected is not None:
        any_visible, all_visible = any_visible & selected, all_visible & selected
    return from_block_masks(all_visible, any_visible & ~all_visible, geometry)


def causal_layout(q_len: int, kv_len: int, block_m: int, block_n: int, device="cpu") -> BlockLayout:
    return _from_rule(Geometry(q_len, kv_len, block_m, block_n, TokenMask(causal=True)), None, device)


def dense_layout(q_len: int, kv_len: int, block_m: int, block_n: int, device="cpu") -> BlockLayout:
    """Every key visible to every query (bidirectional)."""
    return _from_rule(Geometry(q_len, kv_len, block_m, block_n, TokenMask(causal=False)), None, device)


def sink_window_layout(q_len: int, kv_len: int, sink: int, window: int, block_m: int, block_n: int, *,
                       limit: int = 0, device="cpu") -> BlockLayout:
    """StreamingLLM: query p sees key j <= p when ``j < sink`` or ``p - j < window``, and ``p - j < limit`` if
    ``limit`` > 0 (the model's own sliding window). Token-exact."""
    if window <= 0:
        raise ShapeError(f"window must be > 0, got {window}")
    return _from_rule(Geometry(q_len, kv_len, block_m, block_n, TokenMask(True, sink, window, limit)), None, device)


def rows_layout(positions: torch.Tensor, kv_len: int, block_m: int, block_n: int) -> BlockLayout:
    """Causal layout for query rows at the given key positions (any order), e.g. Delta's every gamma-th row
    plus its exact tail: row r sees keys j <= positions[r]. ``positions``: int64 ``(R,)``, each < kv_len."""
    rows = positions.numel()
    message = f"rows_layout: positions must be non-empty and within [0, {kv_len})"
    if rows == 0:
        raise ShapeError(message)
    in_range = ((positions >= 0) & (positions < kv_len)).all()
    if positions.is_cuda:
        torch._assert_async(in_range, message)  # checked on the device: a host check would sync every call
    elif not in_range:
        raise ShapeError(message)
    n_q, n_kv = _cdiv(rows, block_m), _cdiv(kv_len, block_n)
    padded = torch.nn.functional.pad(positions, (0, n_q * block_m - rows), value=-1).view(n_q, block_m)
    p1 = padded.amax(1)[:, None]
    p0 = torch.where(padded < 0, kv_len, padded).amin(1)[:, None]
    k0 = (torch.arange(n_kv, device=positions.device) * block_n)[None, :]
    k1 = torch.clamp(k0 + block_n - 1, max=kv_len - 1)
    mask = TokenMask(causal=True)
    any_visible, all_visible = _rule_blocks(p0, p1, k0, k1, mask, kv_len, block_n)
    full, partial = all_visible[None, None], (any_visible & ~all_visible)[None, None]
    full_num, full_idx = compress(full)
    part_num, part_idx = compress(partial)
    return BlockLayout(part_num, part_idx, full_num, full_idx, block_m, block_n, rows, kv_len, mask,
                       q_positions=positions)


def strided_layout(q_len: int, kv_len: int, stride: int, block_m: int, block_n: int, *, local_blocks: int = 1,
                   device="cpu") -> BlockLayout:
    """Dilated blocks, causal: each query block sees the key blocks its own positions span, the
    ``local_blocks - 1`` key blocks before them, and every ``stride``-th key block before that (counted back from
    the key block of its first position)."""
    if stride <= 0 or local_blocks <= 0:
        raise ShapeError(f"stride and local_blocks must be > 0, got {stride} and {local_blocks}")
    geometry = Geometry(q_len, kv_len, block_m, block_n, TokenMask(causal=True))
    p0, _, k0, _ = geometry.block_bounds(device)
    distance = p0 // block_n - k0 // block_n  # negative for key blocks inside the query block's own span
    selected = (distance < local_blocks) | (distance % stride == 0)
    return _from_rule(geometry, selected[None, None], device)


def block_topk_layout(q: torch.Tensor, k: torch.Tensor, *, density: float, block_m: int, block_n: int,
                      sink_blocks: int = 1, causal: bool = True, min_blocks: int = 1,
                      lengths: torch.Tensor | None = None) -> BlockLayout:
    """Dynamic block sparsity (MInference / FlexPrefill style), per query head.

    q: (B, Hq, q_len, D), k: (B, Hkv, kv_len, D). Mean-pooled query blocks score mean-pooled key blocks
    (GQA: a query head scores its KV head's blocks); each query block keeps its top ``ceil(density * n_kv)``
    visible key blocks (at least ``min_blocks``), and on top of those its diagonal block and the first
    ``sink_blocks``.

    ``lengths`` (B,) int64, causal with q_len == kv_len only: row b holds ``lengths[b]`` real tokens from position
    0 and zeros after them (a left-padded row shifted to start at 0). Its blocks are then the ones it would get
    alone: pooled over its own tokens, its own diagonal, and a budget from its own number of key blocks. No host
    synchronisation either way.
    """
    if not 0.0 < density <= 1.0:
        raise ShapeError(f"density must be in (0, 1], got {density}")
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if lengths is not None and not (causal and q_len == kv_len):
        raise ShapeError(f"block_topk_layout: lengths need a causal call with q_len == kv_len, got causal={causal}, "
                         f"q_len {q_len}, kv_len {kv_len}")
    geometry = Geometry(q_len, kv_len, block_m, block_n, TokenMask(causal=causal))
    q_pool = _mean_pool(q, block_m, lengths).float()                          # (B, Hq, n_q, D)
    k_pool = _mean_pool(k, block_n, lengths).float()                          # (B, Hkv, n_kv, D)
    group = q_heads // kv_heads
    scores = torch.matmul(q_pool.view(batch, kv_heads, group, -1, dim), k_pool[:, :, None].transpose(-1, -2))
    scores = scores.view(batch, q_heads, q_pool.shape[2], k_pool.shape[2])
    any_visible, all_visible = geometry.rule_blocks(q.device)                 # (n_q, n_kv)
    _, p1, k0, _ = geometry.block_bounds(q.device)
    last_query = p1
    if lengths is not None:
        rows = lengths.view(batch, 1, 1, 1)
        any_visible = any_visible & (k0 < rows)                               # (B, 1, n_q, n_kv)
        last_query = torch.minimum(p1, rows - 1)
    forced = (k0 // block_n < sink_blocks) | (k0 // block_n == last_query // block_n)
    scores = scores.masked_fill(~any_visible, float("-inf")).masked_fill(forced & any_visible, float("inf"))
    n_kv = scores.shape[-1]
    candidates = topk_candidates(n_kv, density, sink_blocks, min_blocks)
    top = scores.topk(candidates, dim=-1).indices                             # (B, Hq, n_q, candidates)
    shape = (*top.shape[:-1], n_kv)
    visible = any_visible.expand(shape).gather(-1, top)
    if lengths is not None:
        # A row's own budget: the first candidates that it alone would have taken (topk sorts them).
        row_blocks = (lengths + block_n - 1) // block_n
        row_keep = torch.clamp(torch.ceil(density * row_blocks.double()).long(), min=min_blocks)
        row_candidates = torch.minimum(row_blocks, row_keep + sink_blocks + 1)
        visible = visible & (torch.arange(candidates, device=q.device) < row_candidates.view(batch, 1, 1, 1))
    full = visible & all_visible.expand(shape).gather(-1, top)
    # Compress the k candidates, not whole rows: sorting k indices per row instead of n_kv is most of the
    # builder's time at long lengths.
    full_num, full_idx = compress_candidates(top, full, n_kv)
    part_num, part_idx = compress_candidates(top, visible & ~full, n_kv)
    return BlockLayout(part_num, part_idx, full_num, full_idx, block_m, block_n, q_len, kv_len, geometry.mask)


def topk_candidates(n_kv, density: float, sink_blocks: int, min_blocks: int = 1):
    """How many key blocks :func:`block_topk_layout` takes per query block (its index tensors' last dimension):
    the ``ceil(density * n_kv)`` best (at least ``min_blocks``) with room on top for the forced ones (the sink
    blocks and the diagonal), at most ``n_kv``. ``n_kv`` may be symbolic (the op's fake kernel)."""
    keep = torch.sym_max(min_blocks, math.ceil(density * n_kv))
    return torch.sym_min(n_kv, keep + sink_blocks + 1)


def _mean_pool(x: torch.Tensor, block: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D): mean over each block (the tail block over its own rows; with
    ``lengths`` (B,), row b's blocks over its first ``lengths[b]`` positions, the zeros after them not counted)."""
    batch, heads, length, dim = x.shape
    n_blocks = _cdiv(length, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n_blocks * block - length))
    sums = padded.view(batch, heads, n_blocks, block, dim).sum(3, dtype=torch.float32)
    starts = torch.arange(n_blocks, device=x.device) * block
    if lengths is None:
        counts = torch.clamp(length - starts, max=block).to(torch.float32)
        return sums / counts[:, None]
    counts = torch.clamp(lengths[:, None] - starts[None, :], min=1, max=block).to(torch.float32)  # (B, n_blocks)
    return sums / counts[:, None, :, None]
