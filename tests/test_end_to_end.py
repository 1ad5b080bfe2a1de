"""generate() end to end on small random Llamas: no N x N tensor in any graph, static caches, padded batches, Inductor
after the rewrite, and the counts that say what really ran."""

import copy
import warnings

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.compiler import RUNTIME_FALLBACK, UNCOMPILED
from sparsify.errors import FallbackWarning
from sparsify.explain import explain_rows
from sparsify.passes.cost_model import CPU_NOMINAL
from sparsify.passes.fx_utils import value_of

PROMPT = 640  # long enough that a (q_len x kv_len) tensor is the largest thing a graph could hold
POLICIES = {
    "dense": "dense",
    "sink_window": {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 16, "window": 64}}]},
    "block_topk": {"rules": [{"when": {"phase": "prefill"}, "use": "block_topk", "with": {"density": 0.25}}]},
    "delta": {"rules": [{"when": {"phase": "prefill"}, "use": "delta",
                         "with": {"gamma": 16, "base": {"use": "sink_window", "with": {"sink": 16, "window": 64}}}}]},
}


def largest_intermediate(compiled) -> tuple[int, str]:
    """(elements, node) of the largest tensor any captured graph computes (parameters and inputs excluded)."""
    largest = (0, "")
    for frame in compiled.sparsify.frames:
        for variant in frame.variants.values():
            for node in variant.result.gm.graph.nodes:
                value = value_of(node)
                if node.op in ("call_function", "call_method") and isinstance(value, torch.Tensor):
                    largest = max(largest, (value.numel(), f"{node.name} {tuple(value.shape)}"))
    return largest


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_no_graph_holds_an_n_by_n_tensor(name, cache):
    model = tiny_model("llama", layers=2)
    compiled = sparsify.compile(model, POLICIES[name], cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, PROMPT))
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = compiled.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, **kwargs)
        if name == "dense":
            assert torch.equal(out, model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False))
    elements, node = largest_intermediate(compiled)
    assert elements < PROMPT * PROMPT // 2, f"{node}: {elements} elements"  # a mask would be PROMPT ** 2
    methods, _ = compiled.sparsify.applied()
    assert methods == (set() if name == "dense" else {name})


def test_static_cache_decode_is_one_graph_for_64_tokens_and_equals_the_model():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        actual = compiled.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                   cache_implementation="static")
    assert torch.equal(actual, expected)
    frames = compiled.sparsify.frames
    assert compiled.sparsify.backend.compilations == 2  # the prefill, then one decode graph for every token
    decode = frames[1].last.annotations.attentions
    assert [a.phase for a in decode] == ["decode"] * 3 and frames[1].calls == 63
    assert decode[0].kv_len == 83  # the cache's capacity (prompt + new tokens - 1); the op reads its filled part


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, position_ids) of a batch whose row b has its first ``pads[b]`` tokens padding, with
    positions counted from each row's first real token, as generate() counts them."""
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# Delta with a short exact tail, so that most rows of each padded row are corrected (the default tail, N % 16 + 128
# rows, would make most of these short rows exact), and its ablation without the correction.
PADDED_POLICIES = {**POLICIES, **{
    name: {"rules": [{"when": {"phase": "prefill"}, "use": "delta", "with": {
        "gamma": 16, "tail": 8, "correct": correct, "base": {"use": "sink_window", "with": {"sink": 16, "window": 64}}}}]}
    for name, correct in (("delta_tail_8", True), ("delta_tail_8_ablation", False))}}


@pytest.mark.parametrize("policy", ["sink_window", "block_topk", "delta", "delta_tail_8", "delta_tail_8_ablation"])
def test_a_left_padded_batch_runs_the_method_sparsely_each_row_as_if_alone(policy):
    model = tiny_model("llama")
    method = PADDED_POLICIES[policy]["rules"][0]["use"]
    compiled = sparsify.compile(model, PADDED_POLICIES[policy], cost_model_fallback=False)
    ids, mask, positions = left_padded(torch.randint(0, 256, (3, 600)), [9, 0, 250])
    with torch.no_grad():
        batched = compiled(ids, attention_mask=mask, position_ids=positions).logits
        for row, pad in enumerate([9, 0, 250]):
            alone = compiled(ids[row:row + 1, pad:]).logits  # one row: no padding, the plain path
            torch.testing.assert_close(batched[row, pad:], alone[0], atol=1e-5, rtol=1e-5)
            assert (alone[0] - model(ids[row:row + 1, pad:]).logits[0]).abs().max() > 1e-3  # the method is sparse
    assert compiled.sparsify.fallback_calls() == {}  # the padded call ran the method, not the guard's dense attention
    batched_frame = compiled.sparsify.frames[0]
    assert all("left-padded rows served sparsely" in row["note"] and row["method"].startswith(method)
               for row in explain_rows(batched_frame.last, batched_frame.current))
    ops = batched_frame.last.rewrite.ops
    assert ops["sparsify.left_padding"] == 1 and ops["sparsify.shift_rows"] == 3 * 4  # q, k, v in; out back


@pytest.mark.parametrize("policy", ["sink_window", "block_topk", "delta"])
def test_a_padded_batch_continued_by_a_chunk_over_its_cache_is_exact(policy):
    """A left-padded batch's prefill, then a chunk of 50 tokens over the cache it filled: the chunk is no plain
    prefill (its queries follow cached keys), so the guard gives it exact attention: what the model itself computes
    over the same cache."""
    model = tiny_model("llama")
    compiled = sparsify.compile(model, PADDED_POLICIES[policy], cost_model_fallback=False)
    ids, mask, _ = left_padded(torch.randint(1, 256, (2, 350)), [20, 0])
    with torch.no_grad():
        cache = compiled(ids[:, :300], attention_mask=mask[:, :300], use_cache=True).past_key_values
        same_cache = copy.deepcopy(cache)
        actual = compiled(ids[:, 300:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        expected = model(ids[:, 300:], attention_mask=mask, past_key_values=same_cache, use_cache=True).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_generate_on_a_left_padded_batch_gives_each_row_its_own_tokens():
    model = tiny_model("llama", layers=2)
    compiled = sparsify.compile(model, POLICIES["sink_window"], cost_model_fallback=False)
    ids, mask, _ = left_padded(torch.randint(1, 256, (2, 150)), [40, 0])
    with torch.no_grad():
        batched = compiled.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        for row, pad in enumerate([40, 0]):
            alone = compiled.generate(ids[row:row + 1, pad:], max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert torch.equal(batched[row, 150:], alone[0, 150 - pad:])
    assert compiled.sparsify.fallback_calls() == {} and compiled.sparsify.applied()[0] == {"sink_window"}


def test_padding_that_is_not_on_the_left_gets_exact_dense_attention_from_a_shifting_method():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, POLICIES["sink_window"], cost_model_fallback=False)
    ids = torch.randint(0, 256, (2, 96))
    mask = torch.ones_like(ids)
    mask[0, 40:45] = 0  # a hole: no shift makes this row start a plain sequence
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        actual = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)  # the guard: exact attention, both rows
    assert compiled.sparsify.fallback_calls() == {RUNTIME_FALLBACK: 3}


def test_a_single_left_padded_row_gets_exact_attention_and_explain_counts_the_dense_calls():
    """Batches of one row are not shifted (a single row is not padded on the left in practice, and the shifts would
    cost it two copies): padding there sends the call to the guard's exact attention, counted."""
    model = tiny_model("llama")
    compiled = sparsify.compile(model, POLICIES["delta"], cost_model_fallback=False)
    ids, mask, _ = left_padded(torch.randint(0, 256, (1, 96)), [9])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        actual = compiled(ids, attention_mask=mask).logits
        compiled(ids, attention_mask=torch.ones_like(mask))  # unpadded: the method runs
    torch.testing.assert_close(actual[0, 9:], expected[0, 9:], atol=1e-5, rtol=1e-5)  # the row's real tokens
    frame = compiled.sparsify.frames[0]
    rows = explain_rows(frame.last, frame.current)
    assert all(row["calls"] == 2 and "ran dense on 1 of 2 calls" in row["note"] for row in rows)
    methods, reasons = compiled.sparsify.applied()
    assert methods == {"delta"} and RUNTIME_FALLBACK in reasons
    assert compiled.sparsify.fallback_calls() == {RUNTIME_FALLBACK: 3}  # one call, three layers


def test_inductor_compiles_the_rewritten_graph():
    model = tiny_model("llama", layers=2)
    policy = POLICIES["sink_window"]
    ids = torch.randint(0, 256, (1, 96))
    with torch.no_grad():
        expected = sparsify.compile(model, policy, cost_model_fallback=False).generate(
            ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        compiled = sparsify.compile(model, policy, cost_model_fallback=False, inductor=True)
        actual = compiled.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(actual, expected)
    assert {frame.current.compiled_by for frame in compiled.sparsify.frames} == {"inductor"}  # no CUDA graphs here


def test_many_call_signatures_stay_compiled_and_eager_runs_are_counted():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, POLICIES["sink_window"], cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 80))
    signatures = [{"output_hidden_states": h, "return_dict": r, "use_cache": c}
                  for h in (False, True) for r in (False, True) for c in (False, True)] + [{"logits_to_keep": 1}]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        for kwargs in signatures:  # nine frames: more than Dynamo's default limit of 8
            compiled(ids, **kwargs)
    assert compiled.sparsify.uncompiled_calls == 0 and compiled.sparsify.backend.compilations >= 9
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), pytest.warns(FallbackWarning):
        compiled(ids)
    assert compiled.sparsify.uncompiled_calls == 3
    assert UNCOMPILED in compiled.sparsify.applied()[1]
    assert "3 attention call(s) ran outside sparsify's graphs" in sparsify.explain(compiled)


def test_compiling_leaves_the_model_alone():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense")
    assert model.config._attn_implementation == "sdpa" and compiled.config._attn_implementation == "sparsify"
    assert compiled.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    assert not hasattr(model.model.layers[0].self_attn, "sparsify_uncompiled_calls")


def test_on_the_gpu_generate_defaults_to_a_static_cache_but_takes_the_one_passed():
    from transformers import GenerationConfig, StaticCache

    from sparsify.hf import generate_with_static_cache, with_default_cache

    unset, static = GenerationConfig(), GenerationConfig(cache_implementation="static")
    assert with_default_cache({}, unset) == {"cache_implementation": "static"}
    assert with_default_cache({"past_key_values": object()}, unset).keys() == {"past_key_values"}
    assert with_default_cache({"cache_implementation": "dynamic"}, unset) == {"cache_implementation": "dynamic"}
    assert with_default_cache({}, static) == {}
    assert with_default_cache({"generation_config": static}, unset) == {"generation_config": static}
    passed = GenerationConfig(max_new_tokens=3)
    asked = with_default_cache({"generation_config": passed}, unset)["generation_config"]
    assert asked.cache_implementation == "static" and asked.max_new_tokens == 3 and passed.cache_implementation is None
    # What a GPU model's generate() runs (installed only there): a static cache of its own, or the one passed in,
    # used as is (transformers refuses a cache beside a configured cache implementation).
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(generate_with_static_cache(compiled, ids, max_new_tokens=4, do_sample=False), expected)
        assert compiled.sparsify.frames[0].last.annotations.attentions[0].static_cache
        cache = StaticCache(config=model.config, max_cache_len=32)
        assert torch.equal(generate_with_static_cache(
            compiled, ids, max_new_tokens=4, do_sample=False, past_key_values=cache), expected)
    assert cache.get_seq_length() == 23  # this cache held the generation: 20 prompt tokens and 3 fed back


def test_generate_again_with_the_same_static_cache_compiles_nothing_new():
    from transformers import StaticCache

    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense")
    ids = torch.randint(0, 256, (1, 20))
    cache = StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(3):
            cache.reset()
            assert torch.equal(compiled.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache),
                               expected)
    assert compiled.sparsify.backend.compilations == 2  # one prefill and one decode graph for all three calls


def test_a_dense_policy_never_loads_the_device_ceilings(monkeypatch):
    """On a GPU without cached ceilings, loading them calibrates (kernel compiles and timings): only sparse
    segments need them."""
    import sparsify.compiler

    loaded = []
    monkeypatch.setattr(sparsify.compiler, "load_ceilings",
                        lambda device, head_dim: loaded.append((device, head_dim)) or CPU_NOMINAL)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        sparsify.compile(tiny_model("llama"), "dense")(ids)
        assert loaded == []
        sparsify.compile(tiny_model("llama"), POLICIES["sink_window"])(ids)
    assert loaded == [(torch.device("cpu"), 16)]  # once per device and head_dim, not per frame or attention
