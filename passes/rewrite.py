"""Rewrite: replace every decided attention by the nodes its method emits (``torch.ops.sparsify.*``).

Methods emit through a :class:`RewriteContext`, which also gives them what stateful and cross-layer methods
need: state buffers registered on the module (read and mutated by ops that declare the mutation), plan nodes
shared by every attention with the same key (layouts built once per forward, not once per layer), and values
published by one attention for later ones (a selection made in layer 2, read by layers 3-11).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
import torch.fx

from .annotate import AttentionInfo
from .apply_policy import PolicyReport
from .fx_utils import tensor_shape

aten = torch.ops.aten


@dataclass
class RewriteReport:
    rewritten: int
    untouched: int
    ops: dict[str, int]
    state_buffers: list[str]


class RewriteContext:
    """What a method sees while it emits the nodes of one attention (one run of query heads of it).

    ``q``, ``k``, ``v`` are nodes of shapes ``(B, Hq', q_len, D)``, ``(B, Hkv', kv_len, D)``,
    ``(B, Hkv', kv_len, Dv)`` for the heads being served; ``attn_mask`` likewise (or None). ``heads`` is the
    served run ``[start, stop)`` of query heads (for methods keeping per-head state), ``config`` the kernel
    launch config the cost model chose.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self._shared: dict[Hashable, torch.fx.Node] = {}
        self._published: dict[Hashable, torch.fx.Node] = {}
        self.state_buffers: list[str] = []
        self.ops_emitted: dict[str, int] = {}
        self.attention: AttentionInfo | None = None
        self.q = self.k = self.v = self.attn_mask = None
        self.heads: tuple[int, int] = (0, 0)
        self.config = None  # the kernel launch config the cost model chose for this segment

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> torch.fx.Node:
        """Insert ``target(*args, **kwargs)`` before the attention being replaced."""
        if isinstance(target, torch._ops.OpOverload) and target.namespace != "aten":
            name = f"{target.namespace}.{target._opname}"
            self.ops_emitted[name] = self.ops_emitted.get(name, 0) + 1
        node = self.graph.call_function(target, args, kwargs)
        if self.attention is not None:
            # Keep provenance, so exported graphs still say which module each op belongs to.
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in self.attention.match.output.meta:
                    node.meta[key] = self.attention.match.output.meta[key]
        return node

    def size(self, node: torch.fx.Node, dim: int) -> torch.fx.Node:
        return self.call(aten.sym_size.int, node, dim)

    def state(self, name: str, create: Callable[[], torch.Tensor]) -> torch.fx.Node:
        """A buffer of the rewritten module (created once by ``create``), as a ``get_attr`` node.

        Ops that write it must declare the mutation (``mutates_args``) so compilers keep the write.
        """
        qualified = f"sparsify_state_{name}"
        if not hasattr(self.gm, qualified):
            self.gm.register_buffer(qualified, create(), persistent=False)
            self.state_buffers.append(qualified)
        return self.graph.get_attr(qualified)

    def shared(self, key: Hashable, build: Callable[[], torch.fx.Node]) -> torch.fx.Node:
        """One node per ``key`` for the whole graph, built at its first use (which precedes all later ones)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def publish(self, key: Hashable, node: torch.fx.Node) -> None:
        self._published[key] = node

    def published(self, key: Hashable) -> torch.fx.Node | None:
        return self._published.get(key)


def rewrite_attention(gm: torch.fx.GraphModule, decisions: PolicyReport) -> tuple[torch.fx.GraphModule, RewriteReport]:
    """Rewrite ``gm`` in place. Attentions left untouched keep their original nodes."""
    ctx = RewriteContext(gm)
    rewritten = untouched = 0
    for decision in decisions.decisions:
        attention = decision.attention
        match = attention.match
        if decision.untouched is not None:
            untouched += 1
            continue
        ctx.attention = attention
        group = attention.group_size
        with gm.graph.inserting_before(match.output):
            outputs = []
            whole = len(decision.segments) == 1
            for segment in decision.segments:
                ctx.heads = (segment.start, segment.stop)
                ctx.config = segment.config
                ctx.q = match.q if whole else ctx.call(aten.slice.Tensor, match.q, 1, segment.start, segment.stop)
                ctx.k, ctx.v = (
                    node if whole else ctx.call(aten.slice.Tensor, node, 1, segment.start // group, segment.stop // group)
                    for node in (match.k, match.v)
                )
                ctx.attn_mask = _mask_for_heads(ctx, match.attn_mask, attention, segment.start, segment.stop, whole)
                output = segment.spec.method.emit(segment.spec.params, attention, ctx)
                if attention.mask_guard and segment.spec.name != "dense":
                    output = _guard_mask(ctx, attention, output)
                outputs.append(output)
            output = outputs[0] if whole else ctx.call(aten.cat.default, outputs, 1)
        match.output.replace_all_uses_with(output)
        rewritten += 1
    # SDPA counts as a random op (its dropout), which plain DCE never removes; the replaced calls are dead.
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))
    gm.graph.lint()
    gm.recompile()
    return gm, RewriteReport(rewritten, untouched, ctx.ops_emitted, ctx.state_buffers)


def _guard_mask(ctx: RewriteContext, attention: AttentionInfo, output: torch.fx.Node) -> torch.fx.Node:
    """The method assumed the attention's mask causal: check it (once per forward, for all layers sharing it)
    and fall back to dense attention with the mask on calls where it is not."""
    mask = attention.match.attn_mask
    is_causal = ctx.shared(("mask_is_causal", mask.name),
                           lambda: ctx.call(torch.ops.sparsify.mask_is_causal.default, mask))
    ctx.call(torch.ops.sparsify.causal_mask_guard.default, output, is_causal, ctx.q, ctx.k, ctx.v, ctx.attn_mask,
             attention.match.scale)
    return output


def _mask_for_heads(ctx, mask, attention: AttentionInfo, start: int, stop: int, whole: bool):
    if mask is None or whole:
        return mask
    shape = tensor_shape(mask) or ()
    if len(shape) == 4 and shape[1] == attention.q_heads:
        return ctx.call(aten.slice.Tensor, mask, 1, start, stop)
    return mask
