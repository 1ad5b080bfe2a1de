"""The block score bound kernel (``kernels/block_bounds.py``) against its reference, and the reference against
its definition: odd block counts, rows with different blocks in use, local blocks, bfloat16 summaries read in
place, strided summaries (a slice of a KV-head range), and the input checks. Small shapes: the kernel runs under
the Triton interpreter on CPU."""

import pytest
import torch

from sparsify.errors import ShapeError
from sparsify.kernels import hardware
from sparsify.kernels.block_bounds import block_bounds, block_bounds_reference


def summaries(gen, batch, kv_heads, n_blocks, dim, dtype):
    low = torch.randn(batch, kv_heads, n_blocks, dim, generator=gen)
    return low.to(dtype), (low + torch.rand(batch, kv_heads, n_blocks, dim, generator=gen)).to(dtype)


def test_the_reference_is_the_upper_bound_of_q_dot_k_over_each_block():
    """Built from real keys, every key's q.k is at most its block's bound, and the bound is the max over the
    block when one key holds all the extremes."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 12, 4, 8, generator=gen)                 # (B, Hkv, blocks, block_size, D)
    query = torch.randn(1, 2, 8, generator=gen)
    bound = block_bounds_reference(query, keys.amin(3), keys.amax(3), torch.tensor([12]), 0)
    dots = torch.einsum("bhd,bhnsd->bhns", query, keys)
    assert (dots.amax(-1) <= bound + 1e-5).all()
    extreme = torch.where(query[:, :, None, :] > 0, keys.amax(3), keys.amin(3))
    exact = block_bounds_reference(query, extreme, extreme, torch.tensor([12]), 0)
    torch.testing.assert_close(exact, torch.einsum("bhd,bhnd->bhn", query, extreme))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_blocks", [1, 37, 130])
def test_the_kernel_equals_the_reference(dtype, n_blocks):
    gen = torch.Generator().manual_seed(n_blocks)
    kmin, kmax = summaries(gen, 3, 2, n_blocks, 32, dtype)
    query = torch.randn(3, 2, 32, generator=gen)
    in_use = torch.tensor([n_blocks, max(0, n_blocks - 5), n_blocks // 2])
    for local in (0, 1, 3):
        expected = block_bounds_reference(query, kmin, kmax, in_use, local)
        actual = block_bounds(query, kmin, kmax, in_use, local)
        assert actual.dtype == torch.float32 and actual.shape == (3, 2, n_blocks)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5)
        for row, used in enumerate(in_use.tolist()):  # -inf past the blocks in use, +inf for the local ones
            assert (actual[row, :, used:] == float("-inf")).all()
            assert (actual[row, :, max(0, used - local):used] == float("inf")).all()


def test_strided_summaries_are_read_in_place():
    """A slice of the KV heads (a segment serving part of a layer's heads) and a query that is not contiguous."""
    gen = torch.Generator().manual_seed(5)
    kmin, kmax = summaries(gen, 2, 4, 20, 16, torch.bfloat16)
    query = torch.randn(2, 16, 4, generator=gen).transpose(1, 2)
    kmin, kmax = kmin[:, 1:3], kmax[:, 1:3]
    query = query[:, 1:3]
    in_use = torch.tensor([20, 9], dtype=torch.int32)
    torch.testing.assert_close(block_bounds(query, kmin, kmax, in_use, 1),
                               block_bounds_reference(query, kmin, kmax, in_use, 1), atol=1e-4, rtol=1e-5)


def test_bad_inputs_get_clear_errors(monkeypatch):
    kmin = kmax = torch.randn(2, 2, 5, 16)
    query, in_use = torch.randn(2, 2, 16), torch.tensor([5, 5])
    cases = [
        ((query, kmin, kmax[:, :1], in_use), "kmin and kmax must share a shape"),
        ((query[:, :1], kmin, kmax, in_use), r"query must be \(B, Hkv, D\) = \(2, 2, 16\)"),
        ((query, kmin, kmax, in_use.float()), "in_use must be an int32 or int64 tensor of shape"),
        ((query, kmin, kmax, in_use[:1]), r"in_use must be an int32 or int64 tensor of shape \(2,\)"),
    ]
    for args, message in cases:
        for function in (block_bounds, block_bounds_reference):
            with pytest.raises(ShapeError, match=message):
                function(*args, 0)
    with pytest.raises(ShapeError, match="head_dim D = 12"):
        block_bounds(torch.randn(2, 2, 12), torch.randn(2, 2, 5, 12), torch.randn(2, 2, 5, 12), in_use, 0)
    monkeypatch.setattr(hardware, "interpreting", lambda: False)
    with pytest.raises(ShapeError, match="needs CUDA tensors"):
        block_bounds(query, kmin, kmax, in_use, 0)
