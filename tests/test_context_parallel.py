"""Context parallelism on the CPU: 2 processes (gloo) each hold a contiguous slice of a 4K sequence's q, k, v; the
dense ring gives one process's causal SDPA, the layout-aware version one process's block-sparse attention over the
same sink + window layout, receiving only the key blocks its queries visit (counted against the token rule)."""

import datetime
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import rank_results, run_ranks, tiny_model

import sparsify
from sparsify.context_parallel import (SequenceSplit, context_parallel_generate, context_parallel_prefill,
                                      plan_for_policy, plan_kv_fetch)
from sparsify.errors import PolicyError, ShapeError, SparsifyError
from sparsify.kernels.block_sparse_attention import block_sparse_attention_reference
from sparsify.kernels.layout import dense_layout, sink_window_layout

RANKS = 2
BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 1, 4, 2, 16  # GQA, small enough for 2 shared cores; tiny_model's heads too
BLOCK_M, BLOCK_N = 128, 64
SINK, WINDOW = 64, 256
ALIGN = math.lcm(BLOCK_M, BLOCK_N)
# Each case: total length, the ring's split (any), the layout's split (boundaries at multiples of ALIGN).
CASES = {
    "4096, even": (4096, SequenceSplit((2048, 2048)), SequenceSplit.even(4096, RANKS, ALIGN)),
    # An odd length (its last key block partial) split unevenly, the ring's boundary inside a block.
    "3999, uneven": (3999, SequenceSplit((2000, 1999)), SequenceSplit.even(3999, RANKS, ALIGN)),
}
MODEL_LAYERS = 2
NEW_TOKENS = 6
SINK_WINDOW_POLICY = {"rules": [{"when": {"phase": "prefill"}, "use": "sink_window",
                                 "with": {"sink": SINK, "window": WINDOW}}]}
TIMEOUT_S = 240  # a hung transfer fails the test instead of stalling the suite


def sequence(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sequence's q (B, Hq, L, D), k and v (B, Hkv, L, D), float32, the same in every process."""
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(BATCH, Q_HEADS, length, HEAD_DIM, generator=generator)
    k = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, generator=generator)
    v = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, generator=generator)
    return q, k, v


def prompt(length: int = 4096) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(2))


def two_prompts(length: int = 4096) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(3))


def pair_end_ids(tokens: torch.Tensor) -> list[int]:
    """Two end ids: row 0's second generated token, and one no row generated."""
    return [int(tokens[0, 1]), next(i for i in range(256) if i not in tokens.tolist()[0] + tokens.tolist()[1])]


def window_layout(length: int):
    return sink_window_layout(length, length, SINK, WINDOW, BLOCK_M, BLOCK_N)


def local(tensors, split: SequenceSplit, rank: int):
    return [t[:, :, split.start(rank):split.end(rank)] for t in tensors]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: run both functions on its slice of every case, save what each gave (or the error)."""
    import torch.distributed as dist

    from sparsify.context_parallel import layout_attention, ring_attention

    torch.set_num_threads(1)  # two processes on a machine shared with others
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    with rank_results(rank, out_dir) as results:
        for name, (length, ring_split, layout_split) in CASES.items():
            tensors = sequence(length)
            results[f"ring {name}"] = ring_attention(*local(tensors, ring_split, rank), ring_split)
            plan = plan_kv_fetch(window_layout(length), layout_split)
            results[f"layout {name}"] = layout_attention(*local(tensors, layout_split, rank), plan)
        # A bidirectional layout: rank 0 needs rank 1's keys too.
        split = SequenceSplit.even(4096, RANKS, ALIGN)
        plan = plan_kv_fetch(dense_layout(4096, 4096, BLOCK_M, BLOCK_N), split)
        results["bidirectional"] = layout_attention(*local(sequence(4096), split, rank), plan)
        # Whole models: each rank prefills its slice of the prompt.
        split = SequenceSplit.even(4096, RANKS, ALIGN)
        ids = prompt()[:, split.start(rank):split.end(rank)]
        with torch.no_grad():
            for kind in ("llama", "qwen2"):
                results[f"model ring {kind}"] = context_parallel_prefill(tiny_model(kind, layers=MODEL_LAYERS), ids,
                                                                         split)
            plan = plan_kv_fetch(window_layout(4096), split)
            results["model layout"] = context_parallel_prefill(tiny_model("llama", layers=MODEL_LAYERS), ids, split,
                                                               plan=plan)
            results["model layout layer 1"] = context_parallel_prefill(tiny_model("llama", layers=MODEL_LAYERS), ids,
                                                                       split, plan=(None, plan))
            # Decoding after the prefill, the cache split as the prompt; then stopping at the third token's id.
            model = tiny_model("llama", layers=MODEL_LAYERS)
            generated = context_parallel_generate(model, ids, split, NEW_TOKENS, return_logits=True)
            results["generate"] = generated
            results["generate eos"] = context_parallel_generate(model, ids, split, NEW_TOKENS,
                                                                eos_token_id=int(generated.tokens[0, 2]))
            # Two rows; then with two end ids, the first row's second token among them: rows end apart.
            pair = two_prompts()[:, split.start(rank):split.end(rank)]
            generated = context_parallel_generate(model, pair, split, NEW_TOKENS, return_logits=True)
            results["generate pair"] = generated
            results["generate pair eos"] = context_parallel_generate(model, pair, split, NEW_TOKENS,
                                                                     eos_token_id=pair_end_ids(generated.tokens))
        try:  # a slice of the wrong length: refused before any transfer, on every rank
            ring_attention(*local(sequence(4096), SequenceSplit((2000, 2096)), rank), SequenceSplit((2048, 2048)))
        except ShapeError as error:
            results["wrong slice"] = str(error)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saved, run once for the module's tests."""
    return run_ranks(_worker, RANKS, tmp_path_factory.mktemp("context_parallel"), TIMEOUT_S)


def kv_bytes(tokens: int) -> int:
    """Bytes of K and V (float32) for ``tokens`` positions."""
    return 2 * BATCH * KV_HEADS * tokens * HEAD_DIM * 4


@pytest.mark.parametrize("name", CASES)
def test_the_ring_gives_one_process_causal_attention(ranks, name):
    length, split, _ = CASES[name]
    q, k, v = sequence(length)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for rank, result in enumerate(ranks):
        result = result[f"ring {name}"]
        torch.testing.assert_close(result.out, local([expected], split, rank)[0], atol=1e-5, rtol=1e-5,
                                   msg=f"rank {rank}")
        # Each rank receives the other's whole slice.
        assert result.kv_bytes_received == kv_bytes(split.lengths[1 - rank]), f"rank {rank}"


@pytest.mark.parametrize("name", CASES)
def test_the_layout_version_gives_one_process_block_sparse_attention(ranks, name):
    length, _, split = CASES[name]
    q, k, v = sequence(length)
    layout = window_layout(length)
    expected_out, expected_lse = block_sparse_attention_reference(q, k, v, layout)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (expected_out - dense).abs().max() > 1e-2  # the layout really leaves keys out
    for rank, result in enumerate(ranks):
        result = result[f"layout {name}"]
        torch.testing.assert_close(result.out, local([expected_out], split, rank)[0], atol=1e-5, rtol=1e-5,
                                   msg=f"rank {rank}")
        torch.testing.assert_close(result.lse, expected_lse[..., split.start(rank):split.end(rank)], atol=1e-5,
                                   rtol=1e-5, msg=f"rank {rank}")


@pytest.mark.parametrize("name", CASES)
def test_the_layout_version_receives_only_the_key_blocks_its_queries_visit(ranks, name):
    length, _, split = CASES[name]
    boundary = split.start(1)
    # By the token rule alone: the keys of rank 0 that some query of rank 1 sees are the sink and the last
    # WINDOW - 1 positions before the boundary; rank 1 fetches their blocks, rank 0 nothing.
    keys = torch.arange(boundary)
    seen = (keys < SINK) | (boundary - keys < WINDOW)
    blocks = torch.unique(keys[seen] // BLOCK_N).tolist()
    assert blocks == [0, *range((boundary - WINDOW + 1) // BLOCK_N, boundary // BLOCK_N)]
    plan = plan_kv_fetch(window_layout(length), split)
    assert plan.runs[1][0] == ((0, 1), (blocks[1], boundary // BLOCK_N)) and plan.runs[0][1] == ()
    assert [plan.blocks_received(rank) for rank in range(RANKS)] == [0, len(blocks)]
    assert [plan.tokens_received(rank) for rank in range(RANKS)] == [0, len(blocks) * BLOCK_N]
    received = [result[f"layout {name}"].kv_bytes_received for result in ranks]
    assert received == [0, kv_bytes(len(blocks) * BLOCK_N)]
    ring = [result[f"ring {name}"].kv_bytes_received for result in ranks]
    assert all(mine < theirs for mine, theirs in zip(received, ring)), (received, ring)


def test_a_bidirectional_layout_fetches_from_later_ranks_too(ranks):
    split = SequenceSplit.even(4096, RANKS, ALIGN)
    q, k, v = sequence(4096)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["bidirectional"].out, local([expected], split, rank)[0], atol=1e-5,
                                   rtol=1e-5, msg=f"rank {rank}")
        assert result["bidirectional"].kv_bytes_received == kv_bytes(2048)


def test_a_slice_of_the_wrong_length_is_refused(ranks):
    assert ranks[0]["wrong slice"] == ("ring_attention: rank 0 holds q of 2000 and k/v of 2000 positions; allowed: "
                                       "the split's 2048 (positions 0-2047)")
    assert ranks[1]["wrong slice"].startswith("ring_attention: rank 1 holds q of 2096")


def test_splits_the_layout_cannot_serve_are_refused():
    assert SequenceSplit.even(3999, 2, 128).lengths == (2048, 1951)
    assert SequenceSplit.even(4096, 3, 128).lengths == (1408, 1408, 1280)
    with pytest.raises(ShapeError, match=r"split: rank 1 starts at position 2000; allowed: boundaries at multiples "
                                         r"of 128 .* SequenceSplit.even\(3999, 2, multiple=128\)"):
        plan_kv_fetch(window_layout(3999), SequenceSplit((2000, 1999)))
    with pytest.raises(ShapeError, match=r"seq_len: 128 cannot give each of 2 ranks a token with boundaries at "
                                         r"multiples of 128; allowed: seq_len > 128"):
        SequenceSplit.even(128, 2, 128)
    with pytest.raises(ShapeError, match=r"lengths: \(0, 5\); allowed: one positive token count per rank"):
        SequenceSplit((0, 5))
    with pytest.raises(ShapeError, match="allowed: a prefill layout of the whole split sequence, q_len == kv_len == "
                                         "4096"):
        plan_kv_fetch(window_layout(3999), SequenceSplit((2048, 2048)))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_model_prefilled_over_the_ring_gives_one_process_logits(ranks, kind):
    split = SequenceSplit.even(4096, RANKS, ALIGN)
    with torch.no_grad():
        expected = tiny_model(kind, layers=MODEL_LAYERS)(prompt()).logits
    for rank, result in enumerate(ranks):
        result = result[f"model ring {kind}"]
        torch.testing.assert_close(result.logits, expected[:, split.start(rank):split.end(rank)], atol=1e-5,
                                   rtol=1e-5, msg=f"rank {rank}")
        assert result.kv_bytes_received == MODEL_LAYERS * kv_bytes(2048)


def test_a_model_prefilled_over_a_layout_gives_sparsify_sink_window_on_one_process(ranks):
    split = SequenceSplit.even(4096, RANKS, ALIGN)
    model = tiny_model("llama", layers=MODEL_LAYERS)
    fast = sparsify.compile(model, SINK_WINDOW_POLICY, cost_model_fallback=False)
    with torch.no_grad():
        expected = fast(prompt()).logits
        dense = model(prompt()).logits
    assert fast.sparsify.applied() == ({"sink_window"}, set())
    assert (expected - dense).abs().max() > 1e-3  # the window really changes the logits
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["model layout"].logits, expected[:, split.start(rank):split.end(rank)],
                                   atol=1e-5, rtol=1e-5, msg=f"rank {rank}")
    # Rank 1 fetches the sink block and the window's 4 blocks in every layer; rank 0 nothing.
    assert [result["model layout"].kv_bytes_received for result in ranks] == [0, MODEL_LAYERS * kv_bytes(5 * BLOCK_N)]


def test_decoding_after_a_context_parallel_prefill_gives_one_process_greedy_generate(ranks):
    with torch.no_grad():
        expected = tiny_model("llama", layers=MODEL_LAYERS).generate(
            prompt(), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected_tokens = expected.sequences[:, 4096:]
    for rank, result in enumerate(ranks):
        generated = result["generate"]
        assert torch.equal(generated.tokens, expected_tokens), f"rank {rank}"
        torch.testing.assert_close(generated.logits, torch.stack(expected.logits, dim=1).float(), atol=1e-5,
                                   rtol=1e-5, msg=f"rank {rank}")
        # The prefill's ring moved the other slice in each layer; each decode step gathers one (B, Hq, 1, D + 1)
        # float32 partial per layer from the other rank.
        assert generated.kv_bytes_received == MODEL_LAYERS * kv_bytes(2048)
        assert generated.decode_bytes_received == (NEW_TOKENS - 1) * MODEL_LAYERS * BATCH * Q_HEADS * (HEAD_DIM + 1) * 4
        # With the third token's id as EOS, generation ends there (earlier tokens unchanged).
        eos = int(expected_tokens[0, 2])
        first = expected_tokens[0].tolist().index(eos)
        assert torch.equal(result["generate eos"].tokens, expected_tokens[:, :first + 1]), f"rank {rank}"


def test_a_batch_of_two_decodes_as_one_process_and_its_rows_end_apart(ranks):
    model = tiny_model("llama", layers=MODEL_LAYERS)
    with torch.no_grad():
        expected = model.generate(two_prompts(), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        end_ids = pair_end_ids(expected.sequences[:, 4096:])
        ended = model.generate(two_prompts(), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=end_ids,
                               pad_token_id=end_ids[0])
    assert ended.shape[1] - 4096 < NEW_TOKENS or (ended[1, 4096:] != end_ids[0]).any()  # row 1 goes on
    for rank, result in enumerate(ranks):
        assert torch.equal(result["generate pair"].tokens, expected.sequences[:, 4096:]), f"rank {rank}"
        torch.testing.assert_close(result["generate pair"].logits, torch.stack(expected.logits, dim=1).float(),
                                   atol=1e-5, rtol=1e-5, msg=f"rank {rank}")
        # Row 0 ends at its second token and repeats the first end id; row 1 decodes on, as transformers pads.
        assert torch.equal(result["generate pair eos"].tokens, ended[:, 4096:]), f"rank {rank}"
        assert (result["generate pair eos"].tokens[0, 1:] == end_ids[0]).all()


def test_bad_max_new_tokens_is_refused_before_any_transfer():
    with pytest.raises(ShapeError, match=r"max_new_tokens: 0; allowed: a whole number of at least 1"):
        context_parallel_generate(tiny_model("llama", layers=1), prompt()[:, :2048], SequenceSplit((2048, 2048)), 0)


def test_a_plan_per_layer_gives_sparsify_with_that_layer_sink_window_on_one_process(ranks):
    split = SequenceSplit.even(4096, RANKS, ALIGN)
    policy = {"rules": [{"when": {"phase": "prefill", "layers": [1]}, "use": "sink_window",
                         "with": {"sink": SINK, "window": WINDOW}}]}
    fast = sparsify.compile(tiny_model("llama", layers=MODEL_LAYERS), policy, cost_model_fallback=False)
    with torch.no_grad():
        expected = fast(prompt()).logits
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["model layout layer 1"].logits,
                                   expected[:, split.start(rank):split.end(rank)], atol=1e-5, rtol=1e-5,
                                   msg=f"rank {rank}")
    # Layer 0 over the ring (each rank the other's slice), layer 1 the sink and window blocks (rank 1 only).
    assert [result["model layout layer 1"].kv_bytes_received for result in ranks] == [
        kv_bytes(2048), kv_bytes(2048) + kv_bytes(5 * BLOCK_N)]


def test_models_context_parallel_prefill_cannot_serve_are_refused():
    split = SequenceSplit((2048, 2048))
    windowed = tiny_model("llama", layers=1)
    windowed.model.layers[0].self_attn.sliding_window = 32
    with pytest.raises(ShapeError, match=r"model.layers.0.self_attn.sliding_window: 32; allowed: None"):
        context_parallel_prefill(windowed, prompt()[:, :2048], split)
    with pytest.raises(SparsifyError, match="model.training: True; allowed: eval mode"):
        context_parallel_prefill(tiny_model("llama", layers=1).train(), prompt()[:, :2048], split)
    plan = plan_kv_fetch(window_layout(4096), SequenceSplit((1024, 3072)))
    with pytest.raises(ShapeError, match=r"plan: made for SequenceSplit\(lengths=\(1024, 3072\)\); allowed: a plan "
                                         r"of the split given"):
        context_parallel_prefill(tiny_model("llama", layers=1), prompt()[:, :2048], split, plan=plan)


def test_a_policy_gives_each_layer_the_ring_or_a_sink_window_plan_and_others_are_refused():
    split = SequenceSplit.even(4096, RANKS, ALIGN)
    assert plan_for_policy(sparsify.Policy.load("dense"), MODEL_LAYERS, split) == (None, None)
    first, second = plan_for_policy(sparsify.Policy.load(SINK_WINDOW_POLICY), MODEL_LAYERS, split)
    assert first is second and first.split == split  # one plan for the same parameters
    assert first.keys(1, 0) == ((0, 64), (1792, 2048))  # the sink and the window before 2048
    # The sink_window preset: layers 0-1 dense (the ring), the rest the plan; its decode (dense) is allowed.
    plans = plan_for_policy(sparsify.Policy.load("sink_window"), 4, split)
    assert plans[:2] == (None, None) and plans[2] is plans[3] is not None
    refused = {
        "resa on layer 0's decode; allowed under context parallelism: dense":
            {"rules": [{"when": {"phase": "decode"}, "use": "resa"}]},
        "block_topk on layer 0's prefill; allowed under context parallelism: dense, sink_window":
            {"rules": [{"use": "block_topk"}]},
        r"rules\[0\].when.heads: context parallelism runs a layer's heads alike":
            {"rules": [{"when": {"heads": "0-1"}, "use": "sink_window"}]},
        # A decode rule that holds only once generation has gone past the prompt.
        r"rules\[0\]: lessismore on layer 0's decode":
            {"rules": [{"when": {"phase": "decode", "min_seq_len": 4100, "max_seq_len": 4101}, "use": "lessismore",
                        "with": {"dense_layers": [], "selection_layers": [0]}}]},
        # The default between two dense rules' ranges: the lengths 4099-4101 fall to it.
        r"default: lessismore on layer 0's decode":
            {"rules": [{"when": {"max_seq_len": 4098}, "use": "dense"},
                       {"when": {"min_seq_len": 4102}, "use": "dense"}],
             "default": {"use": "lessismore", "with": {"dense_layers": [], "selection_layers": [0]}}},
    }
    for message, policy in refused.items():
        with pytest.raises(PolicyError, match=message):
            plan_for_policy(sparsify.Policy.load(policy), MODEL_LAYERS, split, max_new_tokens=8)


def test_a_plan_per_layer_of_the_wrong_length_or_type_is_refused():
    split = SequenceSplit((2048, 2048))
    with pytest.raises(ShapeError, match=r"plan: 2 entries; allowed: one per layer, 1"):
        context_parallel_prefill(tiny_model("llama", layers=1), prompt()[:, :2048], split, plan=[None, None])
    with pytest.raises(ShapeError, match=r"plan: dict; allowed: None \(the ring\), a KVFetchPlan, or a tuple or list"):
        context_parallel_prefill(tiny_model("llama", layers=1), prompt()[:, :2048], split, plan={0: None})
