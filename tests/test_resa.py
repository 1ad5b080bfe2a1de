"""ReSA (``sparsify/methods/resa.py``, ``sparsify/rectify.py``): block summaries kept with the cache, the block
selection, sparse decode through the split-KV kernel's block lists, and rectification inside generate()."""

import math

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyError
from sparsify.state import state_of

PROMPT = 60


def resa(**params):
    return {"rules": [{"when": {"phase": "decode"}, "use": "resa",
                       "with": {"block_size": 4, "sparse_ratio": 0.25, "min_blocks": 2, **params}}]}


def summaries_from_scratch(k: torch.Tensor, used: int, block_size: int, n_blocks: int):
    """The definition: per block of ``block_size`` positions in use, the elementwise min and max of its keys."""
    batch, heads, _, dim = k.shape
    kmin, kmax = torch.zeros(batch, heads, n_blocks, dim), torch.zeros(batch, heads, n_blocks, dim)
    for block in range(-(-used // block_size)):
        keys = k[:, :, block * block_size:min(used, (block + 1) * block_size)]
        kmin[:, :, block], kmax[:, :, block] = keys.amin(2), keys.amax(2)
    return kmin, kmax


@pytest.mark.parametrize("static", [False, True])
def test_summaries_after_appends_equal_summaries_from_scratch(static):
    """A prefill of 21 tokens, then 16 appends of one: the same summaries as built once over all 37. A static
    cache's keys span its capacity (the positions in use come from the query offset); a dynamic one's end with the
    call's tokens."""
    torch.manual_seed(0)
    k = torch.randn(2, 3, 48, 8)
    kmin, kmax = torch.zeros(2, 3, 12, 8), torch.zeros(2, 3, 12, 8)
    steps = [(0, 21)] + [(n, 1) for n in range(21, 37)]
    for offset, length in steps:
        q = torch.randn(2, 6, length, 8)
        keys = k if static else k[:, :, :offset + length]
        query_offset = torch.tensor(offset) if static else None
        torch.ops.sparsify.resa_summaries(kmin, kmax, q, keys, query_offset, torch.zeros(2, dtype=torch.int64), 4)
    expected_min, expected_max = summaries_from_scratch(k, 37, 4, 12)
    torch.testing.assert_close(kmin[:, :, :10], expected_min[:, :, :10])
    torch.testing.assert_close(kmax[:, :, :10], expected_max[:, :, :10])


def test_the_selection_equals_its_definition():
    torch.manual_seed(1)
    batch, kv_heads, group, dim, block, n_blocks, used = 2, 2, 3, 8, 4, 30, 97  # 25 blocks in use
    k = torch.randn(batch, kv_heads, used, dim)
    kmin, kmax = summaries_from_scratch(k, used, block, n_blocks)
    q = torch.randn(batch, kv_heads * group, 1, dim)
    ratio, min_blocks, local = 0.2, 3, 2
    starts = torch.ops.sparsify.resa_row_starts(k, None)
    blocks_in_use, kept = torch.ops.sparsify.resa_budget(q, k, None, starts, block, ratio, min_blocks, local)
    indices = torch.ops.sparsify.resa_select(q, kmin, kmax, blocks_in_use, kept, ratio, min_blocks, local, 0.5)
    in_use = math.ceil(used / block)
    keep = max(math.ceil(in_use * ratio), min(in_use, min_blocks))
    assert blocks_in_use.tolist() == [in_use] * batch and kept.tolist() == [keep] * batch
    assert indices.shape == (batch, kv_heads, max(math.ceil(n_blocks * ratio), min_blocks, local))
    for b in range(batch):
        for g in range(kv_heads):
            query = q[b, g * group:(g + 1) * group, 0].mean(0) * 0.5
            bound = torch.maximum(query * kmin[b, g, :in_use], query * kmax[b, g, :in_use]).sum(-1)
            bound[in_use - local:] = float("inf")
            expected = sorted(bound.topk(keep).indices.tolist())
            assert indices[b, g, :keep].tolist() == expected
            assert (indices[b, g, keep:] == n_blocks).all()  # past the count: an index the kernel ignores


def test_the_budget_equals_its_definition_per_row():
    """A static cache's offset, each row's own first position (left padding), and local blocks above what the
    ratio and min_blocks keep: n = ceil((used - start) / block_size), keep = min(max(ceil(n r), min(n, m),
    min(n, local)), n)."""
    k, q = torch.zeros(3, 2, 100, 8), torch.zeros(3, 4, 1, 8)
    starts, offset = torch.tensor([0, 9, 60]), torch.tensor(70)  # 71 positions in use
    for ratio, min_blocks, local in ((0.2, 3, 2), (0.05, 0, 4), (1.0, 50, 1)):
        in_use, keep = torch.ops.sparsify.resa_budget(q, k, offset, starts, 4, ratio, min_blocks, local)
        for b, start in enumerate(starts.tolist()):
            n = math.ceil((71 - start) / 4)
            expected = min(max(math.ceil(n * ratio), min(n, min_blocks), min(n, local)), n)
            assert (in_use[b].item(), keep[b].item()) == (n, expected), (ratio, min_blocks, local, b)


def test_the_decode_ops_fake_implementations_match_them():
    """torch.library.opcheck of the budget, the selection and the sparse decode (their fakes give the shapes and
    dtypes the real ops return, as compilation relies on), with a static offset and left-padded rows."""
    torch.manual_seed(2)
    k, v = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    q = torch.randn(2, 6, 1, 8)
    kmin, kmax = summaries_from_scratch(k, 40, 4, 10)
    starts, offset = torch.tensor([0, 5]), torch.tensor(35)
    padding = torch.arange(40)[None, :] >= starts[:, None]
    budget = (q, k, offset, starts, 4, 0.3, 2, 1)
    torch.library.opcheck(torch.ops.sparsify.resa_budget.default, budget)
    in_use, keep = torch.ops.sparsify.resa_budget(*budget)
    selection = (q, kmin, kmax, in_use, keep, 0.3, 2, 1, 0.5)
    torch.library.opcheck(torch.ops.sparsify.resa_select.default, selection)
    indices = torch.ops.sparsify.resa_select(*selection)
    torch.library.opcheck(torch.ops.sparsify.block_decode.default,
                          (q, k, v, offset, padding, starts, indices, keep, 4, 0.5))


def test_with_every_block_kept_decode_equals_dense_decode():
    model = tiny_model("llama")
    fast = sparsify.compile(model, resa(sparse_ratio=1.0, rectify_every=0))
    ids = torch.randint(1, 256, (2, PROMPT))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        actual = fast.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.logits), torch.stack(expected.logits), atol=1e-5, rtol=1e-5)
    assert fast.sparsify.applied()[0] == {"resa"}
    decode = fast.sparsify.frames[-1].last.rewrite.ops
    # Starts and budget: once for all layers; each layer's selection one op (two kernels on CUDA).
    assert decode["sparsify.resa_row_starts"] == decode["sparsify.resa_budget"] == 1
    assert decode["sparsify.resa_select"] == decode["sparsify.block_decode"] == 3


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rectification_every_f_tokens_leaves_the_cache_a_dense_encoding(cache):
    """29 decode steps with rectify_every 8: three rectifications, after steps 8, 16 and 24. Every position up to
    the last rectified one holds what a dense forward over the generated sequence computes; later ones do not
    (sparse decode is real)."""
    model = tiny_model("llama")
    fast = sparsify.compile(model, resa(rectify_every=8))
    ids = torch.randint(1, 256, (1, PROMPT))
    with torch.no_grad():
        out = fast.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                            cache_implementation="static" if cache == "static" else None)
        dense = model(out.sequences[:, :-1], use_cache=True).past_key_values
    recent = state_of(out.past_key_values).recent
    assert recent.rectifications == 29 // 8 and recent.tokens == PROMPT + 29
    rectified = PROMPT + 8 * 3
    for layer in range(3):
        ours, theirs = out.past_key_values.layers[layer], dense.layers[layer]
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(ours, name)[:, :, :rectified], getattr(theirs, name)[:, :, :rectified],
                                       atol=1e-5, rtol=1e-5)
    later = out.past_key_values.layers[2].keys[:, :, rectified:PROMPT + 29] - dense.layers[2].keys[:, :, rectified:]
    assert later.abs().max() > 1e-3


def test_a_users_own_decode_loop_is_rectified_and_64_steps_do_not_recompile():
    from transformers import StaticCache

    model = tiny_model("llama")
    fast = sparsify.compile(model, resa(rectify_every=16))
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 80)
    tokens = torch.randint(1, 256, (1, PROMPT))
    with torch.no_grad():
        logits = fast(input_ids=tokens, past_key_values=cache, use_cache=True).logits
        compiled = []
        for step in range(64):
            token = logits[:, -1:].argmax(-1)
            logits = fast(input_ids=token, past_key_values=cache, use_cache=True).logits
            assert logits.shape == (1, 1, 256)
            compiled.append(fast.sparsify.backend.compilations)
    assert state_of(cache).recent.rectifications == 64 // 16
    assert compiled[-1] == compiled[20]  # the prefill, decode and rectification frames, then nothing new
    assert "rectification every 16 decode steps: that step runs over the last 16 tokens" in sparsify.explain(fast)


def test_a_left_padded_batch_gives_each_row_what_it_gives_alone():
    """Each row's blocks start at its first real token, its budget and local blocks come from its own length:
    batched with padding or alone, a row generates the same tokens (rectification included)."""
    model = tiny_model("llama")
    fast = sparsify.compile(model, resa(rectify_every=8))
    pads = [0, 13, 30]
    ids = torch.randint(1, 256, (3, PROMPT + 30))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    with torch.no_grad():
        batched = fast.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        for row, pad in enumerate(pads):
            alone = fast.generate(ids[row:row + 1, pad:], max_new_tokens=20, min_new_tokens=20, do_sample=False)
            assert torch.equal(batched[row, PROMPT + 30:], alone[0, PROMPT + 30 - pad:])


def test_positional_arguments_mean_what_they_mean_to_the_model():
    """With rectification on, the forward's arguments are bound by name: (ids, mask) is still ids and a mask."""
    model = tiny_model("llama")
    fast = sparsify.compile(model, resa(rectify_every=4))
    ids = torch.randint(1, 256, (2, PROMPT))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask).logits, model(ids, attention_mask=mask).logits, atol=1e-5,
                                   rtol=1e-5)


def test_a_sequence_longer_than_its_state_is_refused():
    """The summaries are sized by the cache's capacity (config.max_position_embeddings for a dynamic cache): a
    sequence past it would lose its newest blocks, so it is refused, naming the fix."""
    model = tiny_model("llama")
    model.config.max_position_embeddings = 64
    fast = sparsify.compile(model, resa(rectify_every=0))
    with torch.no_grad():
        cache = fast(torch.randint(1, 256, (1, 60)), use_cache=True).past_key_values
        for _ in range(4):
            fast(torch.randint(1, 256, (1, 1)), past_key_values=cache, use_cache=True)
        with pytest.raises(sparsify.errors.StateError, match="takes the sequence to 65 tokens, past the 64"):
            fast(torch.randint(1, 256, (1, 1)), past_key_values=cache, use_cache=True)


def test_rectify_every_1_is_refused_with_the_reason():
    with pytest.raises(PolicyError, match=r"rules\[0\].with.rectify_every: 1 would re-encode every generated token"):
        sparsify.Policy.load(resa(rectify_every=1))


def test_a_decode_call_that_is_not_causal_is_refused_by_name():
    """Cross-attention over an encoder's keys is no cache of the sequence: resa's budget, read from the cache's
    length, would be wrong there, so the decode methods that read the whole cache refuse it."""
    from types import SimpleNamespace

    from sparsify.methods.base import cache_decode_reason

    call = SimpleNamespace(phase="decode", causal=False, match=SimpleNamespace(causal_by_position=True,
                                                                                model_window=0))
    assert cache_decode_reason("resa", call, "blocks") == (
        "resa serves causal self-attention over the cache; this call is not causal (e.g. cross-attention)")
    assert cache_decode_reason("resa", SimpleNamespace(**{**vars(call), "causal": True}), "blocks") is None


def test_resa_keeps_prefill_dense_and_says_why_where_it_cannot_serve():
    fast = sparsify.compile(tiny_model("llama"), {"rules": [{"use": "resa"}]})
    with torch.no_grad():
        fast(torch.randint(1, 256, (1, 20)))
    decision = fast.sparsify.frames[0].last.decisions.decisions[0]
    assert decision.segments[0].fallback == "resa serves phases decode, not prefill"
