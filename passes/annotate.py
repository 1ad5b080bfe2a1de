"""Annotate each matched attention: layer, module path, heads, GQA group, lengths, causal, phase, dtype, mask.

Also builds the attention-node graph with networkx: the transitive reduction of "``b`` depends on ``a``'s
output", so in a decoder layer i has one edge, to layer i+1 (the residual stream's longer paths are implied).
Methods that pass data between layers (LessIsMore's shared selection) follow these edges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import networkx as nx
import sympy
import torch
import torch.fx

from .fx_utils import module_path, value_of
from .match import AttentionMatch, MatchReport

Length = int | sympy.Expr


@dataclass
class AttentionInfo:
    """What the policy and the methods need to know about one attention call.

    Lengths are ints when static, sympy expressions of the graph's size symbols when dynamic.
    """

    index: int
    match: AttentionMatch
    layer: int | None
    module_path: str
    batch: Length
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    q_len: Length
    kv_len: Length
    causal: bool
    phase: str
    dtype: torch.dtype
    mask_kind: str
    # A mask tensor on a square prefill call (transformers materialises its causal mask while traced): taken as
    # causal, so sparse methods apply, and checked on every call, falling back to dense when it is not causal.
    mask_guard: bool = False
    # A described mask (``sparsify.attention``) on a prefill call with key padding or a static cache's offset: sparse
    # methods run over the first q_len keys, and a check once per forward (``sparsify.prefill_is_plain``) replaces
    # their output with exact attention on calls that are not a plain causal prefill (a padded batch, a non-empty cache).
    prefill_guard: bool = False
    # A static cache in prefill: k/v are the cache's whole capacity; ``kv_len`` above is q_len, the keys a method
    # reads (guarded as above).
    static_cache: bool = False

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def name(self) -> str:
        return self.match.output.name


@dataclass
class AnnotateReport:
    attentions: list[AttentionInfo]
    layer_graph: nx.DiGraph


_LAYER_IN_PATH = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    found = _LAYER_IN_PATH.search(path) or re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


def _or(value, fallback):
    return fallback if value is None else value


def as_length(size) -> Length:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def _mask_kind(mask, key_padding=None) -> str:
    if key_padding is not None:
        return "key_padding"
    if mask is None:
        return "none"
    value = value_of(mask)
    if isinstance(value, torch.Tensor):
        return "bool" if value.dtype == torch.bool else "additive"
    return "additive"


def _square_mask(mask, q_len, kv_len) -> bool:
    """A 4-D mask tensor over (q_len, kv_len) with q_len == kv_len > 1: the shape of a causal prefill mask."""
    value = value_of(mask) if mask is not None else None
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return False
    rows, cols = as_length(value.shape[-2]), as_length(value.shape[-1])
    return q_len == kv_len and rows == q_len and cols == kv_len


def annotate_attention(
    gm: torch.fx.GraphModule, matches: MatchReport, *, diffusion: bool = False
) -> tuple[torch.fx.GraphModule, AnnotateReport]:
    """``diffusion`` marks every bidirectional call as a diffusion step (set by the diffusion runtime)."""
    attentions = []
    for index, match in enumerate(matches.matches):
        q, k, v = (value_of(n) for n in (match.q, match.k, match.v))
        path = module_path(match.output)
        q_len, kv_len = as_length(q.shape[-2]), as_length(k.shape[-2])
        causal = match.is_causal
        if diffusion and not causal:
            phase = "diffusion"
        else:
            phase = "decode" if q_len == 1 else "prefill"
        mask_guard = phase == "prefill" and not causal and _square_mask(match.attn_mask, q_len, kv_len)
        static_cache = phase == "prefill" and causal and match.query_offset is not None
        prefill_guard = phase == "prefill" and causal and (match.key_padding is not None or static_cache)
        if static_cache:
            kv_len = q_len
        attentions.append(AttentionInfo(
            # Without a numbered module on the path (attention in a top-level forward), graph order is the layer.
            index=index, match=match, layer=_or(layer_index(path), index), module_path=path,
            batch=as_length(q.shape[0]), q_heads=int(q.shape[1]), kv_heads=int(k.shape[1]),
            head_dim=int(q.shape[-1]), v_head_dim=int(v.shape[-1]), q_len=q_len, kv_len=kv_len,
            causal=causal or mask_guard, phase=phase, dtype=q.dtype,
            mask_kind=_mask_kind(match.attn_mask, match.key_padding), mask_guard=mask_guard,
            prefill_guard=prefill_guard, static_cache=static_cache,
        ))
    return gm, AnnotateReport(attentions, _layer_graph(gm, attentions))


def _layer_graph(gm: torch.fx.GraphModule, attentions: list[AttentionInfo]) -> nx.DiGraph:
    """Dependency edges between attention calls, transitively reduced."""
    flow = nx.DiGraph()
    for node in gm.graph.nodes:
        for user in node.users:
            flow.add_edge(node, user)
    by_output = {a.match.output: a.index for a in attentions}
    layers = nx.DiGraph()
    layers.add_nodes_from(a.index for a in attentions)
    for attention in attentions:
        # Walk forward from this attention; stop at the next attentions reached.
        frontier, seen = [attention.match.output], {attention.match.output}
        while frontier:
            node = frontier.pop()
            for user in flow.successors(node) if node in flow else ():
                if user in seen:
                    continue
                seen.add(user)
                if user in by_output:
                    layers.add_edge(attention.index, by_output[user])
                else:
                    frontier.append(user)
    return nx.transitive_reduction(layers)
