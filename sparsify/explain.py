"""``sparsify.explain``: what was matched in each captured frame and what the policy decided for it."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from .pipeline import PipelineResult
from .rectify import rectify_period


def explain_rows(result: PipelineResult, variant=None) -> list[dict]:
    """One row per attention (per run of heads when a rule splits heads). With the ``variant`` that ran
    ``result``'s graph, each row also says how many calls ran it, on how many a run-time guard ran dense
    attention instead of the method, and the lengths of its last call."""
    from .compiler import runtime_fallbacks
    from .passes.rewrite import shifts_padded_rows

    rows = []
    names = {d.attention.index: d.attention.module_path or d.attention.name for d in result.decisions.decisions}
    for decision in result.decisions.decisions:
        attention = decision.attention
        base = {
            "layer": attention.layer, "module": attention.module_path, "matched": attention.match.pattern,
            "phase": attention.phase, "heads": f"{attention.q_heads}/{attention.kv_heads}",
            "head_dim": attention.head_dim, "q_len": _length(attention, "q_len", variant),
            "kv_len": _length(attention, "kv_len", variant),
            "mask": attention.mask_kind,
        }
        if decision.untouched is not None:
            rows.append({**base, "q_heads": "all", "rule": "-", "method": "untouched (dense, as traced)",
                         "note": decision.untouched})
            continue
        for segment in decision.segments:
            heads = "all" if (segment.start, segment.stop) == (0, attention.q_heads) else f"{segment.start}-{segment.stop - 1}"
            note = (f"fallback: {segment.fallback}" if segment.fallback
                    else segment.spec.method.structure(segment.spec.params, segment.config))
            if attention.mask_guard and segment.spec.name != "dense":
                note = "; ".join(filter(None, [note, "mask tensor checked each call: causal, or dense with it"]))
            if attention.prefill_guard and segment.spec.name != "dense":
                guard = ("left-padded rows served sparsely (each shifted to start at 0); dense on calls with other "
                         "padding or a non-empty cache" if shifts_padded_rows(attention, segment)
                         else "dense on calls with padding or a non-empty cache")
                note = "; ".join(filter(None, [note, guard]))
            reads = [f"reads {edge.key} from {names[edge.producer]}" for edge in result.groups.edges
                     if (edge.consumer, edge.consumer_start) == (attention.index, segment.start)]
            note = "; ".join(filter(None, [note, *reads]))
            row = {**base, "q_heads": heads, "rule": segment.rule, "method": segment.spec.describe(), "note": note}
            if variant is not None:
                dense_calls = runtime_fallbacks(variant, attention, segment)
                row["calls"] = variant.calls
                if dense_calls:
                    row["note"] = "; ".join(filter(None, [row["note"], f"ran dense on {dense_calls} of "
                                                          f"{variant.calls} calls"]))
            rows.append(row)
    return rows


def _length(attention, name: str, variant) -> str:
    """A length as the last call of ``variant`` had it; as the graph has it (an int, or symbolic) before any call."""
    lengths = variant.last_lengths() if variant is not None else {}
    return str(lengths.get((attention.index, name), getattr(attention, name)))


def _state_summary(layout) -> str:
    """Which layers keep which sequence-state tensors (with the KV cache), runs of layers alike on one line."""
    runs: list[tuple[int, int, tuple[str, ...]]] = []
    for layer in range(len(layout.layers)):
        names = layout.names(layer)
        if runs and runs[-1][2] == names and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer, names)
        else:
            runs.append((layer, layer, names))
    parts = [f"layers {a}-{b}: {', '.join(names)}" if a != b else f"layer {a}: {', '.join(names)}"
             for a, b, names in runs if names]
    return ("sequence state (kept with the KV cache, or per request by the diffusion loop): " + "; ".join(parts)
            if parts else "")


def explain(compiled) -> str:
    """A per-layer table for every frame captured so far (run the model once first)."""
    handle = getattr(compiled, "sparsify", None)
    if handle is None:
        raise TypeError("explain() takes a model returned by sparsify.compile")
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    console.print(handle.policy.describe())
    if handle.head_split is not None:
        console.print(handle.head_split.describe())
    state_line = _state_summary(handle.backend.state_layout)
    if state_line:
        console.print(state_line)
        every = rectify_period(handle.policy)
        if every:
            console.print(f"rectification every {every} decode steps: that step runs over the last {every} tokens "
                          f"(a frame of q_len {every} over the cache, decided by the prefill rules), rewriting their K/V")
    if not handle.frames:
        console.print("no frame captured yet: call the compiled model once, then explain it")
    if handle.frames:
        for rule in handle.unused_rules():
            console.print(f"warning: {rule} matched no attention in the frames captured so far: it changed nothing")
    if handle.uncompiled_calls:
        console.print(f"warning: {handle.uncompiled_calls} attention call(s) ran outside sparsify's graphs (Dynamo "
                      "ran the model's own forward): exact dense attention, not the policy's method")
    columns = ("layer", "module", "matched", "phase", "heads", "q_len", "kv_len", "q_heads", "rule", "method",
               "calls", "note")
    for number, frame in enumerate(handle.frames):
        ran = [v for v in frame.variants.values() if v.calls] or ([frame.current] if frame.current else [])
        numbers = {id(v): n for n, v in enumerate(frame.variants.values(), 1)}
        for variant in ran:
            result = variant.result
            counts = ", ".join(f"{k}={v}" for k, v in result.matches.counts().items()) or "none"
            which = f"variant {numbers[id(variant)]} of {len(frame.variants)}"
            table = Table(title=f"frame {number}, {which} ({variant.compiled_by}): {len(result.matches.matches)} "
                                f"attentions matched ({counts}); {variant.calls} of the frame's {frame.calls} call(s)")
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in explain_rows(result, variant):
                table.add_row(*(str(row.get(c, "")) for c in columns))
            console.print(table)
    return out.getvalue()
