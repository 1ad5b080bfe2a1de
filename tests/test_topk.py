"""The radix-select top-k kernels against their reference (a stable descending sort): random rows, heavy ties
across chunks, signed zeros and -inf, ranges per batch row, k = L, and the input checks. Small shapes and small
chunks, so that every pass crosses chunks under the Triton interpreter."""

import pytest
import torch

from sparsify.errors import ShapeError
from sparsify.kernels.topk import row_topk, row_topk_reference


def check(scores, k, lo, hi, block):
    values, positions = row_topk(scores, k, lo, hi, block=block)
    expected_values, expected_positions = row_topk_reference(scores, k, lo, hi)
    assert values.dtype == torch.float32 and positions.dtype == torch.int64
    assert torch.equal(values, expected_values)
    assert torch.equal(positions, expected_positions)


@pytest.mark.parametrize("seed,batch,heads,length,k,block", [
    (301, 2, 3, 300, 40, 64),
    (302, 1, 2, 1000, 100, 128),
    (303, 2, 1, 257, 257, 64),  # k = L: every position, the ones outside the range last (as -inf)
    (304, 1, 1, 50, 7, 4096),  # one chunk
])
def test_matches_reference_on_random_rows(seed, batch, heads, length, k, block):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, generator=gen) * torch.rand(1, generator=gen) * 10
    lo = torch.randint(0, length // 3, (batch,), generator=gen)
    hi = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    check(scores, k, lo, hi, block)


def test_ties_are_taken_lowest_position_first_across_chunks():
    gen = torch.Generator().manual_seed(305)
    scores = torch.randn(2, 2, 512, generator=gen)
    scores[0, 0] = 0.0  # one value everywhere: the first k positions
    scores[0, 1, ::3] = 1.0  # 171 ties above the rest, more than k
    scores[1, 0, 100:400] = 2.5  # a run of ties that straddles the threshold and several chunks
    scores[1, 1, ::2] = -0.0  # signed zeros compare equal
    scores[1, 1, 1::2] = 0.0
    lo, hi = torch.tensor([0, 3]), torch.tensor([512, 500])
    check(scores, 100, lo, hi, 64)


def test_rows_with_fewer_real_entries_than_k_end_in_minus_infinity():
    gen = torch.Generator().manual_seed(306)
    scores = torch.randn(2, 2, 200, generator=gen)
    scores[0, 1, 20:30] = float("-inf")
    lo, hi = torch.tensor([10, 50]), torch.tensor([40, 50])  # 30 real entries, and none
    check(scores, 64, lo, hi, 64)
    values, _ = row_topk(scores, 64, lo, hi, block=64)
    assert values[1].isneginf().all() and values[0, 0, :30].isfinite().all() and values[0, 0, 30:].isneginf().all()


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(2, 3, 10, dtype=torch.float16), 4), "float32"),
    ((torch.zeros(3, 10), 4), r"\(B, H, L\)"),
    ((torch.zeros(1, 2, 10), 11), r"k = 11; must be in \[1, L = 10\]"),
    ((torch.zeros(1, 2, 10), 0), r"k = 0"),
    ((torch.zeros(1, 2, 10).transpose(1, 2).contiguous().transpose(1, 2), 4), "contiguous along L"),
])
def test_bad_input_is_named(args, message):
    scores, k = args
    batch = scores.shape[0] if scores.dim() == 3 else 1
    with pytest.raises(ShapeError, match=message):
        row_topk(scores, k, torch.zeros(batch, dtype=torch.int64), torch.full((batch,), 10))


def test_bad_ranges_and_block_are_named():
    scores = torch.zeros(2, 2, 10)
    with pytest.raises(ShapeError, match=r"lo must be int32/int64 of shape \(2,\)"):
        row_topk(scores, 4, torch.zeros(3, dtype=torch.int64), torch.full((2,), 10))
    with pytest.raises(ShapeError, match=r"hi must be"):
        row_topk(scores, 4, torch.zeros(2, dtype=torch.int64), torch.full((2,), 10.0))
    with pytest.raises(ShapeError, match="block = 48"):
        row_topk(scores, 4, torch.zeros(2, dtype=torch.int64), torch.full((2,), 10), block=48)
