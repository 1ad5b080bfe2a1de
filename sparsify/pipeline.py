"""The pass pipeline on one graph: match -> annotate -> apply policy -> cost model -> rewrite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx

from .passes.annotate import AnnotateReport, annotate_attention
from .passes.apply_policy import PolicyReport, apply_policy
from .passes.cost_model import CostModel, CostReport, cost_model
from .passes.match import MatchReport, match_attention
from .passes.plan_groups import GroupReport, plan_groups
from .passes.rewrite import RewriteReport, rewrite_attention
from .policy import Policy
from .state import StateLayout

if TYPE_CHECKING:
    from .distributed import HeadSplit


@dataclass
class PipelineResult:
    gm: torch.fx.GraphModule
    matches: MatchReport
    annotations: AnnotateReport
    decisions: PolicyReport
    costs: CostReport
    rewrite: RewriteReport
    groups: GroupReport


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
    seq_lens: dict[int, int] | None = None, state_layout: StateLayout | None = None, plan_at_capture: bool = True,
    head_split: HeadSplit | None = None,
) -> PipelineResult:
    """The rewritten graph (a new module; ``gm`` is left as it is) and every pass's report. ``seq_lens`` gives
    concrete key lengths for attentions whose length is symbolic; ``state_layout`` names the sequence state the
    graph's attentions carry; ``plan_at_capture`` off keeps length plans as graph nodes (for export);
    ``head_split`` says how a tensor-parallel model's heads are split (sparsify.distributed.HeadSplit)."""
    matches, annotations = analyse(gm, diffusion=diffusion)
    decisions, cost_report, groups = decide(gm, annotations, policy, costs, seq_lens)
    gm, rewrite = rewrite_attention(gm, decisions, state_layout, plan_at_capture, head_split)
    return PipelineResult(gm, matches, annotations, decisions, cost_report, rewrite, groups)
