"""``sparsify.export``: a ``torch.export`` ExportedProgram whose attentions are ``torch.ops.sparsify.*`` ops.

The program round-trips through ``torch.export.save``/``load`` and runs after ``import sparsify`` (which
registers the ops). Decisions are made on the exported shapes: a policy whose rules depend on a length that
the export makes dynamic is refused, since an exported graph cannot re-decide per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .compiler import check_policy_against
from .errors import PolicyError
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

    Decisions (including the cost model's dense fallback, unless ``cost_model_fallback`` is off) are taken for
    the example's shapes. ``program.sparsify_report`` holds the pipeline's reports.
    """
    resolved = Policy.load(policy)
    check_policy_against(model, resolved)
    program = torch.export.export(model, tuple(example_inputs), kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    gm = program.graph_module
    if resolved.depends_on_length:
        _, annotations = analyse(gm, diffusion=diffusion)
        dynamic = [a for a in annotations.attentions if not isinstance(a.kv_len, int)]
        if dynamic:
            rule = next(r for r in resolved.rules if r.when.depends_on_length)
            raise PolicyError(
                f"{rule.describe()}.when: min_seq_len/max_seq_len cannot be decided in an export whose key length is "
                f"dynamic ({dynamic[0].kv_len}); export with static shapes, or drop the length condition"
            )
    device = next((v.device for v in (n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder")
                   if isinstance(v, torch.Tensor) and v.is_floating_point()), torch.device("cpu"))
    result = run_pipeline(gm, resolved, CostModel(load_ceilings(device), cost_model_fallback), diffusion=diffusion)
    _refresh_fake_values(gm)
    program.sparsify_report = result  # for explain-style inspection in the exporting process
    return program


def _refresh_fake_values(gm: torch.fx.GraphModule) -> None:
    """Give the new nodes ``meta['val']`` (serialisation needs it on every node)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta["val"] for n in placeholders]
    fake_mode = torch._guards.detect_fake_mode(values)
    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*values)
