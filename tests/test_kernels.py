"""The block-sparse kernel against its plain reference and against SDPA with the equivalent boolean mask, and
the layout builders against their token-level definitions. Fresh random inputs each run; small shapes (the
kernel runs under the Triton interpreter on CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.errors import ShapeError
from sparsify.kernels.block_sparse_attention import (KernelConfig, block_sparse_attention,
                                                      block_sparse_attention_reference, stages_that_fit)
from sparsify.kernels.layout import (BlockLayout, TokenMask, block_topk_layout, causal_layout, dense_layout,
                                     from_block_masks, Geometry, sink_window_layout, strided_layout)


def random_qkv(batch, q_heads, kv_heads, q_len, kv_len, dim, dtype=torch.float32):
    q = torch.randn(batch, q_heads, q_len, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    return q, k, v


def masked_sdpa(q, k, v, mask):
    """Dense SDPA with a boolean mask, rows without keys set to 0 (SDPA would give NaN there)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(mask.any(-1, keepdim=True), out, 0.0)


def check_against_references(q, k, v, layout, config):
    out, lse = block_sparse_attention(q, k, v, layout, config=config)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, layout)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    assert not out.isnan().any() and not lse.isnan().any()
    mask = layout.to_dense_mask().expand(q.shape[0], q.shape[1], -1, -1)
    torch.testing.assert_close(out, masked_sdpa(q, k, v, mask), atol=2e-5, rtol=2e-5)
    return out, lse


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_full_layout_equals_dense_sdpa(group, causal):
    q, k, v = random_qkv(2, 4, 4 // group, 45, 45, 32)
    build = causal_layout if causal else dense_layout
    layout = build(45, 45, 16, 16)
    out, _ = check_against_references(q, k, v, layout, KernelConfig(16, 16, 4, 1))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_len,kv_len,dim", [(37, 37, 64), (17, 53, 24), (1, 29, 16), (64, 64, 40)])
def test_kernel_odd_lengths_and_head_dims(q_len, kv_len, dim):
    q, k, v = random_qkv(1, 3, 1, q_len, kv_len, dim)
    check_against_references(q, k, v, causal_layout(q_len, kv_len, 16, 16), KernelConfig(16, 16, 4, 1))


@pytest.mark.parametrize("length,sink,window,block_n", [(70, 0, 8, 32), (70, 5, 20, 32), (70, 16, 16, 32),
                                                         (70, 40, 3, 32), (300, 20, 64, 16), (300, 64, 96, 16)])
def test_kernel_sink_window(length, sink, window, block_n):
    """Long enough rows exercise the kernel's walk: sink blocks by index, the window's run by arithmetic."""
    q, k, v = random_qkv(1, 4, 2, length, length, 16)
    layout = sink_window_layout(length, length, sink, window, 16, block_n)
    check_against_references(q, k, v, layout, KernelConfig(16, block_n, 4, 1))


@pytest.mark.parametrize("sink,window,limit", [(20, 64, 40), (16, 30, 100), (0, 300, 50), (5, 8, 8)])
def test_kernel_sink_window_under_a_model_limit(sink, window, limit):
    """A model's own sliding window (``limit``) intersected with sink + window: the sink falls out of reach."""
    q, k, v = random_qkv(1, 4, 2, 300, 300, 16)
    layout = sink_window_layout(300, 300, sink, window, 16, 16, limit=limit)
    check_against_references(q, k, v, layout, KernelConfig(16, 16, 4, 1))


def test_kernel_random_layouts_with_empty_rows():
    n_q, n_kv = 4, 5
    q, k, v = random_qkv(2, 2, 1, 60, 75, 16)
    selected = torch.rand(2, 2, n_q, n_kv) < 0.4
    selected[0, 0, 1] = False  # a query block that sees nothing: zeros and lse -inf
    full = selected & (torch.rand(2, 2, n_q, n_kv) < 0.5)
    full[..., -1] = False  # the last key block has a tail (75 = 4 * 16 + 11), so it cannot be full
    geometry = Geometry(60, 75, 16, 16, TokenMask(causal=False))
    layout = from_block_masks(full, selected & ~full, geometry)
    out, lse = check_against_references(q, k, v, layout, KernelConfig(16, 16, 4, 1))
    assert torch.all(out[0, 0, 16:32] == 0) and torch.all(torch.isinf(lse[0, 0, 16:32]))


def test_kernel_block_topk_layout_per_head():
    q, k, v = random_qkv(1, 4, 2, 64, 64, 16)
    layout = block_topk_layout(q, k, density=0.3, block_m=16, block_n=16)
    assert layout.kv_num_blocks.shape == (1, 4, 4)
    check_against_references(q, k, v, layout, KernelConfig(16, 16, 4, 1))


@pytest.mark.parametrize("chunk", [7, 32, 1024])
def test_reference_in_chunks_of_visited_key_blocks_equals_masked_sdpa(chunk):
    """The CPU path: query chunks (cut across block rows too) gather the key blocks they visit, per-head layouts
    and chunks that see no key at all included, and still compute exactly masked attention."""
    q, k, v = random_qkv(2, 4, 2, 200, 200, 16)
    first_rows_blind = torch.ones(1, 1, 13, 13, dtype=torch.bool).tril()
    first_rows_blind[..., :2, :] = False  # query blocks 0-1 (rows 0-31) see nothing
    for layout in (sink_window_layout(200, 200, 8, 40, 16, 16),
                   block_topk_layout(q, k, density=0.3, block_m=16, block_n=16),
                   from_block_masks(torch.zeros_like(first_rows_blind), first_rows_blind,
                                    Geometry(200, 200, 16, 16, TokenMask(causal=True)))):
        out, lse = block_sparse_attention_reference(q, k, v, layout, chunk=chunk)
        mask = layout.to_dense_mask().expand(2, 4, -1, -1)
        torch.testing.assert_close(out, masked_sdpa(q, k, v, mask), atol=2e-5, rtol=2e-5)
        scores = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(16)
        expected_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
        torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=2e-5)


def test_kernel_rejects_bad_inputs():
    q, k, v = random_qkv(1, 3, 2, 16, 16, 16)
    with pytest.raises(ShapeError, match="multiple of key/value heads"):
        block_sparse_attention(q, k, v, causal_layout(16, 16, 16, 16))
    q, k, v = random_qkv(1, 2, 1, 16, 16, 16)
    with pytest.raises(ShapeError, match="layout is for q_len=32"):
        block_sparse_attention(q, k, v, causal_layout(32, 32, 16, 16))
    with pytest.raises(ShapeError, match="differ from the layout"):
        block_sparse_attention(q, k, v, causal_layout(16, 16, 16, 16), config=KernelConfig(32, 16))
    with pytest.raises(ShapeError, match="dtype"):
        block_sparse_attention(q.double(), k.double(), v.double(), causal_layout(16, 16, 16, 16))


# -- layout builders against their token-level definitions ---------------------------------------------------------


def positions_and_keys(q_len, kv_len):
    positions = torch.arange(q_len)[:, None] + (kv_len - q_len)
    return positions, torch.arange(kv_len)[None, :]


@pytest.mark.parametrize("q_len,kv_len,block_m,block_n", [(50, 50, 16, 8), (7, 100, 4, 16), (33, 33, 32, 32)])
def test_causal_layout_definition(q_len, kv_len, block_m, block_n):
    positions, keys = positions_and_keys(q_len, kv_len)
    layout = causal_layout(q_len, kv_len, block_m, block_n)
    assert torch.equal(layout.to_dense_mask()[0, 0], keys <= positions)


@pytest.mark.parametrize("sink,window,block_m,block_n", [(4, 10, 8, 8), (0, 33, 16, 4), (20, 5, 8, 16)])
def test_sink_window_layout_definition(sink, window, block_m, block_n):
    positions, keys = positions_and_keys(90, 90)
    layout = sink_window_layout(90, 90, sink, window, block_m, block_n)
    expected = (keys <= positions) & ((positions - keys < window) | (keys < sink))
    assert torch.equal(layout.to_dense_mask()[0, 0], expected)
    # Block-exact: no visited block is entirely invisible, and full blocks need no mask.
    full, partial = layout.block_masks()
    token_blocks = expected.reshape(90 // 1, 90)
    for m in range(layout.n_q_blocks):
        for n in range(layout.n_kv_blocks):
            tile = token_blocks[m * block_m:(m + 1) * block_m, n * block_n:(n + 1) * block_n]
            assert bool(full[0, 0, m, n]) == bool(tile.all() and (n + 1) * block_n <= 90)
            assert bool(full[0, 0, m, n] | partial[0, 0, m, n]) == bool(tile.any())


@pytest.mark.parametrize("sink,window,limit,block", [(4, 10, 7, 8), (20, 50, 30, 16), (8, 5, 40, 4)])
def test_sink_window_layout_with_a_limit_is_the_intersection(sink, window, limit, block):
    positions, keys = positions_and_keys(90, 90)
    layout = sink_window_layout(90, 90, sink, window, block, block, limit=limit)
    expected = (keys <= positions) & ((positions - keys < window) | (keys < sink)) & (positions - keys < limit)
    assert torch.equal(layout.to_dense_mask()[0, 0], expected)
    full, partial = layout.block_masks()
    for m in range(layout.n_q_blocks):
        for n in range(layout.n_kv_blocks):
            tile = expected[m * block:(m + 1) * block, n * block:(n + 1) * block]
            assert bool(full[0, 0, m, n]) == bool(tile.all() and (n + 1) * block <= 90)
            assert bool(full[0, 0, m, n] | partial[0, 0, m, n]) == bool(tile.any())


def test_strided_layout_definition():
    layout = strided_layout(64, 64, 3, 8, 8, local_blocks=2)
    full, partial = layout.block_masks()
    visited = (full | partial)[0, 0]
    for m in range(8):
        for n in range(8):
            distance = m - n
            assert bool(visited[m, n]) == (0 <= distance and (distance < 2 or distance % 3 == 0))


def test_block_topk_keeps_diagonal_sink_and_best_blocks():
    q, k, _ = random_qkv(1, 2, 1, 128, 128, 8)
    k[:, :, 48:64] += 10 * q[:, :1, 112:128].mean(2, keepdim=True)  # key block 3 stands out for head 0, q-block 7
    layout = block_topk_layout(q, k, density=0.25, block_m=16, block_n=16)
    full, partial = layout.block_masks()
    visited = full | partial
    assert visited[..., torch.arange(8), torch.arange(8)].all()  # diagonal
    assert visited[..., :, 0].all()  # sink block
    assert visited[0, 0, 7, 3]
    assert (visited.sum(-1) <= 2 + 2).all()  # ceil(0.25 * 8) = 2 blocks, with diagonal and sink forced in
    causal = causal_layout(128, 128, 16, 16).block_masks()
    assert not (visited & ~(causal[0] | causal[1])).any()


@pytest.mark.parametrize("block_m,block_n", [(16, 8), (8, 16), (16, 16)])
def test_block_topk_on_shifted_padded_rows_chooses_what_each_row_alone_would(block_m, block_n):
    """Rows of a left-padded batch, shifted to start at 0 (zeros after their real tokens): each row's visible
    (query, key) pairs over its own tokens are those of the row alone, and it sees no key past its length."""
    length, lengths = 150, [150, 141, 80]
    q, k, _ = random_qkv(3, 4, 2, length, length, 8)
    for row, n in enumerate(lengths):
        q[row, :, n:], k[row, :, n:] = 0, 0
    batched = block_topk_layout(q, k, density=0.3, block_m=block_m, block_n=block_n, sink_blocks=1,
                                lengths=torch.tensor(lengths)).to_dense_mask()
    for row, n in enumerate(lengths):
        alone = block_topk_layout(q[row:row + 1, :, :n], k[row:row + 1, :, :n], density=0.3, block_m=block_m,
                                  block_n=block_n, sink_blocks=1).to_dense_mask()
        assert torch.equal(batched[row, :, :n, :n], alone[0])
        assert not batched[row, :, :n, n:].any()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert batched[0].sum() < 0.8 * 4 * causal.sum()  # it is sparse: fewer pairs than causal attention


def test_block_topk_op_on_a_bidirectional_call_at_full_density_is_exact():
    """Diffusion steps are bidirectional: every key block is a candidate (none is hidden as if causal)."""
    q, k, v = random_qkv(1, 4, 2, 100, 100, 16)
    layout = torch.ops.sparsify.block_topk_layout(q, k, 1.0, 16, 16, 1, False)
    out, _ = torch.ops.sparsify.block_sparse_attention(q, k, v, *layout, 16, 16, False, 0, 0, 0.25, 4, 1, False)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_union_intersection_and_block_mask_round_trip():
    window = sink_window_layout(64, 64, 0, 16, 16, 16)
    strided = strided_layout(64, 64, 2, 16, 16, local_blocks=1)
    positions, keys = positions_and_keys(64, 64)
    union, inter = window.union(window), window.intersection(causal_layout(64, 64, 16, 16).__class__(
        *[getattr(window, f) for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")],
        16, 16, 64, 64, window.mask))
    assert torch.equal(union.to_dense_mask(), window.to_dense_mask())
    assert torch.equal(inter.to_dense_mask(), window.to_dense_mask())
    with pytest.raises(ShapeError, match="token mask"):
        window.union(strided)
    block_mask = window.to_block_mask()
    back = BlockLayout.from_block_mask(block_mask, window.mask)
    assert torch.equal(back.to_dense_mask(), window.to_dense_mask())
    assert torch.equal(block_mask.to_dense().bool()[0, 0], (window.block_masks()[0] | window.block_masks()[1])[0, 0])


def test_layout_union_of_blocks():
    a = strided_layout(64, 64, 4, 16, 16, local_blocks=1)
    b = strided_layout(64, 64, 3, 16, 16, local_blocks=1)
    union, inter = a.union(b), a.intersection(b)
    assert torch.equal(union.to_dense_mask(), a.to_dense_mask() | b.to_dense_mask())
    assert torch.equal(inter.to_dense_mask(), a.to_dense_mask() & b.to_dense_mask())


def test_layout_errors():
    with pytest.raises(ShapeError, match="window must be > 0"):
        sink_window_layout(8, 8, 0, 0, 4, 4)
    with pytest.raises(ShapeError, match="q_len"):
        causal_layout(9, 8, 4, 4)
    with pytest.raises(ShapeError, match="density"):
        block_topk_layout(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), density=0.0, block_m=4, block_n=4)
    with pytest.raises(ShapeError, match="a window or limit needs causal=True"):
        TokenMask(causal=False, window=4)
    with pytest.raises(ShapeError, match="a window or limit needs causal=True"):
        TokenMask(causal=False, limit=4)
    with pytest.raises(ShapeError, match="sink, window and limit must be >= 0"):
        TokenMask(limit=-1)


def test_layout_build_touches_no_token_mask():
    """At 128K tokens the builders work on block tensors only (a token mask would be 16G entries)."""
    layout = sink_window_layout(131072, 131072, 64, 2048, 128, 128)
    assert layout.kv_indices.numel() == 1024 * 1024
    assert math.isclose(layout.density(), (2048 + 128 + 128) / 131072, rel_tol=0.15)


def test_block_topk_narrow_index_lists_convert_to_a_block_mask():
    q, k, _ = random_qkv(1, 4, 2, 300, 300, 16)
    layout = block_topk_layout(q, k, density=0.2, block_m=32, block_n=32)
    assert layout.kv_indices.shape[-1] < layout.n_kv_blocks  # candidate-wide lists, not n_kv-wide
    back = BlockLayout.from_block_mask(layout.to_block_mask(), layout.mask)
    assert torch.equal(back.to_dense_mask(), layout.to_dense_mask())


def test_kernel_rows_at_given_positions_equal_those_rows_of_causal_attention():
    from sparsify.kernels.layout import rows_layout

    q_all, k, v = random_qkv(2, 4, 2, 90, 90, 16)
    positions = torch.cat([torch.arange(0, 90, 7), torch.arange(70, 90)])  # strided rows, then a tail
    layout = rows_layout(positions, 90, 16, 16)
    q = q_all[:, :, positions]
    out, lse = check_against_references(q, k, v, layout, KernelConfig(16, 16, 4, 1))
    expected = F.scaled_dot_product_attention(q_all, k, v, is_causal=True, enable_gqa=True)[:, :, positions]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_rows_layout_rejects_positions_outside_the_keys():
    from sparsify.kernels.layout import rows_layout

    for positions in (torch.tensor([0, 5, 90]), torch.tensor([-1, 3]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ShapeError, match=r"positions must be non-empty and within \[0, 90\)"):
            rows_layout(positions, 90, 16, 16)
    with pytest.raises(ShapeError, match="no per-row query positions"):
        rows_layout(torch.tensor([0, 8]), 90, 16, 16).to_block_mask()


def test_pipeline_stages_shrink_to_fit_shared_memory():
    """What Triton asked for on an H100 (232448 bytes): 128x128 float32 tiles, D=128, need 131072 bytes a stage."""
    config = KernelConfig(128, 128, 8, 3)
    assert stages_that_fit(config, 128, 2, 232448) == 3  # bfloat16: 3 x 65536 fits
    assert stages_that_fit(config, 128, 4, 232448) == 1
    assert stages_that_fit(config, 128, 4, None) == 3  # the interpreter has no limit
    with pytest.raises(ShapeError, match="need 131072 bytes of shared memory per stage; the device has 100000"):
        stages_that_fit(config, 128, 4, 100000)
