"""Small helpers that read FX graphs the same way at the torch level (Dynamo) and the aten level (export)."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

aten = torch.ops.aten

# Each kind lists the call targets (functions or aten overloads) and tensor method names that compute it.
_KINDS: dict[str, tuple[tuple[Any, ...], tuple[str, ...]]] = {
    "matmul": ((torch.matmul, operator.matmul, aten.matmul.default), ("matmul",)),
    "transpose": ((torch.transpose, aten.transpose.int), ("transpose",)),
    "mul": ((operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar), ("mul",)),
    "div": ((operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar), ("div",)),
    "add": ((operator.add, torch.add, aten.add.Tensor), ("add",)),
    "softmax": ((F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default), ("softmax",)),
    "cast": ((aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout), ("to", "float", "type")),
    "dropout": ((F.dropout, aten.dropout.default), ("dropout",)),
    "expand": ((aten.expand.default,), ("expand",)),
    "reshape": ((torch.reshape, aten.reshape.default, aten.view.default, aten._unsafe_view.default),
                ("reshape", "view")),
    "index": ((operator.getitem, aten.slice.Tensor, aten.unsqueeze.default), ("unsqueeze",)),
    "copy": ((aten.clone.default, aten.contiguous.default), ("contiguous", "clone")),
}


def op_kind(node: torch.fx.Node) -> str | None:
    """The kind of computation of ``node`` ("matmul", "softmax", ...), or None for anything else."""
    for kind, (targets, methods) in _KINDS.items():
        if node.op == "call_function" and node.target in targets:
            return kind
        if node.op == "call_method" and node.target in methods:
            return kind
    return None


def value_of(node: Any) -> Any:
    """The fake value a node carries (Dynamo writes ``example_value``, export ``val``); constants pass through."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_shape(node: Any) -> tuple | None:
    value = value_of(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def bind(node: torch.fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Arguments of ``node`` by name, given the positional names of its callee (``self`` first for methods)."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def module_path(node: torch.fx.Node) -> str:
    """The path of the innermost module a node was traced in, e.g. ``model.layers.3.self_attn``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo writes L['self'].model.layers.3 (the traced function's local holding the root module, whatever its
    # name) or L['self']._modules['model']...; export writes model.layers.3.
    path = re.sub(r"^(?:[LG]\['[^']+'\]|self)\.?", "", path)
    return path.replace("._modules['", ".").replace("['", ".").replace("']", "")


def copy_graph_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, torch.fx.Node]]:
    """A new GraphModule over a copy of ``gm``'s graph (node meta copied), sharing parameters and buffers, and the
    map from each node of ``gm`` to its copy.

    What Dynamo attaches to its graphs comes along (the module's ``meta``, ``_param_name_to_source``, each
    placeholder's ``_dynamo_source``): AOT autograd reads them to know which inputs keep their addresses (parameters,
    a static cache), without which Inductor will not replay a graph that mutates them as a CUDA graph."""
    graph = torch.fx.Graph()
    nodes: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, nodes)
    graph.output(output)
    copied = torch.fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = dict(gm._param_name_to_source)  # its own: the rewrite adds buffers
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), copied.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copied, nodes
