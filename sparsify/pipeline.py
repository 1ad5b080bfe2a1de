"""The pass pipeline on one graph: match -> annotate -> apply policy -> cost model -> rewrite."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from .passes.annotate import AnnotateReport, annotate_attention
from .passes.apply_policy import PolicyReport, apply_policy
from .passes.cost_model import CostModel, CostReport, cost_model
from .passes.match import MatchReport, match_attention
from .passes.plan_groups import GroupReport, plan_groups
from .passes.rewrite import RewriteReport, rewrite_attention
from .policy import Policy
from .state import StateLayout


@dataclass
class PipelineResult:
    gm: torch.fx.GraphModule
    matches: MatchReport
    annotations: AnnotateReport
    decisions: PolicyReport
    costs: CostReport
    rewrite: RewriteReport
    groups: GroupReport


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
           seq_lens: dict[int, int] | None) -> tuple[PolicyReport, CostReport, GroupReport]:
    """Every attention of the frame decided: the policy's method, the cost model's configs and fallbacks, then the
    groups of attentions that share a value decided together. Returns the final decisions and each pass's report."""
    gm, decisions = apply_policy(gm, annotations, policy, seq_lens)
    gm, report = cost_model(gm, decisions, costs, seq_lens)
    gm, groups = plan_groups(gm, report.decisions)
    return groups.decisions, report, groups


def run_pipeline(
    gm: torch.fx.GraphModule, policy: Policy, costs: CostModel, *, diffusion: bool = False,
    seq_lens: dict[int, int] | None = None, state_layout: StateLayout | None = None,
) -> PipelineResult:
    """Rewrite ``gm`` in place. ``seq_lens`` gives concrete key lengths for attentions whose length is symbolic;
    ``state_layout`` names the sequence state the graph's attentions carry."""
    matches, annotations = analyse(gm, diffusion=diffusion)
    decisions, cost_report, groups = decide(gm, annotations, policy, costs, seq_lens)
    gm, rewrite = rewrite_attention(gm, decisions, state_layout)
    return PipelineResult(gm, matches, annotations, decisions, cost_report, rewrite, groups)
