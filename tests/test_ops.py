"""The custom ops: registration, fake kernels (torch.library.opcheck) and input checks."""

import pytest
import torch

import sparsify  # noqa: F401
from sparsify.errors import ShapeError
from sparsify.kernels.layout import sink_window_layout


def qkv(q_heads=4, kv_heads=2, length=24, dim=16):
    return (torch.randn(1, q_heads, length, dim), torch.randn(1, kv_heads, length, dim),
            torch.randn(1, kv_heads, length, dim))


def test_dense_attention_op_passes_opcheck_and_matches_sdpa():
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.sparsify.dense_attention.default, (q, k, v, None, True, 0.25))
    out = torch.ops.sparsify.dense_attention(q, k, v, None, True, 0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected)


def test_layout_and_block_sparse_ops_pass_opcheck():
    q, k, v = qkv()
    layout_args = (24, 24, 2, 8, 8, 8, 0, q.device)
    torch.library.opcheck(torch.ops.sparsify.sink_window_layout.default, layout_args)
    parts = torch.ops.sparsify.sink_window_layout(*layout_args)
    reference = sink_window_layout(24, 24, 2, 8, 8, 8)
    assert torch.equal(parts[0], reference.kv_num_blocks) and torch.equal(parts[3], reference.full_kv_indices)
    args = (q, k, v, *parts, 8, 8, True, 2, 8, 0.25, 4, 1, False)
    torch.library.opcheck(torch.ops.sparsify.block_sparse_attention.default, args)
    torch.library.opcheck(torch.ops.sparsify.block_topk_layout.default, (q, k, 0.5, 8, 8, 1, True))
    # Longer: each query block keeps fewer candidates than there are key blocks (the index tensors' width).
    long_q, long_k = torch.randn(2, 4, 200, 16), torch.randn(2, 2, 200, 16)
    torch.library.opcheck(torch.ops.sparsify.block_topk_layout.default, (long_q, long_k, 0.1, 8, 8, 1, False))
    torch.library.opcheck(torch.ops.sparsify.block_topk_layout.default,
                          (long_q, long_k, 0.1, 8, 8, 1, True, torch.tensor([0, 30])))


@pytest.mark.parametrize("shapes,message", [
    (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "multiple of key/value heads"),
    (((1, 4, 8, 16), (1, 2, 8, 8), (1, 2, 8, 8)), "head_dim differ"),
    (((4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "must be 4-D"),
    (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), "share batch, heads and length"),
])
def test_ops_reject_bad_shapes(shapes, message):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ShapeError, match=message):
        torch.ops.sparsify.dense_attention(q, k, v, None, False, 1.0)


def test_ops_reject_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(ShapeError, match="share a dtype"):
        torch.ops.sparsify.dense_attention(q, k.double(), v, None, False, 1.0)


def test_left_padding_finds_each_rows_start_and_refuses_other_padding():
    q = torch.randn(3, 2, 6, 4)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    starts, ok = torch.ops.sparsify.left_padding(q, q, padding, None)
    assert starts.tolist() == [2, 0, 5] and bool(ok) and ok.device.type == "cpu"
    hole = padding.clone()
    hole[1, 3] = False
    assert not bool(torch.ops.sparsify.left_padding(q, q, hole, None)[1])  # a hole is not left padding
    assert not bool(torch.ops.sparsify.left_padding(q, q, padding, torch.tensor(4))[1])  # nor a non-empty cache
    assert bool(torch.ops.sparsify.left_padding(q, q, None, None)[1])  # no padding at all: every start 0
    torch.library.opcheck(torch.ops.sparsify.left_padding.default, (q, q, padding, None))


def test_shift_rows_moves_each_row_by_its_start_and_back():
    x = torch.randn(2, 3, 5, 4)
    starts = torch.tensor([2, 0])
    left = torch.ops.sparsify.shift_rows(x, starts, True)
    torch.testing.assert_close(left[0, :, :3], x[0, :, 2:], rtol=0, atol=0)
    assert left[0, :, 3:].abs().sum() == 0 and torch.equal(left[1], x[1])
    back = torch.ops.sparsify.shift_rows(left, starts, False)
    torch.testing.assert_close(back[0, :, 2:], x[0, :, 2:], rtol=0, atol=0)
    assert back[0, :, :2].abs().sum() == 0
    torch.library.opcheck(torch.ops.sparsify.shift_rows.default, (x, starts, True))


@pytest.mark.parametrize("static", [True, False])
def test_a_short_chunk_over_a_longer_cache_runs_the_split_kv_kernel_exactly(static, monkeypatch):
    """A rectification's 8 tokens over a cache of 40 (static: a capacity of 64 with an offset; dynamic: the keys
    end with the chunk), with padding: ``sparsify.attention`` through the split-KV kernel (what CUDA runs; here
    the interpreter) equals the materialised-mask path."""
    from sparsify import ops

    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, 2, 64 if static else 40, 16), torch.randn(2, 2, 64 if static else 40, 16)
    padding = torch.ones(2, k.shape[2], dtype=torch.bool)
    padding[1, :5] = False
    offset = torch.tensor(32) if static else None
    expected = torch.ops.sparsify.attention(q, k, v, padding, offset, None, True, 0.25, [])
    calls = []
    kernel = ops.decode_kernels.decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(ops, "takes_chunk", lambda q, k, v: True)
    monkeypatch.setattr(ops.decode_kernels, "decode_attention", spy)
    actual = torch.ops.sparsify.attention(q, k, v, padding, offset, None, True, 0.25, [])
    assert calls == [q.shape]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
