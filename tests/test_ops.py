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
    layout_args = (q, k, 2, 8, 8, 8)
    torch.library.opcheck(torch.ops.sparsify.sink_window_layout.default, layout_args)
    parts = torch.ops.sparsify.sink_window_layout(*layout_args)
    reference = sink_window_layout(24, 24, 2, 8, 8, 8)
    assert torch.equal(parts[0], reference.kv_num_blocks) and torch.equal(parts[3], reference.full_kv_indices)
    args = (q, k, v, *parts, 8, 8, True, 2, 8, 0.25, 4, 1, False)
    torch.library.opcheck(torch.ops.sparsify.block_sparse_attention.default, args)
    torch.library.opcheck(torch.ops.sparsify.block_topk_layout.default, (q, k, 0.5, 8, 8, 1))


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
