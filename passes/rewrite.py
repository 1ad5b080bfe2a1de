"""Rewrite: a copy of the graph with every decided attention replaced by the nodes its method emits
(``torch.ops.sparsify.*``): its plan, then its per-layer run.

Methods emit through a :class:`RewriteContext`, which also gives them what stateful and cross-layer methods
need: the sequence state (``sparsify.state``: per-layer tensors that are graph inputs, owned by the KV cache, read
and mutated by ops that declare the mutation), counters of the graph itself (module buffers), length plans (a
layout that depends on lengths alone: built at capture where the lengths are static, else once per forward,
shared by every layer), nodes shared by every attention with the same key, and values published by one attention
for later ones (a selection made in layer 2, read by layers 3-11).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch
import torch.fx
from torch._dynamo.source import ConstantSource

from .annotate import AttentionInfo
from .apply_policy import PolicyReport
from .fx_utils import copy_graph_module, tensor_shape, value_of

if TYPE_CHECKING:
    from ..distributed import HeadSplit
    from ..state import StateLayout

aten = torch.ops.aten
_UNKNOWN = object()  # an argument of a length plan whose value is only known at run time


@dataclass
class RewriteReport:
    rewritten: int
    untouched: int
    ops: dict[str, int]
    state_buffers: list[str]
    plan_buffers: list[str]  # length plans built at capture (static lengths), kept as buffers of the module


class RewriteContext:
    """What a method sees while it emits the nodes of one attention (one run of query heads of it).

    ``q``, ``k``, ``v`` are nodes of shapes ``(B, Hq', q_len, D)``, ``(B, Hkv', kv_len, D)``,
    ``(B, Hkv', kv_len, Dv)`` for the heads being served; ``attn_mask`` likewise (or None). ``heads`` is the
    served run ``[start, stop)`` of query heads (for methods keeping per-head state), ``config`` the kernel
    launch config the cost model chose.
    """

    def __init__(self, gm: torch.fx.GraphModule, plan_at_capture: bool = True,
                 head_split: HeadSplit | None = None):
        self.gm = gm
        # How a tensor-parallel model's heads are split over ranks (sparsify.distributed.HeadSplit), else None
        self.head_split = head_split
        self.plan_at_capture = plan_at_capture  # off: length plans stay graph nodes (an exported program's)
        self.method_name = ""  # the method emitting now: its sequence state is named "<method>.<tensor>"
        self.state_nodes: dict[str, torch.fx.Node] = {}  # this attention's sequence state, "<method>.<tensor>"
        self.graph = gm.graph
        self._shared: dict[Hashable, Any] = {}
        self._published: dict[Hashable, torch.fx.Node] = {}
        self._plan_values: dict[torch.fx.Node, torch.Tensor] = {}  # a length plan's buffer node -> its tensor
        self.state_buffers: list[str] = []
        self.plan_buffers: list[str] = []
        self.ops_emitted: dict[str, int] = {}
        self.attention: AttentionInfo | None = None
        self.q = self.k = self.v = self.attn_mask = None
        # The mask description of a ``sparsify.attention`` match (else None), and its plain-prefill check node.
        self.key_padding = self.query_offset = self.plain = None
        # Each row's shift (B,) where the rows of a left-padded batch were moved to start at position 0, else None;
        # then also the q, k, v nodes as the call gave them (a static cache's k and v over its first q_len keys).
        self.row_starts: torch.fx.Node | None = None
        self.unshifted: tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | None = None
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

    def length(self, node: torch.fx.Node, dim: int, known: Any) -> int | torch.fx.Node:
        """A length to pass to an op: ``known`` (the annotated length) where it is an int, else the node of
        ``node``'s symbolic size ``dim``."""
        return known if isinstance(known, int) else self.size(node, dim)

    @property
    def device(self) -> torch.device:
        """The device of the attention being replaced (where its plans are built)."""
        return value_of(self.attention.match.q).device

    def _register_buffer(self, qualified: str, tensor: torch.Tensor) -> torch.fx.Node:
        self.gm.register_buffer(qualified, tensor, persistent=False)
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            # Dynamo's graphs name a source for every parameter and buffer, and AOT autograd checks it.
            sources[qualified] = ConstantSource(qualified)
        return self.graph.get_attr(qualified)

    def state(self, name: str, create: Callable[[], torch.Tensor]) -> torch.fx.Node:
        """A buffer of the rewritten module (created once by ``create``), as a ``get_attr`` node.

        Ops that write it must declare the mutation (``mutates_args``) so compilers keep the write.
        """
        qualified = f"sparsify_state_{name}"
        if not hasattr(self.gm, qualified):
            self.state_buffers.append(qualified)
            return self._register_buffer(qualified, create())
        return self.graph.get_attr(qualified)

    def sequence_state(self, name: str) -> torch.fx.Node:
        """The node of this layer's sequence-state tensor ``name`` (one of the method's ``state_specs``), a graph
        input. Ops that write it must declare the mutation (``mutates_args``)."""
        qualified = f"{self.method_name}.{name}"
        if qualified not in self.state_nodes:
            raise KeyError(f"{self.method_name}: no sequence state {name!r} at this attention (it has "
                           f"{', '.join(self.state_nodes) or 'none'}); declare it in state_specs()")
        return self.state_nodes[qualified]

    def shared(self, key: Hashable, build: Callable[[], torch.fx.Node]) -> torch.fx.Node:
        """One node per ``key`` for the whole graph, built at its first use (which precedes all later ones)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def length_plan(self, key: Hashable, target: torch._ops.OpOverload, arguments: Callable[[], tuple]
                    ) -> torch.fx.Node | tuple[torch.fx.Node, ...]:
        """``target(*arguments())`` for an op whose result depends on its arguments' values alone: lengths (ints, or
        nodes of symbolic sizes from :meth:`length`), constants, a device, and other length plans. One per ``key``
        for the whole graph (``arguments`` is called at the key's first use only, so later layers add no nodes).
        Where every argument is known now (a frame of static lengths) the op runs here, at capture, and its result
        is kept as buffers of the rewritten module: every call reuses it, and the graph holds no node building it.
        Otherwise it is one node per forward, shared by every attention that asks for the same key. An op returning
        several tensors gives a tuple of nodes, one per tensor."""
        if key in self._shared:
            return self._shared[key]
        args = arguments()
        known = [self._plan_values.get(a, _UNKNOWN) if isinstance(a, torch.fx.Node) else a for a in args]
        outputs = len(target._schema.returns)
        if not self.plan_at_capture or any(value is _UNKNOWN for value in known):
            node = self.call(target, *args)
            result = tuple(self.call(operator.getitem, node, i) for i in range(outputs)) if outputs > 1 else node
        else:
            values = target(*known)
            nodes = []
            for value in values if outputs > 1 else (values,):
                qualified = f"sparsify_plan_{target._opname}_{len(self.plan_buffers)}"
                self.plan_buffers.append(qualified)
                nodes.append(self._register_buffer(qualified, value))
                self._plan_values[nodes[-1]] = value
            result = tuple(nodes) if outputs > 1 else nodes[0]
        self._shared[key] = result
        return result

    def publish(self, key: Hashable, node: torch.fx.Node) -> None:
        self._published[key] = node

    def published(self, key: Hashable) -> torch.fx.Node | None:
        """The node an earlier attention published under ``key`` (the graph edge from producer to consumer), or
        None. A method that declares ``needs(key)`` always finds it: the group planner (``plan_groups``) leaves it
        sparse only where an earlier attention runs a method that ``provides`` it."""
        return self._published.get(key)


def rewrite_attention(gm: torch.fx.GraphModule, decisions: PolicyReport, state_layout: StateLayout | None = None,
                      plan_at_capture: bool = True, head_split: HeadSplit | None = None
                      ) -> tuple[torch.fx.GraphModule, RewriteReport]:
    """A rewritten copy of ``gm`` (which, like ``decisions``, is left as it is): each decided attention replaced by
    its method's nodes, those left untouched keeping theirs. ``state_layout`` names the sequence-state tensors each
    ``sparsify.attention`` call carries (None: the graph carries none). ``plan_at_capture`` off keeps every length
    plan a node of the graph (a program to save holds no tensors the graph reads as attributes)."""
    gm, copies = copy_graph_module(gm)
    ctx = RewriteContext(gm, plan_at_capture, head_split)
    rewritten = untouched = 0
    replaced: list[torch.fx.Node] = []
    for decision in decisions.decisions:
        attention = _on_copy(decision.attention, copies)
        match = attention.match
        if decision.untouched is not None:
            untouched += 1
            continue
        ctx.attention = attention
        ctx.key_padding, ctx.query_offset = match.key_padding, match.query_offset
        ctx.state_nodes = _state_nodes(state_layout, attention)
        group = attention.group_size
        with gm.graph.inserting_before(match.output):
            if ctx.state_nodes:
                _update_states(ctx, attention, state_layout)
            # The plain-prefill check, where a segment reads it (segments that shift padded rows check padding).
            shifting = [s.spec.name != "dense" and shifts_padded_rows(attention, s) for s in decision.segments]
            ctx.plain = _plain_prefill(ctx, attention) if not all(shifting) else None
            outputs = []
            whole = len(decision.segments) == 1
            for segment in decision.segments:
                sparse = segment.spec.name != "dense"
                ctx.heads = (segment.start, segment.stop)
                ctx.method_name = segment.spec.name if state_layout is None else \
                    state_layout.prefix(attention.layer, segment.spec)
                ctx.config = segment.config
                ctx.q = match.q if whole else ctx.call(aten.slice.Tensor, match.q, 1, segment.start, segment.stop)
                ctx.k, ctx.v = all_k, all_v = tuple(
                    node if whole else ctx.call(aten.slice.Tensor, node, 1, segment.start // group, segment.stop // group)
                    for node in (match.k, match.v)
                )
                if sparse and attention.static_cache:
                    # A static cache's k/v span its capacity; the method reads the first q_len keys (guarded below).
                    ctx.k, ctx.v = (ctx.call(aten.slice.Tensor, node, 2, 0, ctx.size(ctx.q, 2)) for node in (ctx.k, ctx.v))
                ctx.attn_mask = _mask_for_heads(ctx, match.attn_mask, attention, segment.start, segment.stop, whole)
                query = ctx.q  # the guard's exact attention reads the call's own rows
                padded = sparse and shifts_padded_rows(attention, segment)
                ctx.unshifted = None
                if padded:
                    # Each left-padded row moved to start at position 0, as if alone; its output moved back.
                    starts, guard = _left_padding(ctx, attention)
                    ctx.unshifted = (ctx.q, ctx.k, ctx.v)
                    ctx.q, ctx.k, ctx.v = (ctx.call(torch.ops.sparsify.shift_rows.default, node, starts, True)
                                           for node in (ctx.q, ctx.k, ctx.v))
                else:
                    guard = ctx.plain
                ctx.row_starts = starts if padded else None
                output = segment.spec.method.emit(segment.spec.params, attention, ctx)
                if padded:
                    output = ctx.call(torch.ops.sparsify.shift_rows.default, output, starts, False)
                if attention.mask_guard and sparse:
                    output = _guard_mask(ctx, attention, output, fallback_counter(ctx, attention, segment.start))
                if attention.prefill_guard and sparse:
                    ctx.call(torch.ops.sparsify.prefill_guard.default, output, guard, query, all_k, all_v,
                             ctx.key_padding, ctx.query_offset, attention.causal, match.scale,
                             fallback_counter(ctx, attention, segment.start), match.model_window)
                outputs.append(output)
            output = outputs[0] if whole else ctx.call(aten.cat.default, outputs, 1)
        match.output.replace_all_uses_with(output)
        replaced.append(match.output)
        rewritten += 1
    _erase_dead(gm.graph, replaced)
    gm.graph.lint()
    gm.recompile()
    return gm, RewriteReport(rewritten, untouched, ctx.ops_emitted, ctx.state_buffers, ctx.plan_buffers)


def _update_states(ctx: RewriteContext, attention: AttentionInfo, layout: StateLayout) -> None:
    """Each method keeping state in this attention's layer brings it in step with this forward (before any
    segment reads it), over the whole call: all heads, the cache's keys."""
    match = attention.match
    ctx.q, ctx.k, ctx.v, ctx.heads, ctx.config = match.q, match.k, match.v, (0, attention.q_heads), None
    for owner in layout.owners_of(attention.layer):
        ctx.method_name = layout.prefix(attention.layer, owner)
        owner.method.update_state(owner.params, attention, ctx)


def _on_copy(attention: AttentionInfo, copies: dict[torch.fx.Node, torch.fx.Node]) -> AttentionInfo:
    """``attention`` with its match's nodes replaced by their copies in the graph being rewritten."""
    def copied(value):
        return torch.fx.node.map_arg(value, copies.__getitem__)

    match = attention.match
    nodes = {f.name: copied(getattr(match, f.name)) for f in dataclasses.fields(match)
             if isinstance(getattr(match, f.name), (torch.fx.Node, tuple))}
    return dataclasses.replace(attention, match=dataclasses.replace(match, **nodes))


def _state_nodes(layout: StateLayout | None, attention: AttentionInfo) -> dict[str, torch.fx.Node]:
    """This attention's sequence-state nodes by name: the layout's names for its layer, in the op's order. None
    carried (a module without ``layer_idx``, a graph from elsewhere): no state, and stateful methods stay dense
    with the reason (``apply_policy``)."""
    nodes = attention.match.state
    if not nodes:
        return {}
    names = layout.names(attention.layer) if layout is not None and attention.layer is not None else ()
    if len(names) != len(nodes):
        raise RuntimeError(f"sparsify: {attention.module_path or attention.name} carries {len(nodes)} sequence-state "
                           f"tensors, its layer's layout names {len(names)} ({', '.join(names) or 'none'})")
    return dict(zip(names, nodes))


def _erase_dead(graph: torch.fx.Graph, replaced: list[torch.fx.Node]) -> None:
    """Erase the replaced attentions and what only they used (the eager form's scores and softmax, a materialised
    mask). Not a graph-wide dead-code pass: that would also drop in-place writes whose results nobody reads, such as
    a static cache's ``index_copy_``."""
    pending = list(replaced)
    while pending:
        node = pending.pop()
        if node.users or node.op not in ("call_function", "call_method") or _writes_in_place(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        pending.extend(inputs)


def _writes_in_place(node: torch.fx.Node) -> bool:
    target = node.target
    if node.op == "call_method":
        return target.endswith("_")
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return getattr(target, "__name__", "").endswith("_")


def _plain_prefill(ctx: RewriteContext, attention: AttentionInfo) -> torch.fx.Node | None:
    """The shared ``sparsify.prefill_is_plain`` node of a guarded prefill (one per mask description and length)."""
    if not attention.prefill_guard:
        return None
    match = attention.match
    key = ("prefill_is_plain", getattr(match.key_padding, "name", None), getattr(match.query_offset, "name", None),
           str(attention.q_len))
    return ctx.shared(key, lambda: ctx.call(torch.ops.sparsify.prefill_is_plain.default, match.q, match.k,
                                            match.key_padding, match.query_offset))


def shifts_padded_rows(attention: AttentionInfo, segment) -> bool:
    """Whether a guarded prefill segment serves left-padded batches by shifting rows (a method that allows it, on
    a call whose batch may hold more than one row: a single row is never padded on the left in practice, and the
    shifts would only cost it two copies)."""
    return (attention.prefill_guard and segment.spec.method.serves_left_padding(segment.spec.params)
            and not (isinstance(attention.batch, int) and attention.batch == 1))


def _left_padding(ctx: RewriteContext, attention: AttentionInfo) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The shared ``sparsify.left_padding`` of a guarded prefill: (each row's start, whether the call is left padding
    from position 0). One per mask description and length."""
    match = attention.match
    key = ("left_padding", getattr(match.key_padding, "name", None), getattr(match.query_offset, "name", None),
           str(attention.q_len))
    both = ctx.shared(key, lambda: ctx.call(torch.ops.sparsify.left_padding.default, match.q, match.k,
                                            match.key_padding, match.query_offset))
    return (ctx.shared(key + (0,), lambda: ctx.call(operator.getitem, both, 0)),
            ctx.shared(key + (1,), lambda: ctx.call(operator.getitem, both, 1)))


def fallback_counter_name(attention: AttentionInfo, start: int) -> str:
    """The state buffer counting the calls on which a guard replaced a segment's sparse output by dense attention."""
    return f"fallbacks_{attention.index}_{start}"


def fallback_counter(ctx: RewriteContext, attention: AttentionInfo, start: int) -> torch.fx.Node:
    return ctx.state(fallback_counter_name(attention, start), lambda: torch.zeros((), dtype=torch.int64))


def _guard_mask(ctx: RewriteContext, attention: AttentionInfo, output: torch.fx.Node,
                fallbacks: torch.fx.Node) -> torch.fx.Node:
    """The method assumed the attention's mask causal: check it (once per forward, for all layers sharing it)
    and fall back to dense attention with the mask on calls where it is not."""
    mask = attention.match.attn_mask
    is_causal = ctx.shared(("mask_is_causal", mask.name),
                           lambda: ctx.call(torch.ops.sparsify.mask_is_causal.default, mask))
    ctx.call(torch.ops.sparsify.causal_mask_guard.default, output, is_causal, ctx.q, ctx.k, ctx.v, ctx.attn_mask,
             attention.match.scale, fallbacks)
    return output


def _mask_for_heads(ctx, mask, attention: AttentionInfo, start: int, stop: int, whole: bool):
    if mask is None or whole:
        return mask
    shape = tensor_shape(mask) or ()
    if len(shape) == 4 and shape[1] == attention.q_heads:
        return ctx.call(aten.slice.Tensor, mask, 1, start, stop)
    return mask
