"""Every pass is a function ``GraphModule -> (GraphModule, Report)`` that changes nothing it was given: not the
graph, not its nodes' meta, not the module's attributes, not the reports of earlier passes."""

import functools

import torch
import torch.nn.functional as F
from conftest import tiny_model

import sparsify
from sparsify.passes.annotate import annotate_attention
from sparsify.passes.apply_policy import apply_policy
from sparsify.passes.cost_model import CostModel, cost_model, load_ceilings
from sparsify.passes.match import match_attention
from sparsify.passes.plan_groups import plan_groups
from sparsify.passes.rewrite import rewrite_attention
from sparsify.pipeline import run_pipeline

POLICY = {"rules": [{"when": {"layers": "1-2"}, "use": "delta", "with": {"gamma": 8}}]}


def _fingerprint(gm: torch.fx.GraphModule) -> tuple:
    """What a pass could change in a graph module: its code, each node's target, arguments and meta, and its
    attributes (a buffer registered by a rewrite shows here)."""
    nodes = tuple((n.name, n.op, str(n.target), str(n.args), str(n.kwargs), tuple(sorted(n.meta)))
                  for n in gm.graph.nodes)
    return gm.code, nodes, tuple(sorted(vars(gm))), tuple(name for name, _ in gm.named_buffers())


def test_each_pass_leaves_its_inputs_unchanged():
    compiled = sparsify.compile(tiny_model("llama"), POLICY, cost_model_fallback=False)
    with torch.no_grad():
        compiled(torch.randint(1, 256, (1, 40)))
    frame, = compiled.sparsify.frames
    gm = frame.original
    before = _fingerprint(gm)

    out, matches = match_attention(gm)
    out, annotations = annotate_attention(out, matches)
    out, decisions = apply_policy(out, annotations, compiled.sparsify.policy)
    decided = decisions.key
    costs_on_cpu = CostModel(functools.partial(load_ceilings, torch.device("cpu")), False)
    out, costs = cost_model(out, decisions, costs_on_cpu, None)
    costed = costs.decisions.key
    out, groups = plan_groups(out, costs.decisions)
    rewritten, report = rewrite_attention(out, groups.decisions, frame.state_layout)

    assert _fingerprint(gm) == before
    assert decisions.key == decided and costs.decisions.key == costed
    assert rewritten is not gm and report.rewritten == 3
    ops = {str(n.target) for n in rewritten.graph.nodes}
    assert "sparsify.block_sparse_attention_delta.default" in ops
    assert not any(target.startswith("sparsify.block_sparse") for target in (str(n.target) for n in gm.graph.nodes))
    assert [s.spec.name for d in groups.decisions.decisions for s in d.segments] == ["dense", "delta", "delta"]


def test_the_pipeline_rewrites_a_copy_that_computes_what_the_model_does():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, POLICY, cost_model_fallback=False)
    ids = torch.randint(1, 256, (1, 40))
    with torch.no_grad():
        compiled(ids)
    frame, = compiled.sparsify.frames
    before = _fingerprint(frame.original)
    result = run_pipeline(frame.original, compiled.sparsify.policy, frame.costs, state_layout=frame.state_layout)
    assert _fingerprint(frame.original) == before
    assert result.rewrite.ops["sparsify.block_sparse_attention_delta"] == 2
    # The variant the frame runs was built by the same pipeline from the same unchanged graph.
    assert result.gm.code == frame.current.result.gm.code


def sink_window_from_layer_1(module, q, k, v, mask, dropout=0.0, scaling=None, **kwargs):
    """The definition: layer 0 causal, later layers causal with 2 sink tokens and a window of 8."""
    positions, keys = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    visible = keys <= positions
    if module.layer_idx >= 1:
        visible = visible & ((positions - keys < 8) | (keys < 2))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def test_length_plans_are_built_at_capture_for_static_lengths_and_once_per_forward_otherwise():
    """sink_window's layout depends on lengths alone. The first frame has static lengths: the layout is a buffer
    built at capture and the graph has no node building it. A second length makes Dynamo capture a frame of
    symbolic lengths: one layout node per forward, shared by both sparse layers."""
    from transformers import AttentionInterface

    AttentionInterface.register("sink_window_from_layer_1", sink_window_from_layer_1)
    policy = {"rules": [{"when": {"layers": "1-"}, "use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    compiled = sparsify.compile(tiny_model("llama"), policy, cost_model_fallback=False)
    reference = tiny_model("llama", "sink_window_from_layer_1")
    with torch.no_grad():
        for length in (40, 47):
            ids = torch.randint(1, 256, (1, length))
            torch.testing.assert_close(compiled(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    static, symbolic = (frame.current.result for frame in compiled.sparsify.frames)
    assert static.rewrite.plan_buffers == [f"sparsify_plan_sink_window_layout_{i}" for i in range(4)]
    assert "sparsify.sink_window_layout" not in static.rewrite.ops
    assert static.rewrite.ops["sparsify.block_sparse_attention"] == 2
    assert symbolic.rewrite.plan_buffers == [] and symbolic.rewrite.ops["sparsify.sink_window_layout"] == 1
    assert symbolic.rewrite.ops["sparsify.block_sparse_attention"] == 2
