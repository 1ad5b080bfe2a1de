"""What sparsify says it did must be what ran: fallbacks counted per call, rules that match nothing, models where
nothing matched, and training attempts."""

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.compiler import RUNTIME_FALLBACK
from sparsify.errors import PolicyWarning, SparsifyError
from sparsify.explain import explain_rows

SINK_WINDOW = {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 4, "window": 16}}]}


def tiny_mistral(sliding_window: int):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
                           attn_implementation="sdpa")
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def test_a_sliding_window_model_runs_exactly_and_explain_counts_each_dense_call():
    model = tiny_mistral(sliding_window=24)
    compiled = sparsify.compile(model, SINK_WINDOW, cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        compiled(ids)
    frame = compiled.sparsify.frames[0]
    rows = explain_rows(frame.last, frame.current)
    # The model's own window makes its mask not causal: the method's answer is replaced on every call, and said so.
    assert all(row["method"].startswith("sink_window") and "ran dense on 2 of 2 calls" in row["note"] for row in rows)
    assert compiled.sparsify.applied() == (set(), {RUNTIME_FALLBACK})
    assert "ran dense on 2 of 2 calls" in sparsify.explain(compiled)


def test_a_rule_that_matches_nothing_is_reported():
    policy = {"rules": [{"when": {"modules": "decoder.*"}, "use": "sink_window"}, {"use": "dense"}]}
    compiled = sparsify.compile(tiny_model("llama"), policy)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 12)))
    assert compiled.sparsify.unused_rules() == ["rules[0]"]
    assert "rules[0] matched no attention in the frames captured so far" in sparsify.explain(compiled)


def test_a_model_without_attention_gets_a_warning():
    compiled = sparsify.compile(torch.nn.Linear(8, 8), "sink_window")
    with pytest.warns(PolicyWarning, match="0 attentions matched in a captured frame"):
        compiled(torch.randn(2, 8))


def test_backward_says_sparsify_is_for_inference():
    compiled = sparsify.compile(tiny_model("llama"), "dense")
    logits = compiled(torch.randint(0, 256, (1, 12))).logits
    with pytest.raises(SparsifyError, match="compute inference only .* torch.no_grad"):
        logits.sum().backward()


def test_explain_prints_the_lengths_of_the_last_call():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, "dense", dynamic=True)
    with torch.no_grad():
        compiled.generate(torch.randint(0, 256, (1, 37)), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prefill, decode = compiled.sparsify.frames
    assert not isinstance(prefill.last.annotations.attentions[0].q_len, int)  # symbolic in the graph
    rows = [explain_rows(frame.last, frame.current) for frame in (prefill, decode)]
    assert {(r["q_len"], r["kv_len"]) for r in rows[0]} == {("37", "37")}
    assert {(r["q_len"], r["kv_len"]) for r in rows[1]} == {("1", "39")}  # the third token's step
    assert "s" not in "".join(r["q_len"] + r["kv_len"] for r in rows[0] + rows[1])
