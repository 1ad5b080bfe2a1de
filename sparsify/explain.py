"""``sparsify.explain``: what was matched in each captured frame and what the policy decided for it."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from .pipeline import PipelineResult


def explain_rows(result: PipelineResult) -> list[dict]:
    """One row per attention (per run of heads when a rule splits heads)."""
    rows = []
    for decision in result.decisions.decisions:
        attention = decision.attention
        base = {
            "layer": attention.layer, "module": attention.module_path, "matched": attention.match.pattern,
            "phase": attention.phase, "heads": f"{attention.q_heads}/{attention.kv_heads}",
            "head_dim": attention.head_dim, "q_len": str(attention.q_len), "kv_len": str(attention.kv_len),
            "mask": attention.mask_kind,
        }
        if decision.untouched is not None:
            rows.append({**base, "q_heads": "all", "rule": "-", "method": "untouched (dense, as traced)",
                         "note": decision.untouched})
            continue
        for segment in decision.segments:
            heads = "all" if (segment.start, segment.stop) == (0, attention.q_heads) else f"{segment.start}-{segment.stop - 1}"
            rows.append({**base, "q_heads": heads, "rule": segment.rule, "method": segment.spec.describe(),
                         "note": f"fallback: {segment.fallback}" if segment.fallback else ""})
    return rows


def explain(compiled) -> str:
    """A per-layer table for every frame captured so far (run the model once first)."""
    handle = getattr(compiled, "sparsify", None)
    if handle is None:
        raise TypeError("explain() takes a model returned by sparsify.compile")
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    console.print(handle.policy.describe())
    if not handle.frames:
        console.print("no frame captured yet: call the compiled model once, then explain it")
    for number, frame in enumerate(handle.frames):
        result = frame.last
        if result is None:
            console.print(f"frame {number}: not run yet")
            continue
        counts = ", ".join(f"{k}={v}" for k, v in result.matches.counts().items()) or "none"
        table = Table(title=f"frame {number}: {len(result.matches.matches)} attentions matched ({counts}); "
                            f"{len(frame.variants)} variant(s), {frame.calls} call(s)")
        for column in ("layer", "module", "matched", "phase", "heads", "q_len", "kv_len", "q_heads", "rule",
                       "method", "note"):
            table.add_column(column, overflow="fold")
        for row in explain_rows(result):
            table.add_row(*(str(row[c]) for c in ("layer", "module", "matched", "phase", "heads", "q_len", "kv_len",
                                                  "q_heads", "rule", "method", "note")))
        console.print(table)
    return out.getvalue()
