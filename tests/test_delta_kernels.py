"""Delta's kernels under the Triton interpreter, each against its plain reference on fresh random inputs: the
strided rows with a GQA group packed into a tile, the correction pass, and the correction fused into the sparse
kernel's epilogue."""

import pytest
import torch
import torch.nn.functional as F

from sparsify.errors import ShapeError
from sparsify.kernels.block_sparse_attention import (DeltaCorrection, KernelConfig, block_sparse_attention,
                                                      block_sparse_attention_reference)
from sparsify.kernels.delta import delta_correction, delta_correction_reference, packed_rows_layout, row_attention
from sparsify.kernels.layout import sink_window_layout


def strided_and_tail(length, gamma, tail):
    return torch.cat([torch.arange(0, length, gamma), torch.arange(length - tail, length)])


@pytest.mark.parametrize("group", [1, 3, 4])
def test_row_attention_packs_a_gqa_group_and_equals_dense_rows(group):
    q, k, v = torch.randn(1, 2 * group, 83, 32), torch.randn(1, 2, 83, 32), torch.randn(1, 2, 83, 32)
    positions = strided_and_tail(83, 8, 19)
    layout = packed_rows_layout(positions, group, 83, 16, 16)
    out = row_attention(q[:, :, positions], k, v, layout, 0.2, config=KernelConfig(16, 16, 4, 1))
    reference = row_attention(q[:, :, positions], k, v, layout, 0.2)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=group > 1)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, dense[:, :, positions], atol=2e-5, rtol=2e-5)


def random_correction(length, gamma, tail, heads=3, dim=24):
    sparse = torch.randn(2, heads, length, dim)
    return sparse, DeltaCorrection(torch.randn(2, heads, -(-length // gamma) + tail, dim), gamma, tail)


def correction_by_loops(sparse, correction):
    out = sparse.clone()
    strided = correction.n_strided
    for j in range(sparse.shape[2]):
        i = j - j % correction.gamma
        out[:, :, j] = sparse[:, :, j] + correction.row_out[:, :, i // correction.gamma] - sparse[:, :, i]
    if correction.tail:
        out[:, :, -correction.tail:] = correction.row_out[:, :, strided:]
    return out


@pytest.mark.parametrize("length,gamma,tail", [(100, 8, 20), (37, 5, 3), (64, 64, 0), (20, 1, 20), (130, 16, 0)])
def test_correction_kernel_equals_its_definition(length, gamma, tail):
    sparse, correction = random_correction(length, gamma, tail)
    expected = correction_by_loops(sparse, correction)
    torch.testing.assert_close(delta_correction_reference(sparse, correction), expected)
    torch.testing.assert_close(delta_correction(sparse, correction, block_rows=16), expected)


@pytest.mark.parametrize("length,gamma,tail,block_m", [(150, 16, 22, 32), (96, 32, 32, 32), (77, 1, 5, 16),
                                                      (64, 16, 0, 16)])
def test_correction_fused_in_the_epilogue_equals_the_separate_pass(length, gamma, tail, block_m):
    q, k, v = torch.randn(1, 4, length, 32), torch.randn(1, 2, length, 32), torch.randn(1, 2, length, 32)
    layout = sink_window_layout(length, length, 4, 24, block_m, 16)
    config = KernelConfig(block_m, 16, 4, 1)
    positions = strided_and_tail(length, gamma, tail)
    rows = row_attention(q[:, :, positions], k, v, packed_rows_layout(positions, 2, length, 16, 16), 32 ** -0.5)
    correction = DeltaCorrection(rows, gamma, tail)
    fused, lse = block_sparse_attention(q, k, v, layout, config=config, correction=correction)
    sparse, sparse_lse = block_sparse_attention_reference(q, k, v, layout)
    torch.testing.assert_close(fused, correction_by_loops(sparse, correction), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, sparse_lse, atol=2e-5, rtol=2e-5)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(fused[:, :, ::gamma], dense[:, :, ::gamma], atol=2e-5, rtol=2e-5)


def test_correction_shape_errors_name_what_is_wrong():
    sparse, correction = random_correction(40, 8, 4)
    with pytest.raises(ShapeError, match=r"row_out must be \(2, 3, 9, 24\)"):
        delta_correction(sparse, DeltaCorrection(correction.row_out[:, :, :-1], 8, 4))
    q, k, v = torch.randn(1, 3, 40, 24), torch.randn(1, 3, 40, 24), torch.randn(1, 3, 40, 24)
    with pytest.raises(ShapeError, match=r"gamma \(8\) must be a power of 2 that divides block_m \(4\)"):
        block_sparse_attention(q, k, v, sink_window_layout(40, 40, 4, 8, 4, 16), config=KernelConfig(4, 16, 4, 1),
                               correction=DeltaCorrection(torch.randn(1, 3, 9, 24), 8, 4))
