"""The split-KV decode kernel against its plain reference (and the reference against dense SDPA): odd cache
lengths, GQA groups, rows of different lengths, left padding, block lists, empty rows, strided caches, the split
heuristic and the input checks. Seeded inputs, a new seed per case; small shapes (the kernels run under the
Triton interpreter on CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.errors import ShapeError
from sparsify.kernels import decode, hardware
from sparsify.kernels.decode import (MAX_SPLITS, decode_attention, decode_attention_reference, decode_num_splits,
                                     stages_for_decode)

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
             torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_qkv(gen, batch, kv_heads, group, length, dim, dim_v=None, dtype=torch.float32):
    q = torch.randn(batch, kv_heads * group, 1, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim_v or dim, generator=gen).to(dtype)
    return q, k, v


def random_lengths(gen, batch, length, dtype=torch.int32):
    return torch.randint(1, length + 1, (batch,), generator=gen, dtype=torch.int64).to(dtype)


def check(q, k, v, kv_lengths, scale, **kwargs):
    """Kernel against reference: same out (in q's dtype) and lse (float32), -inf in the same places, no NaN."""
    out, lse = decode_attention(q, k, v, kv_lengths, scale, **kwargs)
    reference = {key: val for key, val in kwargs.items() if key != "num_splits"}
    ref_out, ref_lse = decode_attention_reference(q, k, v, kv_lengths, scale, **reference)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not out.isnan().any() and not lse.isnan().any()
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], **tol)
    return out, lse


@pytest.mark.parametrize("seed,batch,kv_heads,group,length,dim,dim_v,dtype", [
    (101, 1, 1, 1, 1, 64, 64, torch.float32),
    (102, 3, 2, 3, 37, 64, 64, torch.float32),
    (103, 3, 1, 4, 300, 64, 64, torch.float32),
    (104, 1, 2, 8, 1000, 64, 64, torch.float32),
    (105, 2, 1, 4, 150, 128, 128, torch.float32),
    (106, 1, 1, 2, 100, 64, 128, torch.float32),
    (107, 3, 2, 4, 300, 64, 64, torch.bfloat16),
    (108, 1, 1, 8, 37, 64, 64, torch.float16),
])
def test_kernel_matches_reference(seed, batch, kv_heads, group, length, dim, dim_v, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, batch, kv_heads, group, length, dim, dim_v, dtype)
    lengths = random_lengths(gen, batch, length, torch.int64 if seed % 2 else torch.int32)
    lengths[0] = length  # one row sees the whole cache
    check(q, k, v, lengths, 0.7 / math.sqrt(dim))


def test_reference_equals_sdpa_on_the_visible_keys():
    gen = torch.Generator().manual_seed(201)
    q, k, v = make_qkv(gen, 3, 2, 4, 90, 16)
    lengths = torch.tensor([90, 41, 7])
    out, lse = decode_attention_reference(q, k, v, lengths, None)
    for b, n in enumerate(lengths.tolist()):
        expected = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1], expected, atol=1e-5, rtol=1e-5)
        scores = torch.einsum("hd,hld->hl", q[b, :, 0], k[b, :, :n].repeat_interleave(4, 0)) / 4.0
        torch.testing.assert_close(lse[b, :, 0], torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed,dtype", [(301, torch.float32), (302, torch.bfloat16)])
def test_left_padding(seed, dtype):
    """HF's left padding: row b's first pads[b] cache slots are padding; kv_lengths still counts them."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, 3, 2, 3, 200, 64, dtype=dtype)
    lengths = torch.tensor([200, 150, 90], dtype=torch.int32)
    pads = torch.tensor([0, 70, 89])
    key_padding = torch.arange(200)[None, :] >= pads[:, None]
    key_padding[0, 5] = False  # and a hole, as a generic 2D mask may have
    out, _ = check(q, k, v, lengths, None, key_padding=key_padding)
    # Integer masks (HF's attention_mask is int64) mean the same.
    torch.testing.assert_close(decode_attention(q, k, v, lengths, None, key_padding=key_padding.long())[0], out,
                               atol=0, rtol=0)


def random_block_lists(gen, batch, kv_heads, n_cache_blocks, listed):
    """Sorted random subsets of the cache's blocks (or tokens: ``n_cache_blocks`` the cache's length), counts in
    [1, listed - 1]; the slots past a count hold garbage (out-of-range and unsorted values) that the kernel must
    not read."""
    indices = torch.empty(batch, kv_heads, listed, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            indices[b, h] = torch.randperm(n_cache_blocks, generator=gen)[:listed].sort().values.to(torch.int32)
    counts = torch.randint(1, listed, (batch, kv_heads), generator=gen, dtype=torch.int32)
    garbage = torch.randint(-5, 3 * n_cache_blocks, indices.shape, generator=gen, dtype=torch.int32)
    indices = torch.where(torch.arange(listed) < counts[..., None], indices, garbage)
    return indices, counts


@pytest.mark.parametrize("seed,batch,kv_heads,group,length,block_size,listed,padded", [
    (401, 3, 2, 4, 300, 64, 4, False),
    (402, 1, 1, 3, 1000, 128, 6, False),  # blocks of two 64-key tiles
    (403, 3, 1, 1, 200, 48, 4, True),     # blocks that are no power of 2, and left padding
    (404, 1, 2, 8, 130, 16, 8, False),    # four listed blocks gathered per 64-key tile
    (405, 2, 2, 3, 157, 5, 9, True),      # twelve blocks of 5 per tile (4 lanes idle), padding
    (406, 2, 1, 4, 170, 24, 5, False),    # two blocks of 24 per tile (16 lanes idle)
])
def test_block_lists(seed, batch, kv_heads, group, length, block_size, listed, padded):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, batch, kv_heads, group, length, 64)
    n_cache_blocks = -(-length // block_size)
    indices, counts = random_block_lists(gen, batch, kv_heads, n_cache_blocks, listed)
    lengths = random_lengths(gen, batch, length)
    lengths[0] = length
    key_padding = None
    if padded:
        key_padding = torch.arange(length)[None, :] >= torch.randint(0, 60, (batch, 1), generator=gen)
    out, lse = check(q, k, v, lengths, None, key_padding=key_padding, kv_block_indices=indices,
                     kv_block_counts=counts, block_size=block_size)
    # All blocks listed = no list.
    if not padded:
        every = torch.arange(n_cache_blocks, dtype=torch.int32).expand(batch, kv_heads, -1).contiguous()
        full = torch.full((batch, kv_heads), n_cache_blocks, dtype=torch.int32)
        dense_out, dense_lse = decode_attention(q, k, v, lengths, None, kv_block_indices=every,
                                                kv_block_counts=full, block_size=block_size)
        ref_out, ref_lse = decode_attention_reference(q, k, v, lengths, None)
        torch.testing.assert_close(dense_out, ref_out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dense_lse, ref_lse, atol=1e-5, rtol=1e-4)


def test_block_lists_at_resas_launch():
    """ReSA's launch (block_pass_launch: 128-key tiles of eight 16-key blocks, 2 stages) over sorted lists whose
    count is one per row, seen as (B, Hkv) through a stride-0 view as resa's block_decode passes it, from each
    row's offset with no padding mask (the positions before it are in no block), at a length that ends inside a
    block. The reference once counted those positions in whenever a list had entries past its count."""
    gen = torch.Generator().manual_seed(604)
    batch, kv_heads, group, length, block_size = 2, 2, 4, 517, 16
    q, k, v = make_qkv(gen, batch, kv_heads, group, length, 64)
    n_cache_blocks = -(-length // block_size)
    indices = torch.stack([torch.randperm(n_cache_blocks, generator=gen)[:19].sort().values
                           for _ in range(batch * kv_heads)]).view(batch, kv_heads, 19).int()
    keep = torch.tensor([19, 11])
    offsets = torch.tensor([0, 21])
    lengths = torch.tensor([length, length - 40])
    check(q, k, v, lengths, None, kv_block_indices=indices, kv_block_counts=keep[:, None].expand(batch, kv_heads),
          block_size=block_size, block_offsets=offsets, **decode.block_pass_launch())


def test_block_lists_from_each_rows_offset():
    """Row b's block j covers positions [offset_b + j * bs, offset_b + (j + 1) * bs) (a left-padded row's blocks
    as it would have them alone): the kernel equals the reference, and the reference equals attention over those
    positions, masked by hand."""
    gen = torch.Generator().manual_seed(601)
    batch, kv_heads, group, length, block_size = 3, 2, 2, 200, 16
    q, k, v = make_qkv(gen, batch, kv_heads, group, length, 64)
    offsets = torch.tensor([0, 13, 70], dtype=torch.int32)
    key_padding = torch.arange(length)[None, :] >= offsets[:, None].long()
    indices = torch.tensor([0, 2, 5, 7], dtype=torch.int32).expand(batch, kv_heads, 4).contiguous()
    counts = torch.full((batch, kv_heads), 4, dtype=torch.int32)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    out, _ = check(q, k, v, lengths, None, key_padding=key_padding, kv_block_indices=indices,
                   kv_block_counts=counts, block_size=block_size, block_offsets=offsets)
    for row, offset in enumerate(offsets.tolist()):
        keys = torch.cat([torch.arange(offset + j * block_size, offset + (j + 1) * block_size) for j in (0, 2, 5, 7)])
        keys = keys[keys < length]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + 1].float(), k[row:row + 1, :, keys].float(), v[row:row + 1, :, keys].float(), enable_gqa=True)
        torch.testing.assert_close(out[row:row + 1].float(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed,batch,kv_heads,group,length,listed,padded,splits", [
    (701, 2, 2, 4, 300, 90, False, None),
    (702, 3, 1, 3, 500, 200, True, 3),   # several tiles per split, and left padding
    (703, 1, 2, 1, 64, 17, False, 1),
])
def test_token_lists(seed, batch, kv_heads, group, length, listed, padded, splits):
    """LessIsMore's selections: each (row, KV head) attends to its listed token positions only (sorted subsets;
    past the count and out of range: ignored)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, batch, kv_heads, group, length, 64)
    indices, counts = random_block_lists(gen, batch, kv_heads, length, listed)
    key_padding = torch.arange(length)[None, :] >= torch.randint(0, 40, (batch, 1), generator=gen) if padded else None
    lengths = torch.full((batch,), length, dtype=torch.int32)
    out, _ = check(q, k, v, lengths, None, key_padding=key_padding, kv_token_indices=indices, kv_token_counts=counts,
                   num_splits=splits)
    b, h = 0, 0  # and the reference against the definition, for one (row, KV head)
    keys = indices[b, h, :counts[b, h]].long()
    if key_padding is not None:
        keys = keys[key_padding[b, keys]]
    expected = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1, :group].float(),
                                                                k[b:b + 1, h:h + 1, keys].float(),
                                                                v[b:b + 1, h:h + 1, keys].float())
    torch.testing.assert_close(out[b:b + 1, :group].float(), expected, atol=1e-4, rtol=1e-4)


def test_rows_that_see_no_key():
    """kv_length 0, a negative length, padding over every key, and an empty block list: out 0, lse -inf."""
    gen = torch.Generator().manual_seed(501)
    q, k, v = make_qkv(gen, 4, 2, 3, 70, 64)
    lengths = torch.tensor([0, 70, -3, 50], dtype=torch.int32)
    key_padding = torch.ones(4, 70, dtype=torch.bool)
    key_padding[1] = False
    out, lse = check(q, k, v, lengths, None, key_padding=key_padding)
    assert torch.all(out[:3] == 0) and torch.all(torch.isneginf(lse[:3])) and torch.isfinite(lse[3]).all()
    indices = torch.zeros(4, 2, 3, dtype=torch.int32)
    counts = torch.tensor([[2, 2], [2, 2], [2, 2], [0, 3]], dtype=torch.int32)
    indices[..., 1], indices[..., 2] = 1, 2
    out, lse = check(q, k, v, lengths, None, kv_block_indices=indices, kv_block_counts=counts, block_size=32)
    assert torch.all(out[3, :3] == 0) and torch.all(torch.isneginf(lse[3, :3])) and torch.isfinite(lse[3, 3:]).all()


def test_lengths_past_the_cache_are_clamped():
    gen = torch.Generator().manual_seed(502)
    q, k, v = make_qkv(gen, 2, 1, 2, 40, 64)
    out, lse = check(q, k, v, torch.tensor([1000, 40]), None)
    full_out, full_lse = decode_attention(q, k, v, torch.tensor([40, 40]), None)
    torch.testing.assert_close(out, full_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=0, rtol=0)


@pytest.mark.parametrize("lists", ["none", "blocks", "tokens"])
def test_a_length_shift_is_added_to_every_row(lists):
    """``length_shift`` (a static cache's offset plus the new tokens, added in the kernel rather than by a launch
    before it): the same function as the shifted lengths, with or without lists; a 0-dim offset expanded too."""
    gen = torch.Generator().manual_seed(504)
    q, k, v = make_qkv(gen, 3, 2, 3, 90, 32)
    offsets = torch.tensor([40, 88, 0])
    arguments = {"none": {}, "blocks": dict(kv_block_indices=torch.tensor([[[0, 2], [1, 2]]] * 3, dtype=torch.int32),
                                            kv_block_counts=torch.full((3, 2), 2, dtype=torch.int32), block_size=16),
                 "tokens": dict(kv_token_indices=torch.randint(0, 90, (3, 2, 20), generator=gen),
                                kv_token_counts=torch.full((3, 2), 20))}[lists]
    if lists == "tokens":  # distinct positions per list
        arguments["kv_token_indices"] = torch.stack([torch.randperm(90, generator=gen)[:20] for _ in range(6)]
                                                    ).view(3, 2, 20)
    shifted, _ = check(q, k, v, offsets, None, length_shift=1, num_splits=3, **arguments)
    expected, _ = decode_attention(q, k, v, offsets + 1, None, num_splits=3, **arguments)
    torch.testing.assert_close(shifted, expected, atol=0, rtol=0)
    one_offset, _ = decode_attention(q, k, v, torch.tensor(40).expand(3), None, length_shift=1, **arguments)
    torch.testing.assert_close(one_offset, decode_attention(q, k, v, torch.full((3,), 41), None, **arguments)[0])


def test_what_lies_past_the_lengths_is_never_read():
    """A preallocated cache holds anything past the positions in use, NaN and inf too: the kernel and the
    reference give what they give over a clean cache (0 x NaN would poison the reference's sum)."""
    gen = torch.Generator().manual_seed(503)
    q, k, v = make_qkv(gen, 2, 2, 3, 64, 16)
    lengths = torch.tensor([40, 17])
    clean = decode_attention_reference(q, k, v, lengths, None)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        poisoned_k[b, :, n:] = float("nan")
        poisoned_v[b, :, n:: 2] = float("inf")
        poisoned_v[b, :, n + 1:: 2] = float("nan")
    for result in (check(q, poisoned_k, poisoned_v, lengths, None),
                   decode_attention_reference(q, poisoned_k, poisoned_v, lengths, None)):
        torch.testing.assert_close(result[0], clean[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(result[1], clean[1], atol=1e-6, rtol=1e-6)


def test_strided_cache_and_query():
    """k as a slice of a longer preallocated cache (StaticCache), v in (B, L, H, D) memory, q a slice too."""
    gen = torch.Generator().manual_seed(601)
    batch, kv_heads, group, length, dim = 2, 2, 4, 90, 64
    k_buffer = torch.randn(batch, kv_heads, 256, dim, generator=gen)
    v_buffer = torch.randn(batch, 256, kv_heads, dim, generator=gen)
    k, v = k_buffer[:, :, :length], v_buffer[:, :length].transpose(1, 2)
    q = torch.randn(batch, kv_heads * group, 3, dim, generator=gen)[:, :, 1:2]
    assert not k.is_contiguous() and not v.is_contiguous() and not q.is_contiguous()
    lengths = torch.tensor([90, 33])
    out, lse = check(q, k, v, lengths, None)
    out_c, lse_c = decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), lengths, None)
    torch.testing.assert_close(out, out_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 3, 7, 20])
def test_any_number_of_splits_gives_the_same_function(num_splits):
    """Uneven shares, and more splits than blocks (splits with no work write lse -inf and weigh nothing)."""
    gen = torch.Generator().manual_seed(700 + num_splits)
    q, k, v = make_qkv(gen, 2, 1, 4, 400, 64)
    check(q, k, v, torch.tensor([400, 170]), None, num_splits=num_splits)


class GridSpy:
    """Stands in for a Triton kernel: records each launch grid and forwards the launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_splits_depend_on_shapes_only(monkeypatch):
    gen = torch.Generator().manual_seed(801)
    q, k, v = make_qkv(gen, 1, 2, 2, 500, 64)
    spy = GridSpy(decode._decode_split)
    monkeypatch.setattr(decode, "_decode_split", spy)
    for lengths in (torch.tensor([500]), torch.tensor([3])):
        check(q, k, v, lengths, None)
    assert spy.grids[0] == spy.grids[1] == (decode_num_splits(1, 2, 8, decode.INTERPRETER_MULTIPROCESSORS), 2)
    assert spy.grids[0][0] > 1


def test_launch_reads_no_tensor_value_on_the_host(monkeypatch):
    """What would sync with the device (and break CUDA-graph capture) raises here."""
    gen = torch.Generator().manual_seed(802)
    q, k, v = make_qkv(gen, 2, 1, 2, 100, 64)
    lengths, key_padding = torch.tensor([100, 20]), torch.ones(2, 100, dtype=torch.bool)
    indices, counts = torch.tensor([[[0, 1]], [[1, 2]]], dtype=torch.int32), torch.tensor([[2], [1]], dtype=torch.int32)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    decode_attention(q, k, v, lengths, None, key_padding=key_padding)
    decode_attention(q, k, v, lengths, None, kv_block_indices=indices, kv_block_counts=counts, block_size=32)


def test_split_heuristic():
    # An H200 (132 SMs): B=1 with 8 KV heads aims at 4 * 132 programs, one block per split at least.
    assert decode_num_splits(1, 8, 128, 132) == 66
    assert decode_num_splits(1, 8, 10, 132) == 10
    assert decode_num_splits(1, 1, 10_000, 132) == MAX_SPLITS
    assert decode_num_splits(64, 8, 128, 132) == 2
    assert decode_num_splits(128, 8, 128, 132) == 1
    assert decode_num_splits(4, 8, 0, 132) == 1


def test_pipeline_stages_shrink_to_fit_shared_memory():
    assert stages_for_decode(3, 64, 128, 128, 2, 232448) == 3
    assert stages_for_decode(3, 64, 256, 256, 4, 232448) == 1
    assert stages_for_decode(3, 64, 256, 256, 4, None) == 3
    with pytest.raises(ShapeError, match="need 262144 bytes of shared memory per stage; the device has 232448"):
        stages_for_decode(3, 128, 256, 256, 4, 232448)


def test_bad_inputs():
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 50, 64), torch.randn(2, 2, 50, 64)
    lengths = torch.tensor([50, 10])
    cases = [
        ((q[:, :, :0], k, v, lengths), {}, r"q must be \(B, Hq, T, D\) with T >= 1 new tokens"),
        ((q.expand(2, 4, 3, 64), k, v, lengths), dict(kv_token_indices=torch.zeros(2, 2, 3, dtype=torch.int32),
                                                       kv_token_counts=torch.zeros(2, 2, dtype=torch.int32)),
         "3 new tokens per row \\(a chunk\\) take no block or token lists"),
        ((q.expand(2, 4, 65, 64), k, v, lengths), {}, "65 new tokens x 2 query heads per KV head = 130 rows"),
        ((q[0], k, v, lengths), {}, r"q must be \(B, Hq, T, D\), k \(B, Hkv, L, D\)"),
        ((q, k[:1], v, lengths), {}, r"k must be \(B, Hkv, L, D\) and v \(B, Hkv, L, Dv\) with q's B=2 and D=64"),
        ((q, k, v[:, :, :40], lengths), {}, r"k must be \(B, Hkv, L, D\) and v"),
        ((q[:, :3], k, v, lengths), {}, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        ((q, k, v, lengths[:1]), {}, r"kv_lengths must be an int32 or int64 tensor of shape \(2,\)"),
        ((q, k, v, lengths.float()), {}, "kv_lengths must be an int32 or int64"),
        ((q, k, v, lengths), dict(key_padding=torch.ones(2, 49, dtype=torch.bool)),
         r"key_padding must be a bool .* of shape \(2, 50\)"),
        ((q, k, v, lengths), dict(key_padding=torch.ones(2, 50)), "key_padding must be a bool"),
        ((q, k, v, lengths), dict(kv_block_indices=torch.zeros(2, 2, 3, dtype=torch.int32)), "both or neither"),
        ((q, k, v, lengths), dict(kv_block_indices=torch.zeros(2, 1, 3, dtype=torch.int32),
                                  kv_block_counts=torch.zeros(2, 2, dtype=torch.int32), block_size=16),
         r"kv_block_indices must be an int32 \(or int64\) tensor of shape \(2, 2, S\)"),
        ((q, k, v, lengths), dict(kv_block_indices=torch.zeros(2, 2, 3, dtype=torch.int32),
                                  kv_block_counts=torch.zeros(2, 2, 1, dtype=torch.int32), block_size=16),
         r"kv_block_counts must be an int32 \(or int64\) tensor of shape \(2, 2\)"),
        ((q, k, v, lengths), dict(kv_block_indices=torch.zeros(2, 2, 3, dtype=torch.int32),
                                  kv_block_counts=torch.zeros(2, 2, dtype=torch.int32)), "block_size must be"),
        ((q, k, v, lengths.to("meta")), {}, "kv_lengths is on meta"),
        ((q, k, v, lengths), dict(kv_token_indices=torch.zeros(2, 2, 3, dtype=torch.int32)), "both or neither"),
        ((q, k, v, lengths), dict(kv_token_indices=torch.zeros(2, 2, 3), kv_token_counts=torch.zeros(2, 2)),
         r"kv_token_indices must be an int32 \(or int64\) tensor of shape \(2, 2, T\)"),
        ((q, k, v, lengths), dict(kv_token_indices=torch.zeros(2, 2, 3, dtype=torch.int32),
                                  kv_token_counts=torch.zeros(2, 2, dtype=torch.int32),
                                  kv_block_indices=torch.zeros(2, 2, 3, dtype=torch.int32),
                                  kv_block_counts=torch.zeros(2, 2, dtype=torch.int32), block_size=16),
         "block lists or token lists, not both"),
        ((q, k, v, lengths), dict(block_offsets=torch.zeros(2, dtype=torch.int32)), "block_offsets must be"),
        ((q, k, v, lengths), dict(scores_start=torch.zeros(2, dtype=torch.int32)),
         r"scores_start must be an int32 \(or int64\) tensor of shape \(2,\), with scores_out; .* without scores_out"),
        ((q, k, v, lengths), dict(scores_out=torch.zeros(2, 4, 50), scores_skip=(1, -1)),
         "scores_skip must be two ints >= 0"),
        ((q, k, v, lengths), dict(length_shift=1.0), "length_shift must be an int"),
    ]
    for args, kwargs, message in cases:
        for function in (decode_attention, decode_attention_reference):
            with pytest.raises(ShapeError, match=message):
                function(*args, None, **kwargs)
    kernel_only = [
        ((q.double(), k.double(), v.double(), lengths), {}, "dtype: q, k, v must share"),
        ((q, k.half(), v, lengths), {}, "dtype: q, k, v must share"),
        ((torch.randn(2, 4, 1, 48), torch.randn(2, 2, 50, 48), v, lengths), {}, "head_dim D = 48"),
        ((q, k, torch.randn(2, 2, 50, 512), lengths), {}, "value head_dim Dv = 512"),
        ((torch.randn(2, 4, 1, 8), torch.randn(2, 2, 50, 8), v, lengths), {}, "head_dim D = 8"),
        ((q, k, v, lengths), dict(block_n=48), "block_n = 48"),
        ((q, k, v, lengths), dict(num_splits=0), "num_splits must be a positive int"),
    ]
    for args, kwargs, message in kernel_only:
        with pytest.raises(ShapeError, match=message):
            decode_attention(*args, None, **kwargs)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(hardware, "interpreting", lambda: False)
    q, k, v = torch.randn(1, 2, 1, 64), torch.randn(1, 1, 8, 64), torch.randn(1, 1, 8, 64)
    with pytest.raises(ShapeError, match="needs CUDA tensors"):
        decode_attention(q, k, v, torch.tensor([8]), None)


@pytest.mark.parametrize("tokens, group", [(2, 2), (5, 3), (32, 4)])
def test_a_chunk_of_new_tokens_is_causal_attention_over_the_cache(tokens, group):
    """T new tokens at the end of each row's positions in use (a rectification's chunk over a static cache, rows
    of different lengths, padding): the kernel equals its reference, and the reference equals SDPA with the
    causal visibility materialised."""
    gen = torch.Generator().manual_seed(tokens)
    q, k, v = make_qkv(gen, 2, 2, group, 90, 32)
    q = torch.randn(2, 2 * group, tokens, 32, generator=gen)
    lengths = torch.tensor([90, 40])
    padding = torch.rand(2, 90, generator=gen) > 0.1
    check(q, k, v, lengths, None, key_padding=padding, num_splits=3)
    out, _ = decode_attention_reference(q, k, v, lengths, None, key_padding=padding)
    position = lengths[:, None] - tokens + torch.arange(tokens)                           # (B, T)
    visible = (torch.arange(90) <= position[..., None]) & padding[:, None]                # (B, T, L)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_a_chunk_with_lengths_past_the_cache_sees_what_the_clamped_length_allows():
    """Lengths are clamped to the cache before each token's causal limit, in the kernel and the reference."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 3, 16, generator=gen)
    k, v = torch.randn(1, 1, 20, 16, generator=gen), torch.randn(1, 1, 20, 16, generator=gen)
    check(q, k, v, torch.tensor([22]), None, num_splits=1)
    out, _ = decode_attention_reference(q, k, v, torch.tensor([22]), None)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, torch.tensor([20]), None)[0])
