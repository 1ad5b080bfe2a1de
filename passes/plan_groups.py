"""Plan groups: attentions that hand a value to later ones (a producer layer's token selection, read by its
consumer layers) are decided as one.

The policy and the cost model decide each attention alone; then this pass walks the frame's attentions in graph
order. A method that publishes a value names it (``AttentionMethod.provides``), one that reads it names what it
needs (``AttentionMethod.needs``). A consumer whose value no earlier attention computes (its producer fell back to
dense, for the cost model or a reason its method cannot serve it, or there is none) falls back to dense with that
reason, so no graph reads a value that nobody computed and no consumer silently computes its own. The edges
producer -> consumer are the report's, for ``explain``. Pure: the decisions given are left as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx

from ..methods.base import parse_method_spec
from .apply_policy import DENSE, Decision, HeadSegment, PolicyReport


@dataclass(frozen=True)
class SharedEdge:
    """Attention ``consumer`` reads the value ``key`` that attention ``producer`` (an earlier one) publishes."""

    key: str
    producer: int
    consumer: int


@dataclass(frozen=True)
class GroupReport:
    decisions: PolicyReport
    edges: tuple[SharedEdge, ...]
    fallbacks: int  # consumer segments sent to dense because their producer was not there


def plan_groups(gm: torch.fx.GraphModule, decisions: PolicyReport) -> tuple[torch.fx.GraphModule, GroupReport]:
    running: dict[str, Decision] = {}  # value name -> the latest attention whose method publishes it
    dense_instead: dict[str, tuple[Decision, HeadSegment]] = {}  # value name -> the latest would-be producer, dense
    edges, updated, fallbacks = [], [], 0
    for decision in decisions.decisions:
        segments = []
        for segment in decision.segments:
            needed = segment.spec.method.needs(segment.spec.params)
            if needed is not None and needed not in running:
                segment = _dense_consumer(segment, needed, dense_instead.get(needed))
                fallbacks += 1
            elif needed is not None:
                edges.append(SharedEdge(needed, running[needed].attention.index, decision.attention.index))
            segments.append(segment)
        # After the consumers: an attention never reads the value it publishes itself.
        for segment in segments:
            provided = segment.spec.method.provides(segment.spec.params)
            intended = segment.intended.method.provides(segment.intended.params) if segment.intended else None
            if provided is not None:
                running[provided] = decision
                dense_instead.pop(provided, None)
            elif intended is not None:
                running.pop(intended, None)
                dense_instead[intended] = (decision, segment)
        updated.append(dataclasses.replace(decision, segments=tuple(segments)))
    return gm, GroupReport(PolicyReport(updated), tuple(edges), fallbacks)


def _dense_consumer(segment: HeadSegment, needed: str, producer: tuple[Decision, HeadSegment] | None
                    ) -> HeadSegment:
    if producer is None:
        reason = f"reads {needed}, which no earlier attention computes (no rule gives one its producer)"
    else:
        decision, dense_segment = producer
        where = decision.attention.module_path or decision.attention.name
        reason = f"reads {needed} from {where}, which runs dense ({dense_segment.fallback})"
    return dataclasses.replace(segment, spec=parse_method_spec(DENSE, segment.rule), intended=segment.spec,
                               config=None, predicted="", fallback=reason)
