"""``sparsify.export``: a ``torch.export`` ExportedProgram whose attentions are ``torch.ops.sparsify.*`` ops.

The program round-trips through ``torch.export.save``/``load`` and runs after ``import sparsify`` (which
registers the ops). Decisions are made once, on the exported shapes, since an exported graph cannot re-decide
per call: where the export leaves a key length dynamic, anything that would decide by length (a rule's
``min_seq_len``/``max_seq_len``, the cost model's dense fallback) is refused rather than silently ignored.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .compiler import model_head_split, policy_for
from .errors import PolicyError
from .passes.apply_policy import DENSE, resolve_attention
from .passes.cost_model import CostModel, load_ceilings
from .pipeline import analyse, run_pipeline
from .policy import Policy


def export(
    model: torch.nn.Module,
    example_inputs: tuple,
    policy: "Policy | str | dict" = "dense",
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    diffusion: bool = False,
    cost_model_fallback: bool = True,
) -> torch.export.ExportedProgram:
    """Export ``model`` on ``example_inputs`` (and ``kwargs``) with every attention rewritten by ``policy``.

    How the program chooses per length: it does not. The exported graph holds one decision per attention, taken
    here; nothing re-decides when the program runs, unlike ``compile()``, which decides again from each call's
    concrete lengths. So:

    - a static key length (no ``dynamic_shapes``): the policy and, with ``cost_model_fallback`` (the default),
      the cost model decide for the example's length, as ``compile()`` decides for a call of that length (a
      short example stays dense where dense is cheaper). The program is valid at that length.
    - a dynamic key length: one decision must serve every length the export allows, so a decision by length
      is refused with a PolicyError: rules with ``min_seq_len``/``max_seq_len``, and ``cost_model_fallback=True``
      where a sparse method would serve the attention. Pass ``cost_model_fallback=False`` (the policy's method at
      every length, short ones included), or export static shapes, one program per length.

    ``program.sparsify_report`` holds the pipeline's reports. To load the saved program in another process,
    ``import sparsify`` before ``torch.export.load``: that registers the ``sparsify::`` ops. Without it torch
    fails with "We ran into an error when deserializing the saved file" (its warning says it failed to resolve
    ``torch.ops.sparsify.*``), which does not name the fix.
    """
    split = model_head_split(model)
    resolved = policy_for(model, Policy.load(policy), split)
    program = torch.export.export(model, tuple(example_inputs), kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    gm = program.graph_module
    _refuse_decisions_by_dynamic_length(gm, resolved, diffusion=diffusion, cost_model_fallback=cost_model_fallback)
    device = next((v.device for v in (n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder")
                   if isinstance(v, torch.Tensor) and v.is_floating_point()), torch.device("cpu"))
    costs = CostModel(functools.cache(functools.partial(load_ceilings, device)), cost_model_fallback)
    # Length plans stay nodes: a saved program cannot hold tensors its graph reads as attributes.
    result = run_pipeline(gm, resolved, costs, diffusion=diffusion, plan_at_capture=False, head_split=split)
    # The program keeps its own module (its signature names its nodes): the rewritten graph and the buffers the
    # rewrite added move into it.
    for name in result.rewrite.state_buffers:
        gm.register_buffer(name, getattr(result.gm, name), persistent=False)
    gm.graph = result.gm.graph
    gm.recompile()
    _refresh_fake_values(gm)
    program.sparsify_report = result  # for explain-style inspection in the exporting process
    return program


def _refuse_decisions_by_dynamic_length(gm: torch.fx.GraphModule, policy: Policy, *, diffusion: bool,
                                        cost_model_fallback: bool) -> None:
    """Raise where a decision would depend on a key length the export leaves dynamic (see :func:`export`)."""
    if not (policy.depends_on_length or (cost_model_fallback and policy.uses_sparse_methods)):
        return
    _, annotations = analyse(gm, diffusion=diffusion)
    dynamic = [a for a in annotations.attentions if not isinstance(a.kv_len, int)]
    if not dynamic:
        return
    if policy.depends_on_length:
        rule = next(r for r in policy.rules if r.when.depends_on_length)
        raise PolicyError(
            f"{rule.describe()}.when: min_seq_len/max_seq_len cannot be decided in an export whose key length is "
            f"dynamic ({dynamic[0].kv_len}); export with static shapes, or drop the length condition"
        )
    # Where the policy's method cannot serve an attention, the segment is dense already: nothing to decide there.
    sparse = next(((attention, segment) for attention in dynamic
                   for segment in resolve_attention(attention, policy, None).segments
                   if segment.spec.name != DENSE), None)
    if sparse is not None:
        attention, segment = sparse
        raise PolicyError(
            f"cost_model_fallback: True cannot be honoured in an export whose key length is dynamic "
            f"({attention.kv_len} at {attention.module_path or attention.name}): the cost model keeps "
            f"{segment.spec.name} dense at lengths where dense is cheaper, and an exported program cannot re-decide "
            f"per call; pass cost_model_fallback=False ({segment.spec.name} at every length), or export with "
            f"static shapes (decided for that length)"
        )


def _refresh_fake_values(gm: torch.fx.GraphModule) -> None:
    """Give the new nodes ``meta['val']`` (serialisation needs it on every node)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta["val"] for n in placeholders]
    fake_mode = torch._guards.detect_fake_mode(values)
    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*values)
