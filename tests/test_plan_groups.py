"""Group planning (``passes/plan_groups``): a consumer attention reading a value an earlier one publishes is
decided with its producer. Test-only methods: ``pick_keys`` (16 query tokens or more) publishes its keys' mean, and
``reuse_keys`` adds 0 x that mean to exact attention, so its output depends on the producer's node."""

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.explain import explain_rows
from sparsify.methods.base import METHODS, AttentionMethod, register_method
from sparsify.methods.dense import DenseParams
from sparsify.passes.apply_policy import apply_policy
from sparsify.passes.plan_groups import plan_groups

aten = torch.ops.aten
KEY = "test.key_mean"


class PickKeys(AttentionMethod):
    name = "pick_keys"
    Params = DenseParams
    summary = "test only: exact attention that publishes the mean of its keys"

    def provides(self, params, attn):
        return KEY

    def unsupported_reason(self, params, attn):
        known = isinstance(attn.q_len, int)  # a frame Dynamo made dynamic has a symbolic length: refused too
        return None if known and attn.q_len >= 16 else "pick_keys serves 16 query tokens or more"

    def emit(self, params, attn, ctx):
        ctx.publish(KEY, ctx.call(aten.mean.dim, ctx.k, [1, 2]))
        return METHODS.get("dense").emit(params, attn, ctx)


class ReuseKeys(AttentionMethod):
    name = "reuse_keys"
    Params = DenseParams
    summary = "test only: exact attention that reads what pick_keys published"

    def needs(self, params, attn):
        return KEY

    def emit(self, params, attn, ctx):
        out = METHODS.get("dense").emit(params, attn, ctx)
        zero = ctx.call(aten.mul.Tensor, ctx.call(aten.sum.default, ctx.published(KEY)), 0.0)
        return ctx.call(aten.add.Tensor, out, zero)


@pytest.fixture(autouse=True, scope="module")
def _test_methods():
    """Registered for this module's tests only: other tests list the registry's methods."""
    for method in (PickKeys, ReuseKeys):
        register_method(method)
    yield
    for method in (PickKeys, ReuseKeys):
        METHODS.unregister(method.name)


PAIR = {"rules": [{"when": {"layers": 1}, "use": "pick_keys"}, {"when": {"layers": 2}, "use": "reuse_keys"}]}


def test_a_consumer_runs_with_its_producer_and_falls_back_with_it():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, PAIR)
    with torch.no_grad():
        for length in (20, 12):  # two frames: pick_keys serves 16 tokens or more
            ids = torch.randint(0, 256, (1, length))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    long, short = (frame.last for frame in compiled.sparsify.frames)
    assert [s.spec.name for d in long.decisions.decisions for s in d.segments] == ["dense", "pick_keys", "reuse_keys"]
    edge, = long.groups.edges
    assert (edge.key, edge.producer, edge.consumer) == (KEY, 1, 2)
    mean = [n for n in long.gm.graph.nodes if n.target is aten.mean.dim]
    assert len(mean) == 1 and any(user.target is aten.sum.default for user in mean[0].users)  # the graph edge
    assert "reads test.key_mean from model.layers.1.self_attn" in explain_rows(long)[2]["note"]
    # The producer refused the short call, so its consumer runs dense too, and says why.
    assert [s.spec.name for d in short.decisions.decisions for s in d.segments] == ["dense"] * 3
    assert explain_rows(short)[2]["note"] == ("fallback: reads test.key_mean from model.layers.1.self_attn, which "
                                              "runs dense (pick_keys serves 16 query tokens or more)")


def test_a_consumer_without_a_producer_runs_dense_with_the_reason():
    compiled = sparsify.compile(tiny_model("llama"), {"rules": [{"when": {"layers": 2}, "use": "reuse_keys"}]})
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 12)))
    decision = compiled.sparsify.frames[0].last.decisions.decisions[2]
    segment, = decision.segments
    assert segment.spec.name == "dense" and segment.intended.name == "reuse_keys"
    assert segment.fallback == "reads test.key_mean, which no earlier attention computes (no rule gives one its producer)"


def test_group_planning_leaves_the_decisions_it_was_given_unchanged():
    compiled = sparsify.compile(tiny_model("llama"), PAIR)
    with torch.no_grad():
        for length in (20, 12):
            compiled(torch.randint(0, 256, (1, length)))
    short = compiled.sparsify.frames[1]  # pick_keys refuses it
    _, decisions = apply_policy(short.original, short.annotations, compiled.sparsify.policy)
    before = decisions.key
    _, groups = plan_groups(short.original, decisions)
    assert decisions.key == before and [s.spec.name for d in decisions.decisions for s in d.segments][2] == "reuse_keys"
    assert groups.fallbacks == 1 and groups.decisions.decisions[2].segments[0].spec.name == "dense"
