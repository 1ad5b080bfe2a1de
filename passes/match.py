"""Match every scaled-dot-product attention in a graph.

Patterns live in one registry, :data:`ATTENTION_PATTERNS`; each is a function ``node -> AttentionMatch | None``
tried on every node. Built in: ``sparsify.attention`` (what transformers models call under ``sparsify.compile``,
the mask described rather than materialised), the torch-level ``F.scaled_dot_product_attention`` call, the aten SDPA overloads
(export graphs, or graphs lowered further), and the eager form ``softmax(q @ k^T * scale + mask) @ v`` (HF's
``attn_implementation="eager"``), with HF's ``repeat_kv`` expansion of K/V recognised and removed so the match
carries the true KV heads.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from ..registry import Registry
from .fx_utils import bind, op_kind, tensor_shape, value_of

aten = torch.ops.aten


@dataclass
class AttentionMatch:
    """One attention call found in a graph.

    ``output`` is the node whose value is the attention output ``(B, Hq, q_len, Dv)``; replacing its uses
    replaces the attention. ``q, k, v`` are the nodes of shapes ``(B, Hq, q_len, D)``, ``(B, Hkv, kv_len, D)``,
    ``(B, Hkv, kv_len, Dv)`` (K/V before any GQA repetition). ``scale`` is resolved (never None): a float, or
    the node of a symbolic float (``torch.compile(dynamic=True)`` traces float attributes symbolically).
    ``unsupported`` says why the call must stay exactly as it is (then it is reported, not rewritten).
    ``key_padding`` (B, kv_len) and ``query_offset`` (0-d) are the mask description of the ``sparsify.attention``
    op (transformers models under ``sparsify.compile``): there causality is known from the graph and no mask
    tensor exists; ``is_causal`` then means aligned to the query positions, not SDPA's top-left alignment. ``state``
    holds that op's sequence-state tensors, in the order of ``StateLayout.names(layer)``.
    """

    pattern: str
    output: torch.fx.Node
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    attn_mask: torch.fx.Node | None
    is_causal: bool
    scale: float | torch.fx.Node
    source: str
    unsupported: str | None = None
    key_padding: torch.fx.Node | None = None
    query_offset: torch.fx.Node | None = None
    state: tuple[torch.fx.Node, ...] = ()  # the layer's sequence-state tensors (``sparsify.state``), as graph inputs
    model_window: int = 0  # the model's own sliding window (a described mask), 0 for none

    @property
    def causal_by_position(self) -> bool:
        """``is_causal`` aligned to each query's position (described masks), not SDPA's top-left alignment."""
        return self.pattern == "described_mask"


@dataclass
class MatchReport:
    matches: list[AttentionMatch]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for match in self.matches:
            counts[match.pattern] = counts.get(match.pattern, 0) + 1
        return counts


AttentionPattern = Callable[[torch.fx.Node], "AttentionMatch | None"]
ATTENTION_PATTERNS: Registry[AttentionPattern] = Registry("attention pattern")

_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# aten overloads returning a tuple whose item 0 is the output, with their positional argument names.
_ATEN_TUPLE_SDPA = {
    aten._scaled_dot_product_flash_attention.default: ("query", "key", "value", "dropout_p", "is_causal"),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("query", "key", "value", "dropout_p", "is_causal"),
    aten._scaled_dot_product_efficient_attention.default: (
        "query", "key", "value", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal"),
    aten._scaled_dot_product_cudnn_attention.default: (
        "query", "key", "value", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal"),
}


def source_line(node: torch.fx.Node) -> str:
    """The user-code line a node was traced from (last line of its stack trace), else its name."""
    lines = str(node.meta.get("stack_trace") or "").strip().splitlines()
    return lines[-1].strip() if lines else node.name


def _default_scale(q: torch.fx.Node) -> float:
    return 1.0 / math.sqrt(tensor_shape(q)[-1])


def _sdpa_match(pattern: str, output: torch.fx.Node, args: dict[str, Any]) -> AttentionMatch:
    # K/V repeated to the query heads before the call (transformers' SDPA path does it when it does not pass
    # enable_gqa, e.g. with a mask in transformers 5.17): the kernels take the KV heads themselves.
    q, k, v = args["query"], _strip_gqa_repeat(args["key"]), _strip_gqa_repeat(args["value"])
    if (k is args["key"]) != (v is args["value"]):
        k, v = args["key"], args["value"]  # only one of them repeated: keep the call as it was made
    scale = args.get("scale")
    unsupported = None
    if args.get("dropout_p", 0.0):
        unsupported = f"dropout_p={args['dropout_p']} (training-time dropout is only computed densely)"
    q_heads, kv_heads = tensor_shape(q)[1], tensor_shape(args["key"])[1]
    if q_heads != kv_heads and not args.get("enable_gqa", False) and pattern == "sdpa":
        unsupported = f"q has {q_heads} heads, k {kv_heads}, without enable_gqa (SDPA itself would fail)"
    return AttentionMatch(
        pattern=pattern, output=output, q=q, k=k, v=v, attn_mask=args.get("attn_mask"),
        is_causal=bool(args.get("is_causal", False)),
        scale=_default_scale(q) if scale is None else scale if isinstance(scale, torch.fx.Node) else float(scale),
        source=source_line(output),
        unsupported=unsupported,
    )


def match_torch_sdpa(node: torch.fx.Node) -> AttentionMatch | None:
    """``torch.nn.functional.scaled_dot_product_attention`` (Dynamo graphs) and ``aten.scaled_dot_product_attention``."""
    if node.op != "call_function" or node.target not in (F.scaled_dot_product_attention,
                                                          aten.scaled_dot_product_attention.default):
        return None
    return _sdpa_match("sdpa", node, bind(node, _SDPA_NAMES, _SDPA_DEFAULTS))


def match_described_mask(node: torch.fx.Node) -> AttentionMatch | None:
    """``sparsify.attention``: transformers' attention under ``sparsify.compile`` (see ``sparsify.hf``)."""
    # Dynamo records the packet (torch.ops.sparsify.attention), export the overload (.default).
    if node.op != "call_function" or node.target not in (torch.ops.sparsify.attention,
                                                          torch.ops.sparsify.attention.default):
        return None
    args = bind(node, ("q", "k", "v", "key_padding", "query_offset", "plain", "causal", "scale", "state", "window"),
                {"window": 0})
    return AttentionMatch(
        pattern="described_mask", output=node, q=args["q"], k=args["k"], v=args["v"], attn_mask=None,
        is_causal=bool(args["causal"]), scale=args["scale"], source=source_line(node),
        key_padding=args["key_padding"], query_offset=args["query_offset"], state=tuple(args["state"]),
        model_window=int(args["window"]),
    )


def match_aten_fused_sdpa(node: torch.fx.Node) -> AttentionMatch | None:
    """The backend-specific aten overloads (flash, efficient, cudnn, flash-for-cpu), which return tuples."""
    if node.op != "call_function" or node.target not in _ATEN_TUPLE_SDPA:
        return None
    args = bind(node, _ATEN_TUPLE_SDPA[node.target], {"attn_mask": None, "dropout_p": 0.0, "is_causal": False})
    outputs = [user for user in node.users if user.target is operator.getitem and user.args[1] == 0]
    others = [user for user in node.users if user not in outputs]
    if len(outputs) != 1:
        return None
    match = _sdpa_match("aten_fused_sdpa", outputs[0], args)
    if others and match.unsupported is None:
        match.unsupported = "uses the log-sum-exp or other auxiliary outputs of the fused SDPA op"
    return match


def _strip_gqa_repeat(node: torch.fx.Node) -> torch.fx.Node:
    """``reshape(x[:, :, None].expand(B, Hkv, n_rep, L, D), (B, Hkv*n_rep, L, D))`` -> ``x``; else ``node``.

    Only the head-interleaved repetition (each KV head repeated n_rep times in a row, SDPA's ``enable_gqa``
    order) is removed; the expand's 5-D shape proves that order.
    """
    if op_kind(node) != "reshape":
        return node
    target_shape = tensor_shape(node)
    current = node.args[0]
    saw_interleaved_expand = False
    while isinstance(current, torch.fx.Node) and op_kind(current) in ("expand", "index", "copy", "reshape"):
        shape = tensor_shape(current)
        if op_kind(current) == "expand":
            saw_interleaved_expand = shape is not None and len(shape) == 5
            expand_shape = shape
        current = current.args[0]
        base = tensor_shape(current)
        if saw_interleaved_expand and base is not None and len(base) == 4:
            batch, kv_heads, length, dim = base
            if (expand_shape[0], expand_shape[1], expand_shape[3], expand_shape[4]) == (batch, kv_heads, length, dim) \
                    and target_shape == (batch, kv_heads * expand_shape[2], length, dim):
                return current
    return node


def _is_scalar(value) -> bool:
    """A Python number, or a node whose value is a (possibly symbolic) number."""
    value = value_of(value)
    return isinstance(value, (int, float, torch.SymFloat, torch.SymInt))


def _through(node: torch.fx.Node, kinds: tuple[str, ...]) -> torch.fx.Node:
    while op_kind(node) in kinds:
        node = node.args[0]
    return node


def match_eager(node: torch.fx.Node) -> AttentionMatch | None:
    """``softmax(q @ k.transpose(-2, -1) * scale [+ mask], dim=-1) [.to(dtype)] [dropout] @ v``, anchored at softmax."""
    if op_kind(node) != "softmax":
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    shape = tensor_shape(node)
    if shape is None or len(shape) != 4 or dim not in (-1, 3):
        return None
    # Input side: scores = (q @ kT) * scale, maybe + mask, maybe cast.
    scores = _through(node.args[0], ("cast",))
    mask = None
    if op_kind(scores) == "add":
        left, right = scores.args[0], scores.args[1]
        scores, mask = (left, right) if op_kind(_through(left, ("cast",))) in ("mul", "div", "matmul") else (right, left)
        scores = _through(scores, ("cast",))
    scale = 1.0
    if op_kind(scores) in ("mul", "div") and _is_scalar(scores.args[1]):
        factor = scores.args[1]
        if op_kind(scores) == "mul":
            scale = factor if isinstance(factor, torch.fx.Node) else float(factor)
        elif isinstance(factor, torch.fx.Node):
            return None  # 1/symbolic would need a new node; the match pass changes nothing
        else:
            scale = 1.0 / float(factor)
        scores = scores.args[0]
    if op_kind(scores) != "matmul" or op_kind(scores.args[1]) != "transpose":
        return None
    transpose = scores.args[1]
    if sorted(d % 4 for d in transpose.args[1:3]) != [2, 3]:
        return None
    q, k = scores.args[0], _strip_gqa_repeat(transpose.args[0])
    # Output side: probabilities (maybe cast, maybe dropout) @ v, each step the only user.
    current, unsupported = node, None
    while len(current.users) == 1:
        user = next(iter(current.users))
        if op_kind(user) == "cast" or (op_kind(user) == "dropout" and user.args[0] is current):
            if op_kind(user) == "dropout":
                p = user.kwargs.get("p", user.args[1] if len(user.args) > 1 else 0.5)
                training = user.kwargs.get("training", user.args[2] if len(user.args) > 2 else True)
                if p and training:
                    unsupported = f"dropout p={p} in training mode"
            current = user
            continue
        break
    users = list(current.users)
    if len(users) != 1 or op_kind(users[0]) != "matmul" or users[0].args[0] is not current:
        return None
    output = users[0]
    v = _strip_gqa_repeat(output.args[1])
    if tensor_shape(q) is None or tensor_shape(k) is None or tensor_shape(v) is None:
        return None
    if isinstance(mask, (int, float)):
        return None
    return AttentionMatch(
        pattern="eager", output=output, q=q, k=k, v=v, attn_mask=mask, is_causal=False, scale=scale,
        source=source_line(output), unsupported=unsupported,
    )


ATTENTION_PATTERNS.register("described_mask", match_described_mask)
ATTENTION_PATTERNS.register("sdpa", match_torch_sdpa)
ATTENTION_PATTERNS.register("aten_fused_sdpa", match_aten_fused_sdpa)
ATTENTION_PATTERNS.register("eager", match_eager)


def match_attention(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, MatchReport]:
    """Find every attention call in ``gm`` (graph order). The graph is not changed."""
    matches = []
    for node in gm.graph.nodes:
        for name in ATTENTION_PATTERNS:
            found = ATTENTION_PATTERNS.get(name)(node)
            if found is not None:
                matches.append(found)
                break
    return gm, MatchReport(matches)
