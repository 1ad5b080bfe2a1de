"""Sequence state (``sparsify.state``): owned by the KV cache, an input of every frame, fresh per generate(), kept
consistent when the cache is reset, cropped or reordered. A test-only method counts, per layer and row, the query
tokens it has seen through the state."""

import pytest
import torch
from conftest import tiny_model
from torch import Tensor

import sparsify
from sparsify.errors import StateError
from sparsify.methods.base import METHODS, AttentionMethod, register_method
from sparsify.methods.dense import DenseParams
from sparsify.state import SequenceState, StateLayout, StateSize, StateSpec, state_of


@torch.library.custom_op("sparsify_test::count_tokens", mutates_args=("seen",))
def count_tokens(seen: Tensor, q: Tensor) -> None:
    """seen (B,) int64 += the call's query length."""
    seen.add_(q.shape[2])


@count_tokens.register_fake
def _(seen, q):
    return None


class CountTokens(AttentionMethod):
    """Exact attention that also counts, in its sequence state, the query tokens each layer has seen."""

    name = "count_tokens"
    Params = DenseParams  # none
    summary = "test only: exact attention, counting the tokens each layer sees"

    def state_specs(self, params):
        return (StateSpec("seen", lambda size: (size.batch,), torch.int64, crop=lambda t, kept: t.fill_(kept)),)

    def unsupported_reason(self, params, attn):
        return None

    def emit(self, params, attn, ctx):
        ctx.call(torch.ops.sparsify_test.count_tokens.default, ctx.sequence_state("seen"), ctx.q)
        if attn.static_cache:  # a static cache's prefill: the rewrite hands sparse methods the first q_len keys
            return ctx.call(torch.ops.sparsify.attention.default, ctx.q, ctx.k, ctx.v, None, None, None, True,
                            attn.match.scale, [])
        return METHODS.get("dense").emit(params, attn, ctx)


@pytest.fixture(autouse=True, scope="module")
def _count_tokens_method():
    """Registered for this module's tests only: other tests list the registry's methods."""
    register_method(CountTokens)
    yield
    METHODS.unregister("count_tokens")


COUNT_ALL = {"rules": [{"when": {"layers": "1-2"}, "use": "count_tokens"}]}
PROMPT, NEW = 20, 5


def seen(cache, layer: int) -> list[int]:
    return state_of(cache).get(layer, "count_tokens.seen").tolist()


def generate(compiled, ids, **kwargs):
    with torch.no_grad():
        return compiled.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 return_dict_in_generate=True, **kwargs)


def test_the_state_counts_across_prefill_and_decode_and_starts_from_zero_in_the_next_generate():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, COUNT_ALL)
    ids = torch.randint(0, 256, (2, PROMPT))
    first = generate(compiled, ids)
    # The prefill's 20 tokens, then 4 fed back (the 5th new token is never a forward's input).
    assert seen(first.past_key_values, 1) == seen(first.past_key_values, 2) == [PROMPT + NEW - 1] * 2
    assert state_of(first.past_key_values).layout.names(0) == ()  # layer 0 keeps no state: no rule picks it
    second = generate(compiled, ids)
    assert seen(second.past_key_values, 1) == [PROMPT + NEW - 1] * 2  # its own cache, its own state, from zero
    assert seen(first.past_key_values, 1) == [PROMPT + NEW - 1] * 2
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(second.sequences, expected)  # the method is exact attention
    ran = {decision.attention.phase for frame in compiled.sparsify.frames for variant in frame.variants.values()
           if variant.calls for decision in variant.result.decisions.decisions for segment in decision.segments
           if segment.spec.name == "count_tokens"}
    assert ran == {"prefill", "decode"}  # both frames ran the method (and so wrote the state)


def test_a_reused_static_cache_starts_each_generate_from_zero_without_recompiling():
    from transformers import StaticCache

    model = tiny_model("llama")
    compiled = sparsify.compile(model, COUNT_ALL)
    ids = torch.randint(0, 256, (1, PROMPT))
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    for _ in range(3):
        cache.reset()
        generate(compiled, ids, past_key_values=cache)
        assert seen(cache, 2) == [PROMPT + NEW - 1]
    assert compiled.sparsify.backend.compilations == 2  # one prefill and one decode graph for all three calls
    assert state_of(cache).capacity == PROMPT + NEW


def with_dynamic_cache():
    """(model, its compiled copy counting tokens, a prompt, an empty DynamicCache)."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    return model, sparsify.compile(model, COUNT_ALL), torch.randint(0, 256, (1, PROMPT)), DynamicCache(config=model.config)


def test_the_state_follows_a_cropped_cache():
    _, compiled, ids, cache = with_dynamic_cache()
    with torch.no_grad():
        compiled(ids, past_key_values=cache, use_cache=True)
        assert seen(cache, 1) == [PROMPT]
        cache.crop(-8)  # drop the last 8 tokens, as assisted decoding drops rejected draft tokens
        assert seen(cache, 1) == [12]
        compiled(ids[:, 12:13], past_key_values=cache, use_cache=True)
    assert seen(cache, 1) == [13] and cache.get_seq_length() == 13


def test_a_cache_filled_by_another_model_is_refused():
    model, compiled, ids, cache = with_dynamic_cache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(StateError, match="already holds 20 tokens that this model's sequence state did not see"):
            compiled(ids[:, :1], past_key_values=cache, use_cache=True)


def test_the_state_follows_reordered_and_selected_rows_and_refuses_a_crop_it_cannot_follow():
    keep = StateSpec("keep", lambda size: (size.batch, 2), torch.float32, crop=lambda t, kept: None)
    fixed = StateSpec("fixed", lambda size: (size.batch, size.capacity), None)  # None: the model's dtype
    state = SequenceState(StateLayout(((("m.keep", keep), ("m.fixed", fixed)),)), StateSize(batch=3, capacity=4),
                          device=torch.device("cpu"), dtype=torch.float16)
    assert state.get(0, "m.fixed").dtype == torch.float16 and state.get(0, "m.keep").dtype == torch.float32
    rows = torch.arange(3, dtype=torch.float32)[:, None]
    state.get(0, "m.keep").copy_(rows.expand(3, 2))
    address = state.get(0, "m.keep").data_ptr()
    state.select_rows(torch.tensor([2, 0, 1]))  # beam search's reorder: in place, the address kept
    assert state.get(0, "m.keep")[:, 0].tolist() == [2.0, 0.0, 1.0] and state.get(0, "m.keep").data_ptr() == address
    state.select_rows(torch.tensor([1]))
    assert state.batch == 1 and state.get(0, "m.keep").tolist() == [[0.0, 0.0]]
    state.repeat_rows(2)
    assert state.batch == 2 and tuple(state.get(0, "m.fixed").shape) == (2, 4)
    with pytest.raises(StateError, match="m.fixed: its method cannot follow a cropped cache"):
        state.crop(2)
    with pytest.raises(KeyError, match="layer 0 has no 'm.other'; it has m.keep, m.fixed"):
        state.get(0, "m.other")
    with pytest.raises(ValueError, match="must start with the batch"):
        SequenceState(StateLayout(((("m.bad", StateSpec("bad", lambda size: (size.capacity,), torch.float32)),),)),
                      StateSize(batch=2, capacity=4), device=torch.device("cpu"))


def test_a_stateful_method_stays_dense_with_its_reason_where_no_state_reaches_the_graph():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = sparsify.compile(Attention(), {"rules": [{"use": "count_tokens"}]})
    q = torch.randn(1, 2, 8, 16)
    with torch.no_grad():
        compiled(q, q, q)
    methods, reasons = compiled.sparsify.applied()
    assert methods == set() and any("keeps sequence state across forwards" in reason for reason in reasons)


def test_inductor_keeps_the_state_updates_of_both_frames():
    """Inductor functionalises the graph: the in-place updates of graph inputs must survive as writes back to the
    cache's state (on a GPU the decode frame replays them as a CUDA graph, which needs their addresses fixed)."""
    from transformers import StaticCache

    model = tiny_model("llama", layers=2)
    compiled = sparsify.compile(model, {"rules": [{"use": "count_tokens"}]}, inductor=True)
    ids = torch.randint(0, 256, (1, PROMPT))
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    generate(compiled, ids, past_key_values=cache)
    assert seen(cache, 0) == seen(cache, 1) == [PROMPT + NEW - 1]
    assert {frame.current.compiled_by for frame in compiled.sparsify.frames} == {"inductor"}


def test_explain_says_which_layers_keep_which_state():
    compiled = sparsify.compile(tiny_model("llama"), COUNT_ALL)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 8)))
    assert ("sequence state (kept with the KV cache, or per request by the diffusion loop): layers 1-2: "
            "count_tokens.seen") in sparsify.explain(compiled)


def test_a_deep_copied_cache_carries_its_own_state():
    """transformers' prompt-reuse recipe deep-copies a filled cache and continues each copy separately."""
    import copy

    _, compiled, ids, cache = with_dynamic_cache()
    with torch.no_grad():
        compiled(ids, past_key_values=cache, use_cache=True)
        copied = copy.deepcopy(cache)
        copied.crop(-5)
        compiled(ids[:, :1], past_key_values=cache, use_cache=True)
    assert seen(copied, 1) == [PROMPT - 5] and copied.get_seq_length() == PROMPT - 5
    assert seen(cache, 1) == [PROMPT + 1] and cache.get_seq_length() == PROMPT + 1


def test_a_forward_without_a_cache_returns_one_that_carries_the_state():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, COUNT_ALL)
    ids = torch.randint(0, 256, (1, PROMPT))
    with torch.no_grad():
        first = compiled(ids, use_cache=True)
        returned = first.past_key_values
        assert seen(returned, 1) == [PROMPT]
        compiled(ids[:, :1], past_key_values=returned, use_cache=True)  # a hand-written decode loop
    assert seen(returned, 1) == [PROMPT + 1]


def test_beam_reordering_of_the_cache_reorders_its_state():
    from transformers import DynamicCache

    model = tiny_model("llama")
    compiled = sparsify.compile(model, COUNT_ALL)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (2, PROMPT)), past_key_values=cache, use_cache=True)
    state_of(cache).get(1, "count_tokens.seen").copy_(torch.tensor([5, 7]))
    cache.reorder_cache(beam_idx=torch.tensor([1, 0]))  # by keyword, as some callers do
    assert seen(cache, 1) == [7, 5]
    cache.batch_repeat_interleave(2)
    assert seen(cache, 1) == [7, 7, 5, 5]
