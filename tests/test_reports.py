"""What sparsify says it did must be what ran: rules that match nothing, models where nothing matched, and training
attempts (fallbacks counted per call: tests/test_end_to_end.py; sliding-window models: tests/test_sliding_window.py)."""

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyWarning, SparsifyError
from sparsify.explain import explain_rows

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
