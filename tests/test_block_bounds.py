"""The block score bound kernel (``kernels/block_bounds.py``) against its reference, and the reference against
its definition: odd block counts, rows with different blocks in use, local blocks, bfloat16 summaries read in
place, strided summaries (a slice of a KV-head range), and the input checks. Small shapes: the kernel runs under
the Triton interpreter on CPU."""

import pytest
import torch

from sparsify.errors import ShapeError
from sparsify.kernels import hardware
import sparsify  # noqa: F401  (registers torch.ops.sparsify)
from sparsify.kernels.block_bounds import (block_bounds, block_bounds_reference, select_top_blocks,
                                           select_top_blocks_reference, update_summaries)


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


def test_the_kernel_scores_the_mean_of_each_groups_query_heads():
    """Hq = 3 x Hkv query heads, scaled: the kernel takes the group's mean itself; the reference equals the bound
    of the explicitly averaged query."""
    gen = torch.Generator().manual_seed(3)
    kmin, kmax = summaries(gen, 2, 2, 21, 16, torch.bfloat16)
    heads = torch.randn(2, 6, 16, generator=gen).bfloat16()
    in_use = torch.tensor([21, 13])
    expected = block_bounds_reference(heads, kmin, kmax, in_use, 1, 0.25)
    mean = heads.float().view(2, 2, 3, 16).mean(2) * 0.25
    torch.testing.assert_close(expected, block_bounds_reference(mean, kmin, kmax, in_use, 1))
    torch.testing.assert_close(block_bounds(heads, kmin, kmax, in_use, 1, 0.25), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_strided_summaries_are_read_in_place(group):
    """A slice of the KV heads (a segment serving part of a layer's heads) and of their query heads, as
    resa_select passes them (q[:, :, 0] of a decode step's (B, Hq, 1, D)): strided, not contiguous."""
    gen = torch.Generator().manual_seed(5)
    kmin, kmax = summaries(gen, 2, 4, 20, 16, torch.bfloat16)
    q = torch.randn(2, 1, 4 * group, 16, generator=gen).transpose(1, 2)          # (B, Hq, 1, D), strided
    kmin, kmax = kmin[:, 1:3], kmax[:, 1:3]
    query = q[:, group:3 * group].select(2, 0)
    in_use = torch.tensor([20, 9], dtype=torch.int32)
    torch.testing.assert_close(block_bounds(query, kmin, kmax, in_use, 1, 0.25),
                               block_bounds_reference(query, kmin, kmax, in_use, 1, 0.25), atol=1e-4, rtol=1e-5)


def test_bad_inputs_get_clear_errors(monkeypatch):
    kmin = kmax = torch.randn(2, 2, 5, 16)
    query, in_use = torch.randn(2, 2, 16), torch.tensor([5, 5])
    cases = [
        ((query, kmin, kmax[:, :1], in_use), "kmin and kmax must share a shape"),
        ((query[:, :1], kmin, kmax, in_use), r"query must be \(B, Hq, D\) with B = 2, Hq a multiple of Hkv = 2"),
        ((query[:, :0], kmin, kmax, in_use), r"query must be \(B, Hq, D\) with B = 2, Hq a multiple of Hkv = 2"),
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


@pytest.mark.parametrize("n_blocks", [5, 100, 300])
def test_the_top_blocks_kernel_equals_the_reference(n_blocks):
    """Random scores (no ties) with -inf past each row's blocks in use and +inf for local ones; keep per row."""
    gen = torch.Generator().manual_seed(n_blocks)
    in_use = torch.tensor([n_blocks, n_blocks // 2, 0])
    scores = block_bounds_reference(torch.randn(3, 2, 8, generator=gen),
                                    *summaries(gen, 3, 2, n_blocks, 8, torch.float32), in_use, 1)
    width = max(1, n_blocks // 3)
    keep = torch.minimum(torch.tensor([width, max(1, width // 2), 0]), in_use)
    expected = select_top_blocks_reference(scores, keep, width)
    actual = select_top_blocks(scores, keep, width)
    assert actual.dtype == torch.int32 and actual.shape == (3, 2, width)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("levels", [3, 50, None])
def test_the_top_blocks_kernel_equals_the_reference_over_long_rows_with_ties(levels):
    """2500 blocks a row, scores of a few values (many ties at the threshold), of many values close together
    (sharing their high bits), and of any value, negative ones included; any keep."""
    gen = torch.Generator().manual_seed(levels or 0)
    scores = torch.randn(2, 3, 2500, generator=gen)
    if levels is not None:
        scores = 1.0 + torch.randint(0, levels, scores.shape, generator=gen) / 4096
    scores[0, 1, -300:] = float("-inf")
    for keep in ([2500, 1], [7, 1200], [0, 333]):
        keep = torch.tensor(keep)
        width = int(keep.max().clamp(min=1))
        torch.testing.assert_close(select_top_blocks(scores, keep, width),
                                   select_top_blocks_reference(scores, keep, width))


def test_ties_at_the_last_kept_score_go_to_the_lowest_positions():
    """In the kernel and the reference alike: equal scores, -0.0 against +0.0, +inf local blocks, all -inf."""
    cases = [([1.0, 3.0, 2.0, 2.0, -0.0, 2.0, 0.0, -5.0], 3, 5, [1, 2, 3, 8, 8]),
             ([-1.0, -3.0, -2.0, float("-inf"), -0.5], 2, 2, [0, 4]),
             ([0.0, 1.0, -0.0, -1.0], 2, 2, [0, 1]),                       # -0.0 at the threshold ties with 0.0
             ([float("inf"), 1.0, float("inf"), float("inf")], 2, 3, [0, 2, 4]),
             ([float("-inf")] * 4, 2, 2, [0, 1])]
    for scores, keep, width, expected in cases:
        scores, keep = torch.tensor([[scores]]), torch.tensor([keep])
        for select in (select_top_blocks, select_top_blocks_reference):
            assert select(scores, keep, width).tolist() == [[expected]], (select.__name__, scores)


def test_a_keep_over_the_width_fills_the_width_only():
    """A keep past the lists' width (a caller's mistake) writes the width's best, never past the row."""
    scores = torch.arange(8.0).view(1, 2, 4)
    out = select_top_blocks(scores, torch.tensor([4]), 2)
    assert out.tolist() == select_top_blocks_reference(scores, torch.tensor([4]), 2).tolist() == [[[2, 3], [2, 3]]]


def test_the_selection_kernel_checks_its_inputs():
    scores = torch.zeros(1, 2, 4)
    with pytest.raises(ShapeError, match="scores must be a float32 tensor"):
        select_top_blocks(scores.bfloat16(), torch.tensor([1]), 2)
    with pytest.raises(ShapeError, match=r"keep must be an int32 or int64 tensor of shape \(1,\)"):
        select_top_blocks(scores, torch.tensor([1, 1]), 2)
    with pytest.raises(ShapeError, match=r"width must be in \[1, n_blocks = 4\]"):
        select_top_blocks_reference(scores, torch.tensor([1]), 5)
    with pytest.raises(ShapeError, match="update_summaries: kmin and kmax must be"):
        update_summaries(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 9, 8),
                         torch.tensor([9]), torch.tensor([0]), 9, 4)


@pytest.mark.parametrize("block_size", [4, 16, 5])
def test_the_summary_kernel_equals_the_reference_on_the_blocks_in_use(block_size):
    """A prefill of 37 positions then an append of one, on a bfloat16 cache of 48 seen through a strided view (a
    static cache's), from each row's own first position: the kernel and the op's reference keep the same
    summaries, the blocks in use and the others (left as they were)."""
    gen = torch.Generator().manual_seed(block_size)
    k = torch.randn(2, 48, 3, 16, generator=gen).bfloat16().transpose(1, 2)
    starts = torch.tensor([0, 7])
    n_blocks = -(-48 // block_size)
    before = [torch.randn(2, 3, n_blocks, 16, generator=gen).bfloat16() for _ in range(2)]
    kernel, reference = [t.clone() for t in before], [t.clone() for t in before]
    for used, q_len in ((37, 37), (38, 1)):
        update_summaries(*kernel, k, torch.full((2,), used), starts, q_len, block_size)
        torch.ops.sparsify.resa_summaries(*reference, torch.empty(2, 1, q_len, 0), k,
                                          torch.tensor(used - q_len), starts, block_size)
        for got, want in zip(kernel, reference):
            torch.testing.assert_close(got, want)
    blocks = -(-(38 - 7) // block_size)  # the padded row's blocks in use; the ones after it were never touched
    assert torch.equal(kernel[0][1, :, blocks + 1:], before[0][1, :, blocks + 1:])
    assert torch.equal(kernel[0][0, :, 0], k[0, :, :block_size].amin(1))
