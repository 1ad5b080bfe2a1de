"""sparsify.compile on random-weight Llama and Qwen2 models: matching, rewriting, decisions, state, recompiles."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyError
from sparsify.explain import explain_rows
from sparsify.methods.base import METHODS, AttentionMethod, register_method
from sparsify.testing import assert_close_to_dense


def last_result(compiled, frame=0):
    return compiled.sparsify.frames[frame].last


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("hf_attention", [True, False])
def test_dense_policy_reproduces_the_model(kind, attn_implementation, hf_attention):
    """With ``hf_attention`` an SDPA model's attention becomes ``sparsify.attention`` (mask described); otherwise
    the model's own SDPA call or eager matmul-softmax-matmul is matched in the traced graph."""
    model = tiny_model(kind, attn_implementation)
    compiled = sparsify.compile(model, "dense", hf_attention=hf_attention)
    ids = torch.randint(0, 256, (2, 40))
    numbers = assert_close_to_dense(model, compiled, ids, atol=1e-5, rtol=1e-5)
    assert numbers["top1_agreement"] == 1.0
    result = last_result(compiled)
    described = hf_attention and attn_implementation == "sdpa"  # eager models keep their own attention
    pattern, op = ("described_mask", "sparsify.attention") if described else (attn_implementation,
                                                                              "sparsify.dense_attention")
    assert result.matches.counts() == {pattern: 3}
    assert result.rewrite.rewritten == 3 and result.rewrite.ops == {op: 3}
    assert model.config._attn_implementation == attn_implementation  # the model itself is unchanged
    infos = result.annotations.attentions
    assert [a.layer for a in infos] == [0, 1, 2]
    assert [(a.q_heads, a.kv_heads, a.head_dim, a.phase) for a in infos] == [(4, 2, 16, "prefill")] * 3
    assert [a.module_path for a in infos] == [f"model.layers.{i}.self_attn" for i in range(3)]
    # The rewritten graph calls the sparsify op and no SDPA or softmax is left.
    targets = {str(n.target) for n in result.gm.graph.nodes}
    assert f"{op}.default" in targets
    assert not any("scaled_dot_product" in t or "softmax" in t for t in targets)
    with torch.no_grad():
        expected = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
        actual = compiled.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(expected, actual)


def test_decode_frames_are_matched_and_not_recompiled_per_token():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        out = compiled.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert out.shape[1] == 84
    frames = compiled.sparsify.frames
    # prefill, the first decode step, then one decode frame with a symbolic cache length for all the rest.
    assert compiled.sparsify.backend.compilations <= 3
    decode = frames[-1]
    assert decode.calls >= 60
    infos = decode.last.annotations.attentions
    assert [a.phase for a in infos] == ["decode"] * 3 and all(a.q_len == 1 for a in infos)
    assert not isinstance(infos[0].kv_len, int)  # symbolic: one graph for every cache length


def test_layer_graph_orders_attentions():
    compiled = sparsify.compile(tiny_model("llama", layers=4), "dense")
    compiled(torch.randint(0, 256, (1, 10)))
    graph = last_result(compiled).annotations.layer_graph
    assert sorted(graph.edges) == [(0, 1), (1, 2), (2, 3)]


RECORDED_LAYERS: list[int] = []


@torch.library.custom_op("sparsify_test::recording_attention", mutates_args=("calls",))
def recording_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, calls: torch.Tensor, layer: int,
                        scale: float) -> torch.Tensor:
    RECORDED_LAYERS.append(layer)
    calls.add_(1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).contiguous()


@recording_attention.register_fake
def _(q, k, v, calls, layer, scale):
    return torch.empty_like(q)


@dataclasses.dataclass(frozen=True)
class RecordingParams:
    tag: str = "x"


@pytest.fixture
def recording_method():
    class Recording(AttentionMethod):
        name = "recording"
        Params = RecordingParams

        def emit(self, params, attn, ctx):
            calls = ctx.state(f"calls_{attn.layer}", lambda: torch.zeros((), dtype=torch.int64))
            return ctx.call(torch.ops.sparsify_test.recording_attention.default, ctx.q, ctx.k, ctx.v, calls,
                            attn.layer, attn.match.scale)

    register_method(Recording)
    RECORDED_LAYERS.clear()
    yield
    METHODS.unregister("recording")


def test_policy_is_honoured_node_by_node(recording_method):
    model = tiny_model("llama", layers=4)
    policy = {"rules": [{"when": {"layers": "0-1"}, "use": "dense"}, {"use": "recording", "with": {"tag": "t"}}]}
    compiled = sparsify.compile(model, policy)
    ids = torch.randint(0, 256, (1, 16))
    assert_close_to_dense(model, compiled, ids, atol=1e-5, rtol=1e-5)
    assert RECORDED_LAYERS == [2, 3]
    rows = explain_rows(last_result(compiled))
    assert [(r["layer"], r["rule"], r["method"]) for r in rows] == [
        (0, "rules[0]", "dense"), (1, "rules[0]", "dense"), (2, "rules[1]", "recording(tag='t')"),
        (3, "rules[1]", "recording(tag='t')")]
    gm = last_result(compiled).gm
    assert gm.sparsify_state_calls_2.item() == 1 and gm.sparsify_state_calls_3.item() == 1
    assert last_result(compiled).rewrite.state_buffers == ["sparsify_state_calls_2", "sparsify_state_calls_3"]
    text = sparsify.explain(compiled)
    assert "recording(tag='t')" in text and "model.layers.3.self_attn" in text


def heads_split_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference for the head-split policy below: in layer 1, query heads 2-3 see a 4-token causal window."""
    length = query.shape[2]
    positions, keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = (keys <= positions).expand(query.shape[1], -1, -1).clone()
    if module.layer_idx == 1:
        mask[2:] &= positions - keys < 4
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def test_head_rules_split_and_rejoin_heads():
    from transformers import AttentionInterface

    AttentionInterface.register("heads_split_reference", heads_split_attention)
    model = tiny_model("llama", heads=4, kv_heads=2)
    reference = tiny_model("llama", "heads_split_reference", heads=4, kv_heads=2)
    policy = {"rules": [{"when": {"heads": "2-3", "layers": "1"}, "use": "sink_window", "with": {"sink": 0, "window": 4}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    rows = explain_rows(last_result(compiled))
    layer1 = [(r["q_heads"], r["method"]) for r in rows if r["layer"] == 1]
    assert layer1 == [("0-1", "dense"), ("2-3", "sink_window(sink=0, window=4)")]


def test_head_rules_must_respect_gqa_groups():
    """Refused by compile() itself, from the model's config, before anything is traced."""
    model = tiny_model("llama", heads=4, kv_heads=2)
    with pytest.raises(PolicyError, match=r"rules\[0\].when.heads: '1' splits a GQA group: query heads 0-1"):
        sparsify.compile(model, {"rules": [{"when": {"heads": "1"}, "use": "dense"}]})


def sink_window_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention for transformers' AttentionInterface: causal sink(2) + window(8) by an explicit mask."""
    length = query.shape[2]
    positions = torch.arange(length)[:, None]
    keys = torch.arange(length)[None, :]
    mask = (keys <= positions) & ((positions - keys < 8) | (keys < 2))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def test_sink_window_in_the_model_equals_a_masked_reference():
    from transformers import AttentionInterface

    AttentionInterface.register("sink_window_reference", sink_window_attention)
    model = tiny_model("llama")
    reference = tiny_model("llama", "sink_window_reference")
    policy = {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 70))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert (compiled(ids).logits - model(ids).logits).abs().max() > 1e-2  # it really is sparse
    result = last_result(compiled)
    assert result.rewrite.ops == {"sparsify.block_sparse_attention": 3}
    # One layout for the three layers, planned at capture (the frame's lengths are static).
    assert result.rewrite.plan_buffers == [f"sparsify_plan_sink_window_layout_{i}" for i in range(4)]


def test_block_topk_runs_in_the_model_and_full_density_is_exact():
    model = tiny_model("llama")
    policy = {"rules": [{"when": {"phase": "prefill"}, "use": "block_topk", "with": {"density": 1.0}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 50))
    assert_close_to_dense(model, compiled, ids, atol=1e-4, rtol=1e-4)
    assert last_result(compiled).rewrite.ops["sparsify.block_topk_layout"] == 3


def test_length_rules_pick_a_variant_per_call_without_recompiling():
    model = tiny_model("llama")
    policy = {"rules": [{"when": {"min_seq_len": 40}, "use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    compiled = sparsify.compile(model, policy, dynamic=True, cost_model_fallback=False)
    with torch.no_grad():
        for length in (30, 50, 35, 60):
            compiled(torch.randint(0, 256, (1, length)))
            methods = {r["method"] for r in explain_rows(last_result(compiled))}
            assert methods == ({"dense"} if length < 40 else {"sink_window(sink=2, window=8)"})
    assert compiled.sparsify.backend.compilations == 1
    assert len(compiled.sparsify.frames[0].variants) == 2


def test_cost_model_keeps_short_prompts_dense_and_says_why():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "sink_window")
    compiled(torch.randint(0, 256, (1, 64)))
    rows = explain_rows(last_result(compiled))
    assert all(r["method"] == "dense" for r in rows)
    assert "cost model: dense is cheaper" in rows[2]["note"] and rows[0]["rule"] == "rules[0]"


class MaskedAttention(torch.nn.Module):
    """One SDPA call with an explicit mask, and one with dropout (active in training mode)."""

    def forward(self, q, k, v, mask):
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0, is_causal=True)
        return masked + dropped


def test_unsupported_forms_stay_dense_with_reasons():
    module = MaskedAttention().train()
    compiled = sparsify.compile(module, {"default": {"use": "block_topk"}}, cost_model_fallback=False)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    compiled(q, k, v, torch.ones(16, 16, dtype=torch.bool))
    rows = explain_rows(last_result(compiled))
    assert rows[0]["method"] == "dense" and "attention mask tensor is given (bool" in rows[0]["note"]
    assert rows[1]["method"].startswith("untouched") and "dropout_p=0.5" in rows[1]["note"]


class RepeatedKV(torch.nn.Module):
    """transformers' SDPA path without ``enable_gqa`` (5.17 with a mask): K/V repeated per query head first."""

    def forward(self, q, k, v, mask):
        def repeat(x):
            batch, heads, length, dim = x.shape
            return x[:, :, None].expand(batch, heads, 2, length, dim).reshape(batch, heads * 2, length, dim)

        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask)


def test_kv_repeated_before_sdpa_is_matched_with_the_kv_heads():
    compiled = sparsify.compile(RepeatedKV(), {"default": {"use": "sink_window", "with": {"sink": 1, "window": 4}}},
                                cost_model_fallback=False)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    positions, keys = torch.arange(16)[:, None], torch.arange(16)[None, :]
    causal = (keys <= positions)[None, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal & ((positions - keys < 4) | (keys < 1)),
                                              enable_gqa=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, causal), expected)
    attention = last_result(compiled).annotations.attentions[0]
    assert (attention.q_heads, attention.kv_heads) == (4, 2)
    assert explain_rows(last_result(compiled))[0]["method"].startswith("sink_window")


class SquareMasked(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_materialised_causal_mask_gets_the_method_and_any_other_mask_dense_per_call():
    """transformers materialises its causal mask when traced (5.17 does in generate()): a 4-D mask on a square
    prefill is taken as causal and checked on every call."""
    module = SquareMasked()
    compiled = sparsify.compile(module, {"default": {"use": "sink_window", "with": {"sink": 1, "window": 4}}},
                                cost_model_fallback=False)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    positions, keys = torch.arange(16)[:, None], torch.arange(16)[None, :]
    causal = (keys <= positions)[None, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal & ((positions - keys < 4) | (keys < 1)))
    additive = torch.zeros(1, 1, 16, 16).masked_fill(~causal, torch.finfo(torch.float32).min)
    padded = causal & (keys >= 3) | (keys == positions)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, causal), expected)
        torch.testing.assert_close(compiled(q, k, v, additive), expected)
        torch.testing.assert_close(compiled(q, k, v, padded), module(q, k, v, padded))
    result = last_result(compiled)
    assert result.rewrite.ops["sparsify.mask_is_causal"] == 1 and result.rewrite.ops["sparsify.causal_mask_guard"] == 1
    assert explain_rows(result)[0]["note"] == "mask tensor checked each call: causal, or dense with it"


def test_the_eager_form_with_its_mask_gets_the_same_sparse_answer_as_sdpa():
    policy = {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    sdpa = tiny_model("llama")
    eager = tiny_model("llama", "eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 256, (1, 60))
    with torch.no_grad():
        from_sdpa = sparsify.compile(sdpa, policy, cost_model_fallback=False, hf_attention=False)(ids).logits
        compiled_eager = sparsify.compile(eager, policy, cost_model_fallback=False, hf_attention=False)
        torch.testing.assert_close(compiled_eager(ids).logits, from_sdpa, atol=1e-5, rtol=1e-5)
        assert (from_sdpa - sdpa(ids).logits).abs().max() > 1e-3
    result = last_result(compiled_eager)
    assert result.matches.counts() == {"eager": 3}
    assert all(row["method"].startswith("sink_window") for row in explain_rows(result))


def test_compile_rejects_out_of_range_policies_before_tracing():
    with pytest.raises(PolicyError, match="out of range for a model with 3 layers"):
        sparsify.compile(tiny_model("llama"), {"rules": [{"when": {"layers": "5"}, "use": "dense"}]})
    with pytest.raises(ValueError, match="phase: 'train' is not allowed"):
        sparsify.compile(tiny_model("llama"), "dense", phase="train")


def test_public_api_is_reachable_from_the_package():
    assert sparsify.testing.assert_close_to_dense is assert_close_to_dense
    assert callable(sparsify.compile) and callable(sparsify.explain) and callable(sparsify.export)


def test_explain_needs_a_compiled_model():
    with pytest.raises(TypeError, match="takes a model returned by sparsify.compile"):
        sparsify.explain(tiny_model("llama"))
    compiled = sparsify.compile(tiny_model("llama"), "dense")
    assert "no frame captured yet" in sparsify.explain(compiled)


def test_several_policies_on_one_model_each_keep_their_own_compile_budget():
    """Copies compiled from one model must not share Dynamo's per-code recompile budget (once spent, Dynamo
    would run the dense forward silently)."""
    model = tiny_model("llama")
    policies = [{"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 1, "window": w}}]}
                for w in (4, 6, 8)]
    compiled = [sparsify.compile(model, p, cost_model_fallback=False) for p in policies]
    with torch.no_grad():
        for length in (20, 24, 28, 32):
            ids = torch.randint(0, 256, (1, length))
            dense = model(ids).logits
            for fast in compiled:
                before = fast.sparsify.calls
                fast.generate(ids, max_new_tokens=3, do_sample=False)
                assert (fast(ids).logits - dense).abs().max() > 1e-3
                assert fast.sparsify.calls > before


SEEN_PREVIOUS: list[bool] = []


@torch.library.custom_op("sparsify_test::with_previous", mutates_args=())
def with_previous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    SEEN_PREVIOUS.append(previous is not None and previous.shape == q.shape)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).contiguous()


@with_previous.register_fake
def _(q, k, v, previous):
    return torch.empty_like(q)


def test_values_flow_from_one_layer_to_later_ones():
    """A method can hand a value from one attention to later ones (LessIsMore's shared selection)."""

    class Relay(AttentionMethod):
        name = "relay"
        Params = RecordingParams

        def emit(self, params, attn, ctx):
            out = ctx.call(torch.ops.sparsify_test.with_previous.default, ctx.q, ctx.k, ctx.v,
                           ctx.published("relay_output"))
            ctx.publish("relay_output", out)
            return out

    register_method(Relay)
    SEEN_PREVIOUS.clear()
    try:
        model = tiny_model("llama", layers=4)
        compiled = sparsify.compile(model, {"rules": [{"when": {"layers": "1-"}, "use": "relay"}]})
        assert_close_to_dense(model, compiled, torch.randint(0, 256, (1, 12)), atol=1e-5, rtol=1e-5)
    finally:
        METHODS.unregister("relay")
    assert SEEN_PREVIOUS == [False, True, True]


def test_cost_model_fallback_does_not_build_a_graph_per_length():
    compiled = sparsify.compile(tiny_model("llama"), "sink_window", dynamic=True)
    with torch.no_grad():
        for length in (30, 41, 52, 63):
            compiled(torch.randint(0, 256, (1, length)))
    frame = compiled.sparsify.frames[0]
    assert compiled.sparsify.backend.compilations == 1 and frame.calls == 4
    # Built at capture: the variant below the cost model's threshold (dense) and the one above (sparse); every
    # length here is below it, so one variant ran all four calls.
    assert len(frame.variants) == 2
    assert sorted(variant.calls for variant in frame.variants.values()) == [0, 4]


def test_a_call_picks_its_variant_without_deciding_again(monkeypatch):
    """Decisions change only at the probed lengths: a call's variant is looked up, not planned again per call."""
    import sparsify.compiler

    policy = {"rules": [{"when": {"max_seq_len": 40}, "use": "dense"}, {"use": "sink_window"}]}
    compiled = sparsify.compile(tiny_model("llama"), policy, dynamic=True, cost_model_fallback=False)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 30)))
        decided = []
        monkeypatch.setattr(sparsify.compiler, "decide", lambda *args: decided.append(args))
        for length in (40, 41, 60):
            compiled(torch.randint(0, 256, (1, length)))
    frame = compiled.sparsify.frames[0]
    assert decided == [] and compiled.sparsify.backend.compilations == 1
    calls = {variant.result.decisions.decisions[0].segments[0].spec.name: variant.calls
             for variant in frame.variants.values()}
    assert calls == {"dense": 2, "sink_window": 2}  # 30 and 40 dense, 41 and 60 sparse
