"""Context parallelism for prefill: a prompt split by position over the ranks of a process group, each rank holding
the q, k, v of its own contiguous slice, and computing the causal attention of its queries over the whole
sequence's keys.

Two ways, both over ``torch.distributed`` point-to-point ops (``batch_isend_irecv``: gloo on the CPU, NCCL on GPUs):

- :func:`ring_attention`, dense: every rank's K/V goes round the ring (R - 1 steps, each rank sending what it holds
  to the next and receiving from the previous, the next transfer in flight while a piece is computed); a rank attends
  to the pieces from ranks before it in full, to its own causally, and skips the ones after it. Each rank receives
  every other rank's K/V: ``(R - 1) / R`` of the sequence's.
- :func:`layout_attention`, layout-aware: given a block-sparse :class:`~sparsify.kernels.layout.BlockLayout` of the
  whole sequence, :func:`plan_kv_fetch` works out which key blocks of which rank the queries of each rank visit; each
  rank then receives exactly those, straight from the ranks that hold them (for a sink + window layout: the sink
  blocks from rank 0 and the window's blocks from the previous rank, whatever the length), never the whole ring.

Both compute each piece (a contiguous run of keys from one rank) with sparsify's block-sparse attention, the Triton
kernel on CUDA tensors and its PyTorch reference elsewhere, over the piece's slice of the layout, and merge the
pieces by their log-sum-exp in float32. Both return the bytes of K/V the rank received, for benchmarks.

Why not torch's ``torch.distributed.tensor.experimental.context_parallel`` (torch 2.13, read in
``torch/distributed/tensor/experimental/_context_parallel/_attention.py``):

- Its SDPA path dispatches ``F.scaled_dot_product_attention`` on DTensors to a ring only for the CUDA flash,
  memory-efficient and cuDNN ops (``_sdpa_handler``: anything else, the CPU flash op included, raises
  NotImplementedError), takes ``is_causal`` and no mask, and moves every rank's K/V (the default rotate method
  all-gathers them once; the other is a ring of all-to-alls): a block-sparse layout cannot be expressed, let alone
  cut communication. Its default load balancing also reorders the sequence (head-tail), so a rank's slice is not
  contiguous, which a window layout needs to know its neighbours.
- Its FlexAttention path (``_ContextParallel``, ``_create_cp_block_mask``) does take a ``BlockMask``, but its input
  hook all-gathers the whole K and V before ``flex_attention`` runs (``flex_cp_allgather``): the layout cuts the
  compute and not one byte of the communication, and it needs the sequence a multiple of ranks x 128.

Fetching only the visited blocks is the point of the layout-aware version, so both are built here on plain
point-to-point ops, which also run on gloo, where the tests run.

Whole models: :func:`context_parallel_prefill` runs a transformers Llama/Qwen2 over the split prompt with every
layer's attention one of the above; :func:`context_parallel_generate` then decodes greedily with the KV cache left
split as the prompt was, each new token's attention merged from every rank's partial attention over its keys.

Invariants: the sequence is split by :class:`SequenceSplit` into contiguous slices, rank r holding positions
``[split.start(r), split.end(r))``; q: (B, Hq, L_r, D), k and v: (B, Hkv, L_r, D) with Hq a multiple of Hkv; every
rank of the group calls the function with the same split (and plan), in the same order as its other collectives.
Inference only (no backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .errors import PolicyError, ShapeError, SparsifyError
from .kernels import block_sparse_attention as kernel
from .kernels import decode as decode_kernels
from .kernels.layout import BlockLayout, compress, rows_layout, sink_window_layout
from .methods.base import METHODS, MethodSpec
from .ops import check_attention_inputs


@dataclass(frozen=True)
class SequenceSplit:
    """A sequence of ``sum(lengths)`` tokens split by position over ``len(lengths)`` ranks: rank r holds the
    contiguous positions ``[start(r), end(r))``, ``lengths[r] > 0`` of them. The same on every rank."""

    lengths: tuple[int, ...]

    def __post_init__(self):
        if not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths):
            raise ShapeError(f"lengths: {self.lengths}; allowed: one positive token count per rank")

    @classmethod
    def even(cls, seq_len: int, ranks: int, multiple: int = 1) -> SequenceSplit:
        """``seq_len`` tokens over ``ranks`` ranks as evenly as boundaries at multiples of ``multiple`` allow
        (:func:`plan_kv_fetch` needs them at multiples of its layout's blocks): every rank but the last holds a
        multiple of ``multiple`` tokens, the last the rest (an odd length's tail)."""
        if ranks <= 0 or multiple <= 0:
            raise ShapeError(f"ranks: {ranks}, multiple: {multiple}; allowed: both > 0")
        if seq_len <= (ranks - 1) * multiple:
            raise ShapeError(f"seq_len: {seq_len} cannot give each of {ranks} ranks a token with boundaries at "
                             f"multiples of {multiple}; allowed: seq_len > {(ranks - 1) * multiple}")
        base, extra = divmod(seq_len // multiple, ranks)
        lengths = [(base + (r < extra)) * multiple for r in range(ranks - 1)]
        return cls(tuple(lengths + [seq_len - sum(lengths)]))

    @property
    def ranks(self) -> int:
        return len(self.lengths)

    @property
    def seq_len(self) -> int:
        return sum(self.lengths)

    def start(self, rank: int) -> int:
        return sum(self.lengths[:rank])

    def end(self, rank: int) -> int:
        return self.start(rank) + self.lengths[rank]


@dataclass(frozen=True)
class ContextParallelOutput:
    """One rank's result: ``out`` (B, Hq, L_r, D) in q's dtype and ``lse`` (B, Hq, L_r) float32 (natural log) for
    its own queries over the whole sequence's keys; ``kv_bytes_received``: the bytes of K and V this rank received
    from other ranks for it."""

    out: Tensor
    lse: Tensor
    kv_bytes_received: int


# -- dense: the ring ------------------------------------------------------------------------------------------------


def ring_attention(q: Tensor, k: Tensor, v: Tensor, split: SequenceSplit, *, group: dist.ProcessGroup | None = None,
                   scale: float | None = None, block_m: int = 128, block_n: int = 64) -> ContextParallelOutput:
    """Exact causal attention of this rank's queries over the whole sequence, every rank's K/V passed round the
    ring of ``group`` (default: the world). Any split (no block alignment needed); ``block_m``/``block_n``: the
    kernel's tiles. Each rank receives every other rank's K and V once."""
    rank = _check_inputs(q, k, v, split, group, "ring_attention")
    ranks = split.ranks

    def shape(source: int) -> tuple[int, ...]:
        return k.shape[0], k.shape[1], split.lengths[source], k.shape[3]

    held = torch.cat([k.reshape(-1), v.reshape(-1)])  # the K/V of rank (rank - step) % ranks at step `step`
    acc_out, acc_lse = _empty_accumulator(q)
    received = 0
    for step in range(ranks):
        source = (rank - step) % ranks
        pending = None
        if step < ranks - 1:  # pass what this rank holds on while it computes with it
            incoming = held.new_empty(2 * math.prod(shape((source - 1) % ranks)))
            pending = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, held, group=group, group_peer=(rank + 1) % ranks),
                dist.P2POp(dist.irecv, incoming, group=group, group_peer=(rank - 1) % ranks),
            ])
        if source <= rank:  # later ranks' keys are all in this rank's future
            keys = math.prod(shape(source))
            piece_k, piece_v = held[:keys].view(shape(source)), held[keys:].view(shape(source))
            # Positions relative to the piece's first key; an earlier rank's keys are all visible, as if every
            # query sat at the piece's last key.
            length = split.lengths[source]
            positions = (torch.arange(length, device=q.device) if source == rank
                         else torch.full((q.shape[2],), length - 1, device=q.device))
            piece = rows_layout(positions, length, block_m, block_n)
            acc_out, acc_lse = _merge(acc_out, acc_lse, *_attend(q, piece_k, piece_v, piece, scale))
        if pending is not None:
            for work in pending:
                work.wait()
            held = incoming
            received += incoming.numel() * incoming.element_size()
    return ContextParallelOutput(acc_out.to(q.dtype), acc_lse, received)


# -- layout-aware: fetch only the visited key blocks ---------------------------------------------------------------


@dataclass(frozen=True)
class KVFetchPlan:
    """Which key blocks of ``layout`` (the whole sequence's, ``layout.q_len == layout.kv_len == split.seq_len``)
    each rank's queries visit, by the rank that holds them: ``runs[dst][src]`` is a tuple of ``(first_block,
    end_block)`` runs of consecutive key blocks (ascending, ``end_block`` exclusive) inside rank ``src``'s slice that
    some query block of rank ``dst``'s slice visits (for some batch row or head of the layout). ``runs[r][r]`` are
    computed in place; every other run is sent by ``src`` to ``dst``. Built by :func:`plan_kv_fetch`, the same on
    every rank; one plan serves every layer that shares the layout."""

    layout: BlockLayout
    split: SequenceSplit
    runs: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
    # piece_layout's results, built on first use and then shared by every layer.
    _pieces: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def keys(self, dst: int, src: int) -> tuple[tuple[int, int], ...]:
        """The key positions ``[first, end)`` of each run of ``runs[dst][src]``."""
        end = self.split.end(src)
        return tuple((first * self.layout.block_n, min(last * self.layout.block_n, end))
                     for first, last in self.runs[dst][src])

    def tokens_received(self, rank: int) -> int:
        """Key tokens (positions) ``rank`` receives from other ranks."""
        return sum(end - first for src in range(self.split.ranks) if src != rank
                   for first, end in self.keys(rank, src))

    def blocks_received(self, rank: int) -> int:
        """Key blocks ``rank`` receives from other ranks."""
        return sum(last - first for src in range(self.split.ranks) if src != rank
                   for first, last in self.runs[rank][src])

    @cached_property
    def _block_masks(self) -> tuple[Tensor, Tensor]:
        return self.layout.block_masks()

    def piece_layout(self, dst: int, src: int, run: int) -> BlockLayout:
        """The layout of rank ``dst``'s queries over the keys of ``runs[dst][src][run]`` alone, keys indexed from
        the run's first: the global layout's blocks, and its token rule shifted by the run's first key (query
        positions and the sink move with the keys; causality, window and limit count differences, which the shift
        keeps)."""
        if (dst, src, run) in self._pieces:
            return self._pieces[dst, src, run]
        layout = self.layout
        first_block, end_block = self.runs[dst][src][run]
        first_key, end_key = self.keys(dst, src)[run]
        q_first, q_end = self.split.start(dst), self.split.end(dst)
        query_blocks = slice(q_first // layout.block_m, -(-q_end // layout.block_m))
        full, partial = (mask[..., query_blocks, first_block:end_block] for mask in self._block_masks)
        full_num, full_idx = compress(full)
        part_num, part_idx = compress(partial)
        positions = torch.arange(q_first, q_end, device=full.device) - first_key
        piece = BlockLayout(part_num, part_idx, full_num, full_idx, layout.block_m, layout.block_n, q_end - q_first,
                            end_key - first_key, replace(layout.mask, sink=max(layout.mask.sink - first_key, 0)),
                            q_positions=positions)
        self._pieces[dst, src, run] = piece
        return piece


def plan_kv_fetch(layout: BlockLayout, split: SequenceSplit) -> KVFetchPlan:
    """The :class:`KVFetchPlan` of ``layout`` over ``split``: per pair of ranks, the runs of key blocks of the
    source's slice that the destination's query blocks visit. Needs a prefill layout of the whole sequence
    (``q_len == kv_len == split.seq_len``, queries at positions ``0..N-1``) and every boundary between ranks at a
    multiple of the layout's ``block_m`` and ``block_n`` (a query or key block split over two ranks would have two
    owners): ``SequenceSplit.even(seq_len, ranks, multiple=math.lcm(block_m, block_n))`` gives one. The layout
    lies on the device of the q/k/v it will serve."""
    if not (layout.q_len == layout.kv_len == split.seq_len) or layout.q_positions is not None:
        raise ShapeError(f"layout: q_len {layout.q_len}, kv_len {layout.kv_len}, q_positions "
                         f"{'given' if layout.q_positions is not None else 'None'}; allowed: a prefill layout of the "
                         f"whole split sequence, q_len == kv_len == {split.seq_len} with q_positions None")
    multiple = math.lcm(layout.block_m, layout.block_n)
    for rank in range(1, split.ranks):
        if split.start(rank) % multiple:
            raise ShapeError(f"split: rank {rank} starts at position {split.start(rank)}; allowed: boundaries at "
                             f"multiples of {multiple} (the layout's {layout.block_m}-query and {layout.block_n}-key "
                             f"blocks), e.g. SequenceSplit.even({split.seq_len}, {split.ranks}, multiple={multiple})")
    full, partial = layout.block_masks()
    visited = (full | partial).flatten(0, 1).any(0)  # (n_q_blocks, n_kv_blocks): by some batch row or head
    runs = []
    for dst in range(split.ranks):
        query_blocks = slice(split.start(dst) // layout.block_m, -(-split.end(dst) // layout.block_m))
        needed = visited[query_blocks].any(0).tolist()
        per_source = []
        for src in range(split.ranks):
            first, end = split.start(src) // layout.block_n, -(-split.end(src) // layout.block_n)
            per_source.append(_runs(needed, first, end))
        runs.append(tuple(per_source))
    return KVFetchPlan(layout, split, tuple(runs))


def layout_attention(q: Tensor, k: Tensor, v: Tensor, plan: KVFetchPlan, *, group: dist.ProcessGroup | None = None,
                     scale: float | None = None) -> ContextParallelOutput:
    """This rank's queries over the whole sequence's keys under ``plan.layout`` (exactly
    ``block_sparse_attention_reference`` over the whole sequence, restricted to this rank's rows), receiving only
    the key blocks the plan lists for it, straight from the ranks that hold them, and sending each other rank the
    blocks it lists. The rank's own pieces are computed while the transfers are in flight."""
    split = plan.split
    rank = _check_inputs(q, k, v, split, group, "layout_attention")
    start = split.start(rank)
    ops, incoming = [], {}
    for dst in range(split.ranks):
        if dst != rank and plan.runs[dst][rank]:
            ops.append(dist.P2POp(dist.isend, _pack(k, v, plan.keys(dst, rank), start), group=group, group_peer=dst))
    for src in range(split.ranks):
        if src != rank and plan.runs[rank][src]:
            tokens = sum(end - first for first, end in plan.keys(rank, src))
            incoming[src] = k.new_empty(2 * k.shape[0] * k.shape[1] * tokens * k.shape[3])
            ops.append(dist.P2POp(dist.irecv, incoming[src], group=group, group_peer=src))
    pending = dist.batch_isend_irecv(ops) if ops else []
    acc_out, acc_lse = _empty_accumulator(q)
    for run, (first, end) in enumerate(plan.keys(rank, rank)):
        piece = plan.piece_layout(rank, rank, run)
        acc_out, acc_lse = _merge(acc_out, acc_lse, *_attend(q, k[:, :, first - start:end - start],
                                                             v[:, :, first - start:end - start], piece, scale))
    for work in pending:
        work.wait()
    for src, buffer in incoming.items():
        for run, (piece_k, piece_v) in enumerate(_unpack(buffer, k, plan.keys(rank, src))):
            piece = plan.piece_layout(rank, src, run)
            acc_out, acc_lse = _merge(acc_out, acc_lse, *_attend(q, piece_k, piece_v, piece, scale))
    received = sum(buffer.numel() * buffer.element_size() for buffer in incoming.values())
    return ContextParallelOutput(acc_out.to(q.dtype), acc_lse, received)


# -- a whole model -------------------------------------------------------------------------------------------------

# Model types whose decoder mixes positions only in its attention, which it calls through transformers' attention
# interface on (B, H, L, D) q/k/v already rotated by the position ids it was given: running each rank's slice with
# its own position ids and that attention replaced computes the whole prompt's hidden states, slice by slice.
CONTEXT_PARALLEL_MODELS = ("llama", "qwen2")
ATTN_IMPLEMENTATION = "sparsify_context_parallel"


@dataclass(frozen=True)
class ContextParallelPrefill:
    """One rank's prefill: ``logits`` (B, L_r, vocab) of its own positions, and the bytes of K and V it received
    over all layers."""

    logits: Tensor
    kv_bytes_received: int


Plans = KVFetchPlan | tuple[KVFetchPlan | None, ...] | list[KVFetchPlan | None] | None
"""A prefill's attention: None (every layer over the ring), one plan for every layer, or a tuple or list of one
entry per layer (None: that layer over the ring)."""


class _LayerAttention:
    """Each layer's attention call of one :func:`context_parallel_prefill`, counting the bytes received; with
    ``keep``, also each layer's K and V of this rank's slice (after the rotary embedding), by layer index."""

    def __init__(self, split: SequenceSplit, layer_plans: tuple[KVFetchPlan | None, ...],
                 group: dist.ProcessGroup | None, keep: dict[int, tuple[Tensor, Tensor]] | None = None):
        self.split, self.layer_plans, self.group, self.keep = split, layer_plans, group, keep
        self.kv_bytes_received = 0

    def __call__(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
        if self.keep is not None:
            self.keep[layer] = (key, value)
        plan = self.layer_plans[layer]
        if plan is None:
            result = ring_attention(query, key, value, self.split, group=self.group, scale=scale)
        else:
            result = layout_attention(query, key, value, plan, group=self.group, scale=scale)
        self.kv_bytes_received += result.kv_bytes_received
        return result.out


def context_parallel_prefill(model: torch.nn.Module, input_ids: Tensor, split: SequenceSplit, *,
                             plan: Plans = None, group: dist.ProcessGroup | None = None
                             ) -> ContextParallelPrefill:
    """Prefill a transformers Llama or Qwen2 model (``config.model_type`` in :data:`CONTEXT_PARALLEL_MODELS`, eval
    mode, no sliding window) over a prompt split by ``split``: every rank of ``group`` calls it with
    ``input_ids`` (B, L_r), its own positions ``[split.start(r), split.end(r))`` of the prompt, and gets the logits
    of those positions, equal to the slice of the whole prompt's logits on one process. The model runs on the slice
    with those position ids, no cache and no padding; every layer's attention goes through :func:`ring_attention`
    (``plan`` None: exact causal attention) or :func:`layout_attention` over ``plan`` (one plan for every layer,
    or a tuple or list of one entry per layer, None for the ring there: :func:`plan_for_policy` gives one).
    The model itself is left as it was."""
    return _prefill(model, input_ids, split, plan, group)


def _prefill(model: torch.nn.Module, input_ids: Tensor, split: SequenceSplit, plan: Plans,
             group: dist.ProcessGroup | None, keep: dict[int, tuple[Tensor, Tensor]] | None = None,
             last_only: bool = False) -> ContextParallelPrefill:
    """:func:`context_parallel_prefill`; with ``keep``, each layer's K/V kept there; ``last_only``: the logits of
    the slice's last position alone (B, 1, vocab), all a decode needs."""
    config = model.config
    if getattr(config, "model_type", None) not in CONTEXT_PARALLEL_MODELS:
        raise ShapeError(f"config.model_type: {getattr(config, 'model_type', None)!r}; allowed: "
                         f"{', '.join(CONTEXT_PARALLEL_MODELS)}")
    windowed = [(name, module.sliding_window) for name, module in model.named_modules()
                if getattr(module, "sliding_window", None)]
    if windowed:
        raise ShapeError(f"{windowed[0][0]}.sliding_window: {windowed[0][1]}; allowed: None (context-parallel "
                         "prefill computes full causal attention)")
    if model.training:
        raise SparsifyError("model.training: True; allowed: eval mode (context-parallel prefill is inference only)")
    if plan is not None and not isinstance(plan, (KVFetchPlan, tuple, list)):
        raise ShapeError(f"plan: {type(plan).__name__}; allowed: None (the ring), a KVFetchPlan, or a tuple or list "
                         "of one entry (KVFetchPlan or None) per layer")
    layer_plans = tuple(plan) if isinstance(plan, (tuple, list)) else (plan,) * config.num_hidden_layers
    if len(layer_plans) != config.num_hidden_layers:
        raise ShapeError(f"plan: {len(layer_plans)} entries; allowed: one per layer, {config.num_hidden_layers}")
    for layer, entry in enumerate(layer_plans):
        if entry is not None and entry.split != split:
            where = f"plan[{layer}]" if isinstance(plan, (tuple, list)) else "plan"
            raise ShapeError(f"{where}: made for {entry.split}; allowed: a plan of the split given, {split}")
    rank = dist.get_rank(group)
    if input_ids.dim() != 2 or input_ids.shape[1] != split.lengths[rank]:
        raise ShapeError(f"input_ids: {tuple(input_ids.shape)} on rank {rank}; allowed: (B, {split.lengths[rank]}), "
                         f"the split's positions {split.start(rank)}-{split.end(rank) - 1}")
    attention = _LayerAttention(split, layer_plans, group, keep)
    positions = torch.arange(split.start(rank), split.end(rank), device=input_ids.device)
    logits = _forward(model, input_ids, positions.expand(input_ids.shape[0], -1), attention,
                      logits_to_keep=1 if last_only else 0)
    return ContextParallelPrefill(logits, attention.kv_bytes_received)


def _forward(model: torch.nn.Module, input_ids: Tensor, position_ids: Tensor, attention,
             logits_to_keep: int = 0) -> Tensor:
    """The model's logits (of the last ``logits_to_keep`` positions; 0: all) with every layer's attention done by
    ``attention(layer, q, k, v, scale)`` (through :data:`ATTN_IMPLEMENTATION`, for this call only), no cache."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        return model(input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_to_keep,
                     sparsify_context_parallel=attention).logits
    finally:
        config._attn_implementation = previous


# -- decoding after a context-parallel prefill ----------------------------------------------------------------------


@dataclass(frozen=True)
class ContextParallelGeneration:
    """One rank's :func:`context_parallel_generate`: ``tokens`` (B, T) the generated ids (the same on every rank;
    T = ``max_new_tokens``, fewer when every row has ended at an end token), ``logits`` (B, T, vocab) float32 of
    each step when asked for, else None; the bytes this rank received: ``kv_bytes_received`` in the prefill, and
    ``decode_bytes_received`` in the decode steps' gathers of partial attentions."""

    tokens: Tensor
    logits: Tensor | None
    kv_bytes_received: int
    decode_bytes_received: int


class _DecodeAttention:
    """Each layer's attention of one new token per row after a context-parallel prefill. Rank r keeps the K/V of
    its prompt slice (``prompt_kv``, by layer); the last rank also keeps every generated token's, in a cache
    preallocated for ``capacity`` of them. The token's query attends to every rank's keys as the log-sum-exp
    merge, in rank order, of each rank's partial attention over the keys it holds: one all-gather of
    (B, Hq, 1, Dv + 1) float32 per layer and step, the same result on every rank."""

    def __init__(self, prompt_kv: dict[int, tuple[Tensor, Tensor]], holds_new_tokens: bool, capacity: int,
                 group: dist.ProcessGroup | None):
        self.group, self.holds_new_tokens = group, holds_new_tokens
        prompt_k, prompt_v = next(iter(prompt_kv.values()))
        self.in_use = prompt_k.shape[2]  # keys this rank holds, the current step's new one included
        self.lengths = torch.full((prompt_k.shape[0],), self.in_use, dtype=torch.int64, device=prompt_k.device)
        # The queries share the keys' dtype and head size, so one choice serves every layer and step.
        self.decode = (decode_kernels.decode_attention
                       if prompt_k.is_cuda and decode_kernels.supports(prompt_k, prompt_k, prompt_v)
                       else decode_kernels.decode_attention_reference)
        self.bytes_received = 0
        self.caches = {}
        for layer, (key, value) in prompt_kv.items():
            if holds_new_tokens:
                key, value = (torch.cat([t, t.new_zeros((*t.shape[:2], capacity, t.shape[3]))], dim=2)
                              for t in (key, value))
            self.caches[layer] = (key, value)

    def step(self) -> None:
        """The next forward is the next new token's: on the last rank, one more key in use in every layer."""
        if self.holds_new_tokens:
            self.in_use += 1
            self.lengths.fill_(self.in_use)

    def __call__(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
        cached_k, cached_v = self.caches[layer]
        if self.holds_new_tokens:
            cached_k[:, :, self.in_use - 1] = key[:, :, 0]
            cached_v[:, :, self.in_use - 1] = value[:, :, 0]
        out, lse = self.decode(query, cached_k, cached_v, self.lengths, scale)
        mine = torch.cat([out.float(), lse[..., None]], dim=-1)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        self.bytes_received += (len(parts) - 1) * mine.numel() * mine.element_size()
        acc_out, acc_lse = _empty_accumulator(query)
        for part in parts:
            acc_out, acc_lse = _merge(acc_out, acc_lse, part[..., :-1], part[..., -1])
        return acc_out.to(query.dtype)


def context_parallel_generate(model: torch.nn.Module, input_ids: Tensor, split: SequenceSplit,
                              max_new_tokens: int, *, plan: Plans = None,
                              group: dist.ProcessGroup | None = None,
                              eos_token_id: int | list[int] | None = None,
                              return_logits: bool = False) -> ContextParallelGeneration:
    """Greedy decoding after :func:`context_parallel_prefill` (same arguments, same checks): every rank of
    ``group`` calls it with its slice of the prompt and gets the same ``max_new_tokens`` new tokens, equal to one
    process's greedy ``generate()`` over the whole prompt (with ``plan``, the prompt's attention follows that
    layout; the decode steps attend to every key).

    The KV cache stays split as the prompt was: no rank ever holds the whole sequence's K/V. The first token is the
    argmax of the last rank's last prompt position; each later one runs the whole model on every rank (the weights
    are replicated), each layer's attention as :class:`_DecodeAttention` merges every rank's partial attention, so
    every rank computes the same logits. The last rank's choice of each token is broadcast all the same (B ids):
    the ranks then feed the same tokens and stop together even where their arithmetic differed. A row that
    produced an end token (``eos_token_id``: one id or several, as a generation config gives them) repeats the
    first of them until every row has ended; then the loop stops. Tested against transformers' greedy
    ``generate()`` in float32 on the CPU (B = 1 and 2, 2 ranks)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ShapeError(f"max_new_tokens: {max_new_tokens!r}; allowed: a whole number of at least 1")
    prompt_kv: dict[int, tuple[Tensor, Tensor]] = {}
    prefill = _prefill(model, input_ids, split, plan, group, prompt_kv, last_only=True)
    last = dist.get_world_size(group) - 1
    is_last = dist.get_rank(group) == last
    # Only the last rank holds the prompt's last position: its logits go to every rank (contiguous, as a
    # collective needs: a float32 model's slice [:, -1] is a strided view).
    logits = prefill.logits[:, -1].float().contiguous() if is_last else \
        prefill.logits.new_empty((input_ids.shape[0], prefill.logits.shape[-1]), dtype=torch.float32)
    dist.broadcast(logits, group_src=last, group=group)
    prefill_bytes = prefill.kv_bytes_received
    del prefill
    attention = _DecodeAttention(prompt_kv, is_last, max_new_tokens - 1, group)
    prompt_kv.clear()  # the caches hold them now (the last rank's as copies with room for the new tokens)
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    end_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [],
                           dtype=torch.long, device=input_ids.device)
    tokens, step_logits = [], []
    while True:
        token = logits.argmax(-1)
        dist.broadcast(token, group_src=last, group=group)
        if end_ids.numel():
            token = torch.where(finished, end_ids[0], token)
            finished |= torch.isin(token, end_ids)
        tokens.append(token)
        if return_logits:
            step_logits.append(logits)
        if len(tokens) == max_new_tokens or bool(finished.all()):
            break
        attention.step()
        position = torch.full((batch, 1), split.seq_len + len(tokens) - 1, device=input_ids.device)
        logits = _forward(model, token[:, None], position, attention)[:, -1].float()
    return ContextParallelGeneration(torch.stack(tokens, dim=1),
                                     torch.stack(step_logits, dim=1) if return_logits else None,
                                     prefill_bytes, attention.bytes_received)


# The layout tiles of a context-parallel sink + window plan (the prefill kernel's defaults); ranks' boundaries fall
# on multiples of both.
PLAN_BLOCK_M, PLAN_BLOCK_N = 128, 64
PLAN_ALIGNMENT = math.lcm(PLAN_BLOCK_M, PLAN_BLOCK_N)


def policy_needs_plans(policy) -> bool:
    """Whether any rule (or the default) of ``policy`` names ``sink_window``: then the ranks' boundaries must fall
    on :data:`PLAN_ALIGNMENT` (the ring takes any split)."""
    return any(spec.name == "sink_window" for spec in (policy.default, *(rule.spec for rule in policy.rules)))


def plan_for_policy(policy, num_layers: int, split: SequenceSplit, *, max_new_tokens: int = 0, device="cpu"
                    ) -> tuple[KVFetchPlan | None, ...]:
    """What a context-parallel run does for ``policy`` (a :class:`~sparsify.policy.Policy`) over a prompt of
    ``split.seq_len`` tokens and ``max_new_tokens`` decode steps, per layer: None (the dense ring) where the
    layer's prefill method is ``dense``, a sink + window :class:`KVFetchPlan` where it is ``sink_window`` (one plan
    per distinct parameters, shared by the layers that use them). A method that does not serve a phase runs dense
    there, as under :func:`sparsify.compile`. Refused, naming the rule: any other prefill method (only layouts
    known before the call can be planned), a rule that splits a layer's heads, and a decode method other than
    ``dense`` at any length the decode steps reach (:func:`context_parallel_generate` decodes densely)."""
    plans: dict[MethodSpec, KVFetchPlan] = {}
    per_layer: list[KVFetchPlan | None] = []
    final = split.seq_len + max_new_tokens
    # Rules hold on ranges of lengths, so which rule matches changes only at their bounds: the ends of the decode's
    # range, every bound inside it and the length after each stand for every length in between.
    bounds = {split.seq_len, final} | {bound for rule in policy.rules
                                       for bound in (rule.when.min_seq_len, rule.when.max_seq_len)
                                       if bound is not None and split.seq_len <= bound <= final}
    decode_lengths = sorted(bounds | {bound + 1 for bound in bounds if bound < final})
    for phase, lengths in (("prefill", [split.seq_len]), ("decode", decode_lengths)):
        for layer in range(num_layers):
            specs = {_layer_spec(policy, layer, phase, length) for length in lengths}
            for where, spec in sorted(specs, key=lambda item: item[0]):
                allowed = ("dense", "sink_window") if phase == "prefill" else ("dense",)
                if spec.name not in allowed:
                    raise PolicyError(f"{policy.source}: {where}: {spec.name} on layer {layer}'s {phase}; allowed "
                                      f"under context parallelism: {', '.join(allowed)}")
            if phase == "prefill":
                (_, spec), = specs
                if spec.name == "sink_window" and spec not in plans:
                    layout = sink_window_layout(split.seq_len, split.seq_len, spec.params.sink, spec.params.window,
                                                PLAN_BLOCK_M, PLAN_BLOCK_N, device=device)
                    plans[spec] = plan_kv_fetch(layout, split)
                per_layer.append(plans.get(spec))
    return tuple(per_layer)


def _layer_spec(policy, layer: int, phase: str, seq_len: int) -> tuple[str, MethodSpec]:
    """(where it comes from, the method) that runs a layer's attention in ``phase`` at ``seq_len``: the first
    matching rule's, else the default; a method that does not serve the phase runs dense there."""
    path = f"model.layers.{layer}.self_attn"
    rule = next((rule for rule in policy.rules
                 if rule.when.matches(layer=layer, module_path=path, phase=phase, seq_len=seq_len)), None)
    if rule is not None and rule.when.heads is not None:
        raise PolicyError(f"{policy.source}: {rule.describe()}.when.heads: context parallelism runs a layer's heads "
                          "alike; allowed: rules over whole layers")
    where, spec = (rule.describe(), rule.spec) if rule is not None else ("default", policy.default)
    if phase not in spec.method.phases:
        return where, MethodSpec("dense", METHODS.get("dense").Params())
    return where, spec


def _attention_interface(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *,
                         sparsify_context_parallel: _LayerAttention | _DecodeAttention, **kwargs):
    """transformers' attention-function contract: (B, H, L, D) in, (B, L, H, D) and no weights out. The mask is
    None (:func:`_no_mask`): the split says where the rank's queries sit (a decode step's token is after every
    key)."""
    out = sparsify_context_parallel(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """The mask function of :data:`ATTN_IMPLEMENTATION`: no mask is built, causality comes from the split."""


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_interface)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


# -- shared ---------------------------------------------------------------------------------------------------------


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, split: SequenceSplit, group, op: str) -> int:
    """This rank's index in ``group``, after checking that the group and the local slices fit ``split``."""
    check_attention_inputs(q, k, v, op)
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    if ranks != split.ranks:
        raise ShapeError(f"{op}: split: {split.ranks} ranks; allowed: the group's {ranks}")
    if q.shape[2] != split.lengths[rank] or k.shape[2] != split.lengths[rank]:
        raise ShapeError(f"{op}: rank {rank} holds q of {q.shape[2]} and k/v of {k.shape[2]} positions; allowed: "
                         f"the split's {split.lengths[rank]} (positions {split.start(rank)}-{split.end(rank) - 1})")
    return rank


def _runs(selected: list[bool], first: int, end: int) -> tuple[tuple[int, int], ...]:
    """Runs ``(first, end)`` of consecutive True entries of ``selected[first:end]``, in its indices."""
    runs: list[tuple[int, int]] = []
    for index in range(first, end):
        if not selected[index]:
            continue
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return tuple(runs)


def _pack(k: Tensor, v: Tensor, keys: tuple[tuple[int, int], ...], start: int) -> Tensor:
    """One flat buffer: the K of every run (positions ``[first, end)``, this rank's slice starting at ``start``),
    then their V."""
    parts = [t[:, :, first - start:end - start].reshape(-1) for t in (k, v) for first, end in keys]
    return torch.cat(parts)


def _unpack(buffer: Tensor, like: Tensor, keys: tuple[tuple[int, int], ...]) -> list[tuple[Tensor, Tensor]]:
    """The (k, v) of each run from a buffer :func:`_pack` filled, each (B, Hkv, run length, D) like ``like``."""
    batch, heads, _, dim = like.shape
    shapes = [(batch, heads, end - first, dim) for first, end in keys]
    flat = buffer.split([math.prod(shape) for shape in shapes] * 2)
    views = [part.view(shape) for part, shape in zip(flat, shapes * 2)]
    return list(zip(views[:len(keys)], views[len(keys):]))


def _attend(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float | None) -> tuple[Tensor, Tensor]:
    """(out, lse) of ``q`` over one piece of keys: the Triton kernel on CUDA tensors, its reference elsewhere."""
    if q.is_cuda:
        return kernel.block_sparse_attention(q, k, v, layout, scale)
    return kernel.block_sparse_attention_reference(q, k, v, layout, scale)


def _empty_accumulator(q: Tensor) -> tuple[Tensor, Tensor]:
    batch, heads, length, _ = q.shape
    return (q.new_zeros((batch, heads, length, q.shape[-1]), dtype=torch.float32),
            q.new_full((batch, heads, length), float("-inf"), dtype=torch.float32))


def _merge(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax-merge two partial attentions over disjoint keys, by their log-sum-exp, in float32. Rows that saw no
    key in either (lse -inf in both) stay out 0, lse -inf."""
    merged = torch.logaddexp(acc_lse, lse)
    shift = torch.where(torch.isinf(merged), 0.0, merged)
    out = acc_out * torch.exp(acc_lse - shift)[..., None] + out.float() * torch.exp(lse - shift)[..., None]
    return out, merged
