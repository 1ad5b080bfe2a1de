"""Drawing a method's block pattern for one layer and head of a model (``sparsify explain --plot``): the real
queries and keys of that layer on a prompt, the layout the method builds from them, as a picture."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SparsifyError
from .plots import block_pattern


def capture_qk(model, module_path: str, ids):
    """Queries and keys (after rotary embedding) of one HF attention module on ``ids``: (B, H, L, D) each."""
    import sys

    module = model.get_submodule(module_path)
    captured = {}

    def hook(mod, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["position_embeddings"] = kwargs.get("position_embeddings")

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if not all(hasattr(module, name) for name in ("q_proj", "k_proj", "head_dim")) or rotary is None \
            or captured.get("position_embeddings") is None:
        raise SparsifyError(f"explain --plot: {module_path} is not an HF attention with q_proj, k_proj and rotary "
                            "embeddings; patterns can be drawn for Llama/Qwen/Mistral-style models")
    hidden = captured["hidden"]
    batch, length = hidden.shape[:2]
    q = module.q_proj(hidden).view(batch, length, -1, module.head_dim).transpose(1, 2)
    k = module.k_proj(hidden).view(batch, length, -1, module.head_dim).transpose(1, 2)
    cos, sin = captured["position_embeddings"]
    with torch.no_grad():
        return rotary(q, k, cos, sin)


def plot_pattern(model, compiled, ids, layer: int, head: int, path: Path) -> Path:
    """Draw the blocks the policy's method visits for one layer and query head (run ``compiled`` on ``ids`` first)."""
    result = compiled.sparsify.frames[0].last
    decision = next((d for d in result.decisions.decisions if d.attention.layer == layer), None)
    if decision is None:
        layers = sorted({d.attention.layer for d in result.decisions.decisions})
        raise SparsifyError(f"--layer: {layer} is not a layer of this model ({layers[0]}-{layers[-1]})")
    segment = next((s for s in decision.segments if s.start <= head < s.stop), None)
    if segment is None:
        raise SparsifyError(f"--head: {head} is not a query head of layer {layer} (0-{decision.attention.q_heads - 1})")
    q, k = capture_qk(model, decision.attention.module_path, ids)
    config = segment.config or compiled.sparsify.backend.ceilings(q.device, q.shape[-1]).config_for(q.shape[-1])
    layout = segment.spec.method.layout(segment.spec.params, q.float(), k.float(), config)
    if layout is None:
        raise SparsifyError(f"explain --plot: method {segment.spec.name} has no block layout to draw")
    full, partial = layout.block_masks()
    pick = (0, min(head, full.shape[1] - 1))
    title = f"layer {layer}, head {head}: {segment.spec.describe()}" + (f" (fallback: {segment.fallback})"
                                                                        if segment.fallback else "")
    return block_pattern(full[pick], partial[pick], Path(path), title[:110])
