"""``lessismore``: LessIsMore (arXiv 2508.07101, after TidalDecode), one token set chosen jointly by all heads of
a selection layer and read by the layers after it, at decode.

Layer roles, for a model of ``num_layers`` (bound by :meth:`LessIsMore.for_model`): ``dense_layers`` run dense;
``selection_layers`` (default: the first layer not dense and one a third of the way down) run **full** attention
and, from the same pass over K (the split-KV kernel's scores output), choose the token set
(``sparsify.lessismore_select``); every other layer attends to the set of the latest selection layer before it
(``sparsify.token_decode``), the same positions for all its heads, each K/V row gathered once per KV head. The set
is an output of the selection layer's node and an input of each of its consumers: a graph edge, that the group
planner (``passes/plan_groups``) keeps consistent (a consumer whose producer runs dense runs dense too).

The set of a row, ``budget`` positions: its first ``sink`` tokens, its last ``round(budget * recent_ratio)``, and
between them the rank-major union of every query head's top keys by scaled q.k: rank 0 of head 0, 1, ..., then
rank 1 of each, ..., duplicates dropped, until ``budget - sink - recent`` distinct positions. A row whose real
tokens fit the budget keeps them all (then sparse equals dense). Ablations: ``selection: per_kv_head`` unifies
each KV head's query heads only (TidalDecode-like per-head sets, one per GQA group), ``recent_ratio: 0`` drops the
recency window.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator, Field
from torch import Tensor

from ..errors import PolicyError
from ..kernels import decode as decode_kernels
from ..kernels.token_set import token_set, token_set_reference
from ..ops import inference_only, lengths_and_shift
from .base import AttentionMethod, cache_decode_reason, register_method
from .resa import ReSA

TOKENS = "lessismore.tokens"


def select_tokens(scores: Tensor, lengths: Tensor, starts: Tensor, budget: int, recent: int, sink: int,
                  groups: int, kv_heads: int, heads_group: str = "", length_shift: int = 0) -> tuple[Tensor, Tensor]:
    """The token lists (B, kv_heads, budget) int32 and their counts (B, kv_heads) int32 (all ``budget``) from
    per-head scores (B, Hq, L) (float32 or the model's dtype) that are -inf outside each row's middle region
    ``[starts[b] + sink, length - recent)`` (the selection pass writes them so), row b's length being
    ``lengths[b] + length_shift``.
    A row's list: its first ``sink`` tokens, the rank-major union (per group of ``Hq / groups`` heads, for
    ``kv_heads / groups`` KV heads each) of each head's top keys in the middle, its last ``recent``; all its real
    tokens when they fit ``budget`` (:func:`~sparsify.kernels.token_set.token_set_reference`). The union by the
    kernels of ``kernels/token_set.py`` on CUDA, its reference elsewhere.

    ``heads_group``: the name of a process group over which the model's query heads are split, rank r holding
    the r-th run of Hq of them (tensor parallelism, ``groups`` 1): every rank's rankings are gathered first, so
    the union is over all the model's heads in their order, and every rank chooses the same set."""
    if heads_group and groups != 1:
        raise ValueError(f"groups: {groups} with heads_group {heads_group!r}; a set gathered over ranks is one per "
                         "row (groups 1): per-KV-head sets need no gather")
    middle_width = budget - recent - sink
    if scores.shape[-1] < middle_width:  # a cache shorter than the width (then every row fits the budget anyway)
        scores = torch.nn.functional.pad(scores, (0, middle_width - scores.shape[-1]), value=float("-inf"))
    top = scores.topk(middle_width, dim=-1)
    positions, values = top.indices, top.values
    if heads_group:  # the ranks' rankings, -1 where a head ran out of candidates
        positions, values = _gather_heads(torch.where(values > float("-inf"), positions, -1), heads_group), None
    build = token_set if scores.is_cuda else token_set_reference
    return build(positions, values, lengths, starts, budget=budget, recent=recent, sink=sink, groups=groups,
                 kv_heads=kv_heads, positions=scores.shape[-1], length_shift=length_shift)


def _gather_heads(ranked: Tensor, group_name: str) -> Tensor:
    """(B, Hq, k) of this rank -> (B, R * Hq, k): every rank's, in rank order (the model's head order). One
    all-gather of B * Hq * k indices (a few KB per step)."""
    from torch.distributed import all_gather
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    parts = [torch.empty_like(ranked) for _ in range(group.size())]
    all_gather(parts, ranked.contiguous(), group=group)
    return torch.cat(parts, dim=1)


# -- the ops --------------------------------------------------------------------------------------------------------


def _decode(q, k, v, lengths, scale, **lists):
    if q.is_cuda and decode_kernels.supports(q, k, v):
        return decode_kernels.decode_attention(q, k, v, lengths, scale, **lists)[0]
    return decode_kernels.decode_attention_reference(q, k, v, lengths, scale, **lists)[0]


@torch.library.custom_op("sparsify::lessismore_select", mutates_args=())
def lessismore_select(q: Tensor, k: Tensor, v: Tensor, query_offset: Tensor | None, key_padding: Tensor | None,
                      starts: Tensor, budget: int, recent: int, sink: int, per_kv_head: bool, scale: float,
                      heads_group: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """A selection layer's decode step: (out (B, Hq, 1, Dv), tokens (B, Hkv, budget) int32, counts (B, Hkv)
    int32). ``out`` is full attention over the positions in use (:func:`~sparsify.methods.resa.lengths_in_use`)
    and ``key_padding``; ``tokens`` the set :func:`select_tokens` chooses from the same pass's scores (over all
    query heads, or with ``per_kv_head`` over each KV head's); each list holds ``budget`` entries, -1 or past the
    length where a row has fewer, which the kernel ignores. ``heads_group``: the process group over which the
    model's heads are split (tensor parallelism), whose ranks' rankings the unified set is chosen from; "" for
    none."""
    batch, q_heads, _, _ = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    lengths, shift = lengths_and_shift(q, k, query_offset)
    # The pass writes -inf outside the middle region, so the top-k reads the scores as they are. In the model's
    # dtype, as the authors rank them (a matmul of q and k in it): half the bytes written and read back, and a
    # top-k over 16-bit keys (0.09 ms, not 0.12, at 128K and 32 heads on an H200).
    scores = torch.empty((batch, q_heads, length), dtype=q.dtype, device=q.device)
    out = _decode(q, k, v, lengths, scale, key_padding=key_padding, scores_out=scores, scores_start=starts,
                  scores_skip=(sink, recent), length_shift=shift, **decode_kernels.scores_pass_launch(length, q.device))
    groups = kv_heads if per_kv_head else 1
    tokens, counts = select_tokens(scores, lengths, starts, budget, recent, sink, groups, kv_heads,
                                   "" if per_kv_head else heads_group, shift)
    return out, tokens, counts


@lessismore_select.register_fake
def _(q, k, v, query_offset, key_padding, starts, budget, recent, sink, per_kv_head, scale, heads_group=""):
    batch, kv_heads = q.shape[0], k.shape[1]
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((batch, kv_heads, budget), dtype=torch.int32),
            q.new_empty((batch, kv_heads), dtype=torch.int32))


@torch.library.custom_op("sparsify::token_decode", mutates_args=())
def token_decode(q: Tensor, k: Tensor, v: Tensor, query_offset: Tensor | None, key_padding: Tensor | None,
                 tokens: Tensor, counts: Tensor, scale: float) -> Tensor:
    """One decode step over listed positions: q (B, Hq, 1, D) against ``tokens[b, g, :counts[b, g]]`` of k, v
    (B, Hkv, Lk, D), within the positions in use and ``key_padding``. The split-KV kernel's token lists on CUDA,
    its reference elsewhere. Returns (B, Hq, 1, Dv)."""
    lengths, shift = lengths_and_shift(q, k, query_offset)
    launch = decode_kernels.token_pass_launch(q.shape[0], k.shape[1], tokens.shape[-1], q.device)
    return _decode(q, k, v, lengths, scale, key_padding=key_padding, kv_token_indices=tokens,
                   kv_token_counts=counts, length_shift=shift, **launch)


@token_decode.register_fake
def _(q, k, v, query_offset, key_padding, tokens, counts, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


inference_only(lessismore_select)
inference_only(token_decode)


# -- the method -----------------------------------------------------------------------------------------------------


def _layer_list(value):
    """YAML and TOML give lists: the parameters keep tuples (frozen, hashable)."""
    return tuple(value) if isinstance(value, list) else value


Layers = Annotated[tuple[Annotated[int, Field(ge=0)], ...], BeforeValidator(_layer_list)]


@dataclass(frozen=True)
class LessIsMoreParams:
    budget: Annotated[int, Field(ge=8, description="Tokens each sparse layer attends to, per row")] = 2048
    recent_ratio: Annotated[float, Field(ge=0.0, lt=1.0, description="Share of the budget kept for the most "
                                                                     "recent tokens")] = 0.25
    sink: Annotated[int, Field(ge=0, description="First tokens always kept")] = 4
    dense_layers: Annotated[Layers, Field(description="Layers that stay dense at decode")] = (0, 1)
    selection_layers: Annotated[Layers | None, Field(
        description="Layers that attend fully and choose the set for the layers after them (default: the first "
                    "layer not dense and one a third of the way down)")] = None
    selection: Annotated[Literal["unified", "per_kv_head"], Field(
        description="unified: one set for all heads (rank-major over every query head); per_kv_head: one per KV "
                    "head (an ablation)")] = "unified"

    @property
    def recent(self) -> int:
        return round(self.budget * self.recent_ratio)


@register_method
class LessIsMore(AttentionMethod):
    name = "lessismore"
    whole_layers = True
    Params = LessIsMoreParams
    phases = ("decode",)
    summary = "one token set chosen by all heads of a selection layer, read by the layers after it (decode)"

    def for_model(self, params: LessIsMoreParams, num_layers: int) -> LessIsMoreParams:
        problems = [f"{name}: layer {layer} is out of range for a model with {num_layers} layers "
                    f"(0-{num_layers - 1})" for name in ("dense_layers", "selection_layers")
                    for layer in getattr(params, name) or () if layer >= num_layers]
        if params.sink + params.recent >= params.budget:
            problems.append(f"budget: {params.budget} leaves no token to select after sink {params.sink} and "
                            f"recent {params.recent} (budget * recent_ratio)")
        selection = params.selection_layers
        if selection is None:
            first = next((layer for layer in range(num_layers) if layer not in params.dense_layers), None)
            third = round(num_layers / 3)
            selection = tuple(sorted({first, third} - {None} - set(params.dense_layers)))
        if not selection:
            problems.append("selection_layers: none; the sparse layers need a selection layer before them")
        both = sorted(set(selection) & set(params.dense_layers))
        if both:
            problems.append(f"selection_layers: {both} are also dense_layers; a layer has one role")
        if problems:
            raise PolicyError("\n".join(problems))
        return replace(params, selection_layers=tuple(sorted(selection)))

    def _role(self, params: LessIsMoreParams, attn) -> str:
        if attn.layer is None or attn.layer in params.dense_layers:
            return "dense"
        if params.selection_layers is None:
            raise PolicyError("lessismore: selection_layers: the default is resolved from the model's layer count "
                              "(config.num_hidden_layers), which this model does not give; list them explicitly")
        return "selection" if attn.layer in params.selection_layers else "sparse"

    def unsupported_reason(self, params: LessIsMoreParams, attn):
        if attn.phase == "decode" and attn.layer is None:
            return "lessismore assigns roles by layer; this attention has no layer index"
        if attn.phase == "decode" and self._role(params, attn) == "dense":
            return f"layer {attn.layer} is one of lessismore's dense_layers {list(params.dense_layers)}"
        return cache_decode_reason(self.name, attn, "token set")

    def provides(self, params: LessIsMoreParams, attn) -> str | None:
        return TOKENS if self._role(params, attn) == "selection" else None

    def needs(self, params: LessIsMoreParams, attn) -> str | None:
        return TOKENS if self._role(params, attn) == "sparse" else None

    def plan(self, params: LessIsMoreParams, attn, ctx):
        """At a selection layer: (its output, the set), the set published for the layers after it. Elsewhere: the
        set of the latest selection layer before this one."""
        if ctx.heads != (0, attn.q_heads):
            raise PolicyError(f"lessismore: {attn.module_path or attn.name} splits its heads between rules; "
                              "lessismore's set is chosen by all heads of a layer, so give it whole layers")
        if self._role(params, attn) == "sparse":
            return None, ctx.published(TOKENS)
        # Under tensor parallelism the unified set is chosen from every rank's heads (a per-KV-head set needs only
        # the rank's own: its query heads are whole GQA groups).
        heads_group = ctx.head_split.group_name if ctx.head_split is not None else ""
        selected = ctx.call(torch.ops.sparsify.lessismore_select.default, ctx.q, ctx.k, ctx.v, ctx.query_offset,
                            ctx.key_padding, ReSA.row_starts(ctx), params.budget, params.recent, params.sink,
                            params.selection == "per_kv_head", attn.match.scale, heads_group)
        out, tokens, counts = (ctx.call(operator.getitem, selected, i) for i in range(3))
        ctx.publish(TOKENS, (tokens, counts))
        return out, (tokens, counts)

    def run(self, params: LessIsMoreParams, attn, ctx, plan):
        out, (tokens, counts) = plan
        if out is not None:
            return out
        return ctx.call(torch.ops.sparsify.token_decode.default, ctx.q, ctx.k, ctx.v, ctx.query_offset,
                        ctx.key_padding, tokens, counts, attn.match.scale)
