"""Delta Attention: the correction against its definition, exactness limits (gamma = 1, a base that is already
dense), and the whole model against a plain masked-SDPA implementation of the method's definition."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyError
from sparsify.explain import explain_rows
from sparsify.policy import Policy
from sparsify.testing import assert_close_to_dense


def default_tail(length, gamma):
    return min(length, length % gamma + max(128, gamma))


def test_rows_are_strided_then_tail():
    cpu = torch.device("cpu")
    rows = torch.ops.sparsify.delta_rows(300, 16, -1, True, cpu)
    tail = default_tail(300, 16)
    assert torch.equal(rows, torch.cat([torch.arange(0, 300, 16), torch.arange(300 - tail, 300)]))
    assert torch.equal(torch.ops.sparsify.delta_rows(300, 64, 10, True, cpu)[-10:], torch.arange(290, 300))
    assert torch.equal(torch.ops.sparsify.delta_rows(300, 16, -1, False, cpu), torch.arange(300 - tail, 300))


@pytest.mark.parametrize("length,gamma,tail", [(100, 8, -1), (37, 5, 3), (64, 64, 0), (20, 1, -1)])
def test_correction_equals_its_definition(length, gamma, tail):
    sparse = torch.randn(2, 3, length, 8)
    strided = -(-length // gamma)
    exact = default_tail(length, gamma) if tail < 0 else min(length, tail)
    rows = torch.randn(2, 3, strided + exact, 8)
    out = torch.ops.sparsify.delta_correction(sparse, rows, gamma, tail)
    expected = sparse.clone()
    for j in range(length):
        i = j - j % gamma
        expected[:, :, j] = sparse[:, :, j] + rows[:, :, i // gamma] - sparse[:, :, i]
    if exact:
        expected[:, :, length - exact:] = rows[:, :, strided:]
    torch.testing.assert_close(out, expected)


def test_strided_and_tail_rows_are_exact_for_any_base():
    """Whatever the base (here dynamic block top-k), rows i % gamma == 0 and the tail end up exactly dense."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 400, 16), torch.randn(1, 1, 400, 16), torch.randn(1, 1, 400, 16)
    layout = torch.ops.sparsify.block_topk_layout(q, k, 0.2, 16, 16, 1, True)
    sparse, _ = torch.ops.sparsify.block_sparse_attention(q, k, v, *layout, 16, 16, True, 0, 0, 0.25, 4, 1, False)
    rows = torch.ops.sparsify.delta_rows(400, 8, 20, True, q.device)
    layout = torch.ops.sparsify.row_layout(rows, 400, 400, 4, 16, 16)
    out = torch.ops.sparsify.delta_correction(
        sparse, torch.ops.sparsify.row_attention(q, k, v, rows, *layout, 0.25, 16, 16, 4, 1, False), 8, 20)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out[:, :, ::8], dense[:, :, ::8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, -20:], dense[:, :, -20:], atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3 and (out - sparse).abs().max() > 1e-3


def test_row_attention_op_passes_opcheck():
    q, k, v = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    rows = torch.ops.sparsify.delta_rows(50, 8, 6, True, q.device)
    layout = torch.ops.sparsify.row_layout(rows, 50, 50, 2, 16, 16)
    torch.library.opcheck(torch.ops.sparsify.row_layout.default, (rows, 50, 50, 2, 16, 16))
    torch.library.opcheck(torch.ops.sparsify.row_attention.default,
                          (q, k, v, rows, *layout, 0.25, 16, 16, 4, 1, False))
    torch.library.opcheck(torch.ops.sparsify.delta_rows.default, (50, 8, 6, True, q.device))


def delta_policy(gamma=16, window=16, sink=2, tail=None, first_dense="0", **options):
    with_ = {"gamma": gamma, "base": {"use": "sink_window", "with": {"sink": sink, "window": window}}, **options}
    if tail is not None:
        with_["tail"] = tail
    return {"rules": [{"when": {"layers": first_dense}, "use": "dense"},
                      {"when": {"phase": "prefill"}, "use": "delta", "with": with_}]}


def test_gamma_one_is_dense():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, delta_policy(gamma=1), cost_model_fallback=False)
    assert_close_to_dense(model, compiled, torch.randint(0, 256, (1, 150)), atol=1e-4, rtol=1e-4)


def test_a_base_that_sees_everything_is_dense():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, delta_policy(window=4096), cost_model_fallback=False)
    assert_close_to_dense(model, compiled, torch.randint(0, 256, (1, 150)), atol=1e-4, rtol=1e-4)


def delta_definition(module, query, key, value, attention_mask, scaling, dropout=0.0, correct=True, **kwargs):
    """The method by its definition with plain masked SDPA (layer 0 dense), for transformers' AttentionInterface:
    sink 2 + window 16 sparse rows, exact rows i % 16 == 0, their differences spread over their groups, exact tail.
    ``correct=False``: the ablation, sparse rows and the exact tail only."""
    gamma, length = 16, query.shape[2]
    positions, keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    if module.layer_idx == 0:
        return dense.transpose(1, 2).contiguous(), None
    window = (keys <= positions) & ((positions - keys < 16) | (keys < 2))
    sparse = F.scaled_dot_product_attention(query, key, value, attn_mask=window, scale=scaling, enable_gqa=True)
    group_start = (torch.arange(length) // gamma) * gamma
    out = sparse + dense[:, :, group_start] - sparse[:, :, group_start] if correct else sparse.clone()
    tail = default_tail(length, gamma)
    out[:, :, length - tail:] = dense[:, :, length - tail:]
    return out.transpose(1, 2).contiguous(), None


def tail_only_definition(*args, **kwargs):
    return delta_definition(*args, correct=False, **kwargs)


# The frame's lengths are static: the layout and the rows are planned at capture (buffers), not graph nodes.
DELTA_OPS = {"sparsify.attention": 1, "sparsify.row_attention": 2}
DELTA_PLANS = ["sparsify_plan_delta_rows_0", *(f"sparsify_plan_row_layout_{i}" for i in range(1, 6))]


@pytest.mark.parametrize("options,ops,note", [
    ({}, {"sparsify.block_sparse_attention_delta": 2}, "correction fused into the base kernel's epilogue"),
    ({"fuse": False}, {"sparsify.block_sparse_attention": 2, "sparsify.delta_correction": 2},
     "correction in a separate pass: fuse is false"),
    ({"correct": False}, {"sparsify.block_sparse_attention": 2}, "ablation: the base with the exact tail only"),
])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_model_equals_the_plain_definition(heads, kv_heads, options, ops, note):
    from transformers import AttentionInterface

    definition = delta_definition if options.get("correct", True) else tail_only_definition
    AttentionInterface.register(definition.__name__, definition)
    model = tiny_model("llama", heads=heads, kv_heads=kv_heads)
    reference = tiny_model("llama", definition.__name__, heads=heads, kv_heads=kv_heads)
    compiled = sparsify.compile(model, delta_policy(**options), cost_model_fallback=False)
    ids = torch.randint(0, 256, (1, 301))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert (compiled(ids).logits - model(ids).logits).abs().max() > 1e-3
    result = compiled.sparsify.frames[0].last
    assert result.rewrite.ops == {**DELTA_OPS, **ops}
    assert result.rewrite.plan_buffers == DELTA_PLANS + [f"sparsify_plan_sink_window_layout_{i}" for i in range(6, 10)]
    rows = explain_rows(result)
    assert rows[1]["method"].startswith("delta(base=sink_window") and "gamma=16" in rows[1]["method"]
    assert rows[1]["note"].startswith(note)


def test_explain_says_why_the_correction_is_not_fused():
    model = tiny_model("llama")
    compiled = sparsify.compile(model, delta_policy(gamma=24), cost_model_fallback=False)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 100)))
    result = compiled.sparsify.frames[0].last
    assert "sparsify.delta_correction" in result.rewrite.ops
    assert explain_rows(result)[1]["note"].startswith("correction in a separate pass: gamma 24 is not a power of 2")


def test_delta_over_block_topk_runs_in_the_model():
    model = tiny_model("llama")
    policy = {"rules": [{"when": {"phase": "prefill"}, "use": "delta",
                         "with": {"gamma": 8, "base": {"use": "block_topk", "with": {"density": 0.2}}}}]}
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    # 600 tokens: 10 key blocks of 64 (query blocks of 128), a fifth of them kept plus sink and diagonal; the
    # last 128 rows exact.
    numbers = assert_close_to_dense(model, compiled, torch.randint(0, 256, (1, 600)), min_top1_agreement=0.5)
    assert numbers["max_abs_diff"] > 1e-3  # blocks were dropped: not dense in disguise
    assert compiled.sparsify.frames[0].last.rewrite.ops["sparsify.block_topk_layout"] == 3


def test_delta_parameter_errors():
    with pytest.raises(PolicyError, match=r"rules\[0\].with.base.*did you mean 'sink_window'"):
        Policy.load({"rules": [{"use": "delta", "with": {"base": {"use": "sink_windw"}}}]})
    with pytest.raises(PolicyError, match=r"rules\[0\].with.gamma: Input should be greater than or equal to 1"):
        Policy.load({"rules": [{"use": "delta", "with": {"gamma": 0}}]})
    with pytest.raises(PolicyError, match=r"rules\[0\].with: unknown key 'gama'"):
        Policy.load({"rules": [{"use": "delta", "with": {"gama": 8}}]})
    default = Policy.load({"rules": [{"use": "delta"}]}).rules[0].spec.params
    assert (default.gamma, default.tail, default.base.params.window, default.base.params.sink) == (64, None, 2048, 64)


def test_shift_diagnostic_sees_no_shift_when_the_window_covers_every_key():
    from sparsify.benchmarks.delta_shift import layer_numbers

    q, k, v = torch.randn(1, 6, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    covered = layer_numbers(q, k, v, 0.25, window=300)
    assert covered["base_error"] < 1e-6 and covered["delta_error"] < 1e-6 and covered["base_bias"] < 1e-6
    narrow = layer_numbers(q, k, v, 0.25, window=16)
    assert narrow["base_error"] > 0.05 and narrow["delta_error"] > 0.05
    assert all(-1 <= narrow[f"cos_shift_d{d}"] <= 1 for d in (1, 8, 63))


def test_float32_rows_launch_with_the_base_tiles():
    """128x128 float32 tiles with D=128 do not fit an H100's shared memory, and with D=64 run 8x slower."""
    from sparsify.kernels.block_sparse_attention import KernelConfig
    from sparsify.methods.delta import row_launch

    base = KernelConfig(64, 64, 4, 3, use_tma=True)
    assert row_launch(base, torch.float32) == base
    wide = row_launch(base, torch.bfloat16)
    assert (wide.block_m, wide.block_n, wide.num_warps, wide.num_stages, wide.use_tma) == (128, 128, 8, 3, True)


def test_padded_delta_op_passes_opcheck_and_takes_each_rows_tail_from_the_batch_as_given():
    """On shifted rows of lengths 40 and 25 (starts 0 and 15): row b's last min(n_b, tail) rows are the exact
    attention of the batch as given (right-aligned, its padding masked); the others are the base corrected."""
    torch.manual_seed(0)
    length, gamma, tail, starts = 40, 8, 6, torch.tensor([0, 15])
    q, k, v = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16), torch.randn(2, 2, length, 16)
    padding = torch.arange(length)[None, :] >= starts[:, None]
    sparse, strided = torch.randn(2, 4, length, 16), torch.randn(2, 4, -(-length // gamma), 16)
    args = (sparse, strided, q, k, v, padding, starts, 0.25, gamma, tail, True)
    torch.library.opcheck(torch.ops.sparsify.delta_padded.default, args)
    out = torch.ops.sparsify.delta_padded(*args)
    visible = (torch.arange(length)[None, :] <= torch.arange(length)[:, None])[None, None] & padding[:, None, None]
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.25, enable_gqa=True)
    for row, start in enumerate(starts.tolist()):
        real = length - start
        torch.testing.assert_close(out[row, :, real - tail:real], exact[row, :, length - tail:])
        for j in range(real - tail):
            i = j - j % gamma
            torch.testing.assert_close(out[row, :, j], sparse[row, :, j] + strided[row, :, i // gamma] - sparse[row, :, i])
