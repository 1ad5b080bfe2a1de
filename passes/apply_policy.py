"""Apply a policy: every matched attention gets, per run of query heads, the method of the first rule that holds.

An attention the method cannot serve (wrong phase, a mask tensor, ...) gets ``dense`` instead, with the reason.
An attention whose form is unsupported (training dropout, ...) is left untouched, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx

from ..errors import PolicyError
from ..methods.base import MethodSpec, parse_method_spec
from ..policy import Policy
from .annotate import AnnotateReport, AttentionInfo

DENSE = "dense"


@dataclass(frozen=True)
class HeadSegment:
    """Query heads ``[start, stop)`` of one attention served by ``spec``, chosen by ``rule``."""

    start: int
    stop: int
    spec: MethodSpec
    rule: str
    fallback: str | None = None
    config: Any = None  # the kernel's launch config, set by the cost model
    intended: MethodSpec | None = None  # with a fallback: the method the rule named
    predicted: str = ""  # the cost model's prediction, for explain


@dataclass(frozen=True)
class Decision:
    attention: AttentionInfo
    segments: tuple[HeadSegment, ...]
    untouched: str | None = None

    @property
    def key(self) -> tuple:
        """What distinguishes two decisions for the same attention (used to cache rewritten graphs)."""
        return tuple((s.start, s.stop, s.spec, s.fallback, s.config) for s in self.segments) + (self.untouched,)


@dataclass
class PolicyReport:
    decisions: list[Decision]

    @property
    def key(self) -> tuple:
        return tuple(d.key for d in self.decisions)


def resolve_attention(attention: AttentionInfo, policy: Policy, seq_len: int | None) -> Decision:
    """The decision for one attention given its key length (None when unknown)."""
    if attention.match.unsupported:
        return Decision(attention, (), untouched=attention.match.unsupported)
    chosen: list[tuple[str, MethodSpec]] = []
    for head in range(attention.q_heads):
        for rule in policy.rules:
            when = rule.when
            if when.heads is not None and head not in when.heads:
                continue
            if when.matches(layer=attention.layer, module_path=attention.module_path,
                            phase=attention.phase, seq_len=seq_len):
                chosen.append((rule.describe(), rule.spec))
                break
        else:
            chosen.append(("default", policy.default))
    segments = []
    start = 0
    for head in range(1, attention.q_heads + 1):
        if head == attention.q_heads or chosen[head] != chosen[start]:
            rule, spec = chosen[start]
            segments.append(_segment(attention, start, head, rule, spec))
            start = head
    return Decision(attention, tuple(segments))


def _segment(attention: AttentionInfo, start: int, stop: int, rule: str, spec: MethodSpec) -> HeadSegment:
    group = attention.group_size
    if start % group or stop % group:
        raise PolicyError(
            f"{rule}.when.heads: query heads {start}-{stop - 1} of {attention.module_path or attention.name} split a "
            f"GQA group of {group} query heads sharing one KV head; give whole groups (multiples of {group})"
        )
    reason = _missing_state(spec, attention) or spec.method.unsupported_reason(spec.params, attention)
    if reason is not None:
        return HeadSegment(start, stop, parse_method_spec(DENSE, rule), rule, fallback=reason, intended=spec)
    return HeadSegment(start, stop, spec, rule)


def _missing_state(spec: MethodSpec, attention: AttentionInfo) -> str | None:
    """Why a method that keeps sequence state cannot have it here: only the ``sparsify`` attention implementation
    (transformers models under ``sparsify.compile``) carries the state into the graph."""
    if spec.method.state_specs(spec.params) and not attention.match.state:
        return (f"{spec.name} keeps sequence state across forwards, which reaches the graph only through "
                "transformers models compiled by sparsify.compile (its attention implementation)")
    return None


def apply_policy(
    gm: torch.fx.GraphModule, annotations: AnnotateReport, policy: Policy, seq_lens: dict[int, int] | None = None
) -> tuple[torch.fx.GraphModule, PolicyReport]:
    """``seq_lens`` gives concrete key lengths (by attention index) where the graph's are symbolic."""
    decisions = []
    for attention in annotations.attentions:
        seq_len = attention.kv_len if isinstance(attention.kv_len, int) else (seq_lens or {}).get(attention.index)
        decisions.append(resolve_attention(attention, policy, seq_len))
    return gm, PolicyReport(decisions)
