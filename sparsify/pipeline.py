"""The pass pipeline on one graph: match -> annotate -> apply policy -> cost model -> rewrite."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from .passes.annotate import AnnotateReport, annotate_attention
from .passes.apply_policy import PolicyReport, apply_policy
from .passes.cost_model import CostModel, CostReport, cost_model
from .passes.match import MatchReport, match_attention
from .passes.rewrite import RewriteReport, rewrite_attention
from .policy import Policy


@dataclass
class PipelineResult:
    gm: torch.fx.GraphModule
    matches: MatchReport
    annotations: AnnotateReport
    decisions: PolicyReport
    costs: CostReport
    rewrite: RewriteReport


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node meta copied), sharing parameters and buffers.

    What Dynamo attaches to its graphs comes along (the module's ``meta``, ``_param_name_to_source``, each
    placeholder's ``_dynamo_source``): AOT autograd reads them to know which inputs keep their addresses (parameters,
    a static cache), without which Inductor will not replay a graph that mutates them as a CUDA graph."""
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copied = torch.fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = dict(gm._param_name_to_source)  # its own: the rewrite adds state buffers
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), copied.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copied


def analyse(gm: torch.fx.GraphModule, *, diffusion: bool = False) -> tuple[MatchReport, AnnotateReport]:
    gm, matches = match_attention(gm)
    gm, annotations = annotate_attention(gm, matches, diffusion=diffusion)
    return matches, annotations


def decide(gm: torch.fx.GraphModule, annotations: AnnotateReport, policy: Policy, costs: CostModel,
           seq_lens: dict[int, int] | None) -> tuple[PolicyReport, CostReport]:
    gm, decisions = apply_policy(gm, annotations, policy, seq_lens)
    gm, report = cost_model(gm, decisions, costs, seq_lens)
    return report.decisions, report


def run_pipeline(
    gm: torch.fx.GraphModule, policy: Policy, costs: CostModel, *, diffusion: bool = False,
    seq_lens: dict[int, int] | None = None,
) -> PipelineResult:
    """Rewrite ``gm`` in place. ``seq_lens`` gives concrete key lengths for attentions whose length is symbolic."""
    matches, annotations = analyse(gm, diffusion=diffusion)
    decisions, cost_report = decide(gm, annotations, policy, costs, seq_lens)
    gm, rewrite = rewrite_attention(gm, decisions)
    return PipelineResult(gm, matches, annotations, decisions, cost_report, rewrite)
