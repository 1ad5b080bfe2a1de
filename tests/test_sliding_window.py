"""Models whose own mask is a sliding window (Mistral's ``sliding_window``): described, never materialised, and
intersected with a method's pattern instead of falling back to dense."""

import torch
import torch.nn.functional as F

import sparsify
from sparsify.explain import explain_rows
from sparsify.passes.fx_utils import value_of

WINDOW = 24
PROMPT = 300  # long enough that a (q_len x kv_len) mask would be the largest tensor (logits: 300 x 256)


def tiny_mistral(sliding_window: int | None = WINDOW):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           sliding_window=sliding_window, attn_implementation="sdpa")
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def with_both_masks(model, sink: int, window: int):
    """The definition: the model's own (materialised) sliding-window mask AND the method's sink + window."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    def attention(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        positions = torch.arange(k.shape[2] - q.shape[2], k.shape[2])[:, None]
        keys = torch.arange(k.shape[2])[None, :]
        method = (keys <= positions) & ((positions - keys < window) | (keys < sink))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & method, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("both_masks", attention)
    AttentionMaskInterface.register("both_masks", lambda **kw: sdpa_mask(**{**kw, "allow_is_causal_skip": False}))
    model.config._attn_implementation = "both_masks"
    return model


def test_dense_on_a_sliding_window_model_equals_the_model_without_a_quadratic_mask():
    model = tiny_mistral()
    compiled = sparsify.compile(model, "dense")
    ids = torch.randint(0, 256, (1, PROMPT))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        expected = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(compiled.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), expected)
    prefill = compiled.sparsify.frames[0].last
    assert [m.model_window for m in prefill.matches.matches] == [WINDOW] * 3  # described, with its window
    largest = max(value_of(node).numel() for node in prefill.gm.graph.nodes
                  if node.op == "call_function" and isinstance(value_of(node), torch.Tensor))
    assert largest < PROMPT * PROMPT  # no (q_len x kv_len) mask


def test_sink_window_on_a_sliding_window_model_is_both_masks_and_runs_the_sparse_op():
    model = tiny_mistral()
    policy = {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window", "with": {"sink": 4, "window": 40}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, PROMPT))
    with torch.no_grad():
        actual = compiled(ids).logits
        expected = with_both_masks(tiny_mistral(), sink=4, window=40)(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    frame = compiled.sparsify.frames[0]
    assert compiled.sparsify.applied()[0] == {"sink_window"} and compiled.sparsify.fallback_calls() == {}
    assert frame.last.rewrite.ops.get("sparsify.block_sparse_attention") == 3


def test_a_method_that_cannot_intersect_the_window_stays_dense_with_the_reason():
    compiled = sparsify.compile(tiny_mistral(), {"rules": [{"use": "block_topk"}]}, cost_model_fallback=False)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, PROMPT)))
    frame = compiled.sparsify.frames[0]
    notes = {row["note"] for row in explain_rows(frame.last, frame.current)}
    assert notes == {f"fallback: the model's own sliding window ({WINDOW} tokens) is not intersected with "
                     "block_topk's pattern"}
