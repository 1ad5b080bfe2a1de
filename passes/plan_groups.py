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
    """The segment of attention ``consumer`` starting at query head ``consumer_start`` reads the value ``key`` that
    attention ``producer`` (an earlier one) publishes."""

    key: str
    producer: int
    consumer: int
    consumer_start: int


@dataclass(frozen=True)
class GroupReport:
    decisions: PolicyReport
    edges: tuple[SharedEdge, ...]
    fallbacks: int  # consumer segments sent to dense because their producer was not there


def plan_groups(gm: torch.fx.GraphModule, decisions: PolicyReport) -> tuple[torch.fx.GraphModule, GroupReport]:
    producers: dict[str, Decision] = {}  # value name -> the latest attention that publishes it
    missing: dict[str, str] = {}  # value name -> why the latest attention meant to publish it does not
    edges, updated, fallbacks = [], [], 0
    for decision in decisions.decisions:
        segments = []
        for segment in decision.segments:
            needed = segment.spec.method.needs(segment.spec.params, decision.attention)
            if needed is not None and needed not in producers:
                segment = _dense_consumer(segment, needed, missing.get(needed))
                fallbacks += 1
            elif needed is not None:
                edges.append(SharedEdge(needed, producers[needed].attention.index, decision.attention.index,
                                        segment.start))
            segments.append(segment)
        # After the consumers: an attention never reads the value it publishes itself.
        for key, reason in _published_by(decision, segments).items():
            if reason is None:
                producers[key] = decision
                missing.pop(key, None)
            else:
                producers.pop(key, None)
                missing[key] = reason
        updated.append(dataclasses.replace(decision, segments=tuple(segments)))
    return gm, GroupReport(PolicyReport(updated), tuple(edges), fallbacks)


def _published_by(decision: Decision, segments: list[HeadSegment]) -> dict[str, str | None]:
    """Each value this attention's rules meant it to publish: None where it does, else why not. A value is one
    attention's, all heads of it: one segment running its producer method, and no other segment meant to."""
    meant: dict[str, list[HeadSegment]] = {}
    for segment in segments:
        spec = segment.intended or segment.spec
        key = spec.method.provides(spec.params, decision.attention)
        if key is not None:
            meant.setdefault(key, []).append(segment)
    where = decision.attention.module_path or decision.attention.name
    outcome = {}
    for key, meaning in meant.items():
        dense = [s for s in meaning if s.fallback]
        if dense:
            outcome[key] = f"reads {key} from {where}, which runs dense ({dense[0].fallback})"
        elif len(meaning) > 1:
            outcome[key] = (f"reads {key} from {where}, whose heads are split between {len(meaning)} rules that "
                            "each would publish it (a value is one attention's, all heads)")
        else:
            outcome[key] = None
    return outcome


def _dense_consumer(segment: HeadSegment, needed: str, reason: str | None) -> HeadSegment:
    reason = reason or f"reads {needed}, which no earlier attention computes (no rule gives one its producer)"
    return dataclasses.replace(segment, spec=parse_method_spec(DENSE, segment.rule), intended=segment.spec,
                               config=None, predicted="", fallback=reason)
