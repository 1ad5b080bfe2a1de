"""LessIsMore (``sparsify/methods/lessismore.py``): the rank-major unification, the token set and its kernels
(``kernels/token_set.py``), the selection layer's scores from the decode kernel's pass, the cross-layer graph
edges, and decode through generate()."""

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyError, ShapeError
from sparsify.kernels.decode import decode_attention, decode_attention_reference, scores_pass_launch, token_pass_launch
from sparsify.kernels.token_set import token_set, token_set_reference, unify_rank_major
from sparsify.methods.lessismore import select_tokens

PROMPT = 48


def lessismore(**params):
    return {"rules": [{"when": {"phase": "decode"}, "use": "lessismore", "with": {"budget": 16, "sink": 2,
                                                                                   **params}}]}


def rank_major_definition(rankings: list[list[int]], width: int) -> list[int]:
    """Rank 0 of every head, then rank 1, ..., each position at its first appearance, the first ``width``."""
    kept: list[int] = []
    for rank in range(len(rankings[0])):
        for ranking in rankings:
            if ranking[rank] not in kept and len(kept) < width:
                kept.append(ranking[rank])
    return kept


@pytest.mark.parametrize("positions", [10, 40, 1000])  # 10: heavy duplication
def test_the_unification_is_the_rank_major_definition(positions):
    generator = torch.Generator().manual_seed(positions)
    batch, groups, heads, k = 2, 3, 4, 8
    top = torch.stack([torch.randperm(positions, generator=generator)[:k] for _ in range(batch * groups * heads)])
    top = top.view(batch, groups, heads, k)
    valid = torch.ones_like(top, dtype=torch.bool)
    valid[1, 2, :, 5:] = False  # some entries do not count (a short middle region)
    unified = unify_rank_major(top, valid, k, positions)
    for b in range(batch):
        for g in range(groups):
            rankings = [[p if ok else None for p, ok in zip(top[b, g, h].tolist(), valid[b, g, h].tolist())]
                        for h in range(heads)]
            expected = [p for p in rank_major_definition(rankings, k + heads * k) if p is not None][:k]
            assert unified[b, g, :len(expected)].tolist() == expected
            assert (unified[b, g, len(expected):] == -1).all()


def middle_only(scores, lengths, starts, sink, recent):
    """Scores -inf outside each row's middle region, as the selection pass writes them."""
    position = torch.arange(scores.shape[-1])
    middle = (position >= (starts + sink)[:, None]) & (position < (lengths - recent)[:, None])
    return scores.masked_fill(~middle[:, None], float("-inf"))


def test_the_set_is_sink_unified_middle_and_recent_tokens():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 64, generator=generator)
    lengths, starts = torch.tensor([64, 50]), torch.tensor([0, 6])
    tokens, counts = select_tokens(middle_only(scores, lengths, starts, 2, 4), lengths, starts, budget=16, recent=4,
                                   sink=2, groups=1, kv_heads=2)
    assert tokens.shape == (2, 2, 16) and tokens.dtype == torch.int32 and counts.tolist() == [[16, 16]] * 2
    for b, (length, start) in enumerate(zip(lengths.tolist(), starts.tolist())):
        assert tokens[b, 0].tolist() == tokens[b, 1].tolist()  # one set for every KV head
        chosen = tokens[b, 0].tolist()
        assert chosen[:2] == [start, start + 1] and chosen[-4:] == list(range(length - 4, length))
        middle = scores[b, :, start + 2:length - 4]
        rankings = (middle.argsort(-1, descending=True) + start + 2).tolist()
        assert chosen[2:-4] == rank_major_definition(rankings, 10)
    lengths, starts = torch.tensor([20, 64]), torch.tensor([10, 0])
    fits, _ = select_tokens(middle_only(scores, lengths, starts, 2, 4), lengths, starts, 16, 4, 2, 1, 2)
    assert fits[0, 0].tolist() == list(range(10, 26))  # 10 real tokens: all of them (past the length: ignored)


def rankings(batch, heads, k, positions, generator, duplication):
    """Per-head rankings (B, H, k) best first, distinct within a head; with ``duplication`` every head draws from
    a few shared positions, so most readings repeat an earlier one. Values descending, -inf at a few tails."""
    pool = min(positions, k + 3) if duplication else positions
    top = torch.stack([torch.randperm(pool, generator=generator)[:k] for _ in range(batch * heads)])
    values = torch.sort(torch.randn(batch * heads, k, generator=generator), descending=True).values
    values[::3, k // 2:] = float("-inf")  # heads whose middle region ran out of candidates
    return top.view(batch, heads, k), values.view(batch, heads, k)


@pytest.mark.parametrize("duplication", [False, True])
@pytest.mark.parametrize("groups, kv_heads", [(1, 3), (1, 4), (2, 2)])
def test_the_token_set_kernels_equal_the_reference(duplication, groups, kv_heads):
    """The kernels against the PyTorch lists: unified (3 KV heads: a copy count not a power of 2) and per group,
    heavy duplication, heads that ran out, rows that fit the budget, left-padded starts, a shifted length;
    rankings of 1200 x 4 heads take several steps of the kernel's walk."""
    generator = torch.Generator().manual_seed(7 + groups + duplication)
    batch, heads, positions, k = 3, 4, 3000, 1200
    budget, sink, recent = k + 300 + 6 + 8, 6, 8  # a middle of 1500: more than one head's 1200
    top, values = rankings(batch, heads, k, positions, generator, duplication)
    lengths, starts = torch.tensor([2999, 1100, 2500]), torch.tensor([0, 20, 700])  # row 1 fits
    arguments = dict(budget=budget, recent=recent, sink=sink, groups=groups, kv_heads=kv_heads, positions=positions,
                     length_shift=1)
    tokens, counts = token_set(top, values, lengths, starts, **arguments)
    expected, expected_counts = token_set_reference(top, values, lengths, starts, **arguments)
    assert torch.equal(tokens, expected) and torch.equal(counts, expected_counts)
    if duplication:
        assert (expected[0] == -1).any()  # fewer distinct positions than the width: the rest is -1
    without_values, _ = token_set(torch.where(values > float("-inf"), top, -1), None, lengths, starts, **arguments)
    assert torch.equal(without_values, expected)  # -1 positions (a tensor-parallel gather's) count as missing


def test_token_set_refuses_bad_inputs_naming_them():
    top, values = torch.zeros(1, 4, 8, dtype=torch.int64), torch.zeros(1, 4, 8)
    lengths = starts = torch.zeros(1, dtype=torch.int64)
    good = dict(budget=16, recent=2, sink=2, groups=1, kv_heads=2, positions=64)
    for change, message in (({"groups": 3}, "groups = 3 must divide"), ({"budget": 4}, "budget 4 must exceed"),
                            ({"budget": 11}, "rankings of 8 per head; at most"), ({"positions": 0}, "positions = 0")):
        with pytest.raises(ShapeError, match=message):
            token_set_reference(top, values, lengths, starts, **{**good, **change})
    with pytest.raises(ShapeError, match="top_values must have top_positions' shape"):
        token_set(top, values[..., :4], lengths, starts, **good)
    with pytest.raises(ShapeError, match=r"lengths must be an int32 or int64 tensor of shape \(1,\)"):
        token_set(top, values, lengths.float(), starts, **good)


def test_the_decode_kernel_gives_the_scores_of_its_own_pass():
    generator = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 1, 16, generator=generator), *torch.randn(2, 2, 2, 37, 16, generator=generator)
    lengths, padding = torch.tensor([37, 20]), torch.rand(2, 37, generator=generator) > 0.2
    ours, reference = torch.full((2, 4, 37), 5.0), torch.full((2, 4, 37), 5.0)
    decode_attention(q, k, v, lengths, None, key_padding=padding, scores_out=ours, num_splits=3)
    decode_attention_reference(q, k, v, lengths, None, key_padding=padding, scores_out=reference)
    torch.testing.assert_close(ours, reference)
    definition = torch.einsum("bhd,bhld->bhl", q[:, :, 0], k.repeat_interleave(2, 1)) * 16 ** -0.5
    visible = padding[:, None].expand(2, 4, 37) & (torch.arange(37) < lengths[:, None, None])
    torch.testing.assert_close(ours[visible], definition[visible])
    assert (ours[~visible & (torch.arange(37) < lengths[:, None, None])] == float("-inf")).all()  # padding
    assert (ours[1, :, 20:] == float("-inf")).all()  # past the length: -inf, ready for a top-k


def test_the_scores_are_minus_inf_outside_the_middle_region():
    """A selection's window: scored from each row's start + sink to its length (offset + shift) - recent, -inf
    elsewhere; over several splits, a cache longer than the lengths."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, 1, 16, generator=generator), *torch.randn(2, 2, 2, 300, 16, generator=generator)
    offsets, starts = torch.tensor([250, 99]), torch.tensor([0, 30])
    window = dict(scores_start=starts, scores_skip=(3, 5), length_shift=1)
    ours, reference = torch.full((2, 4, 300), 5.0), torch.full((2, 4, 300), 5.0)
    out, _ = decode_attention(q, k, v, offsets, None, scores_out=ours, num_splits=3, block_n=32, **window)
    expected, _ = decode_attention_reference(q, k, v, offsets, None, scores_out=reference, **window)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(out, expected)
    full = torch.einsum("bhd,bhld->bhl", q[:, :, 0], k.repeat_interleave(2, 1)) * 16 ** -0.5
    for b, (length, start) in enumerate(zip((offsets + 1).tolist(), starts.tolist())):
        torch.testing.assert_close(ours[b, :, start + 3:length - 5], full[b, :, start + 3:length - 5])
        assert (ours[b, :, :start + 3] == float("-inf")).all() and (ours[b, :, length - 5:] == float("-inf")).all()


def test_the_selection_pass_launch_gives_the_same_scores_and_output(monkeypatch):
    """The launch the selection op uses (128-key tiles, 2 stages) over several splits: a nominal 132-SM device and
    a cache of 300 keys (3 tiles)."""
    monkeypatch.setattr("sparsify.kernels.decode.INTERPRETER_MULTIPROCESSORS", 132)
    generator = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 4, 1, 16, generator=generator), *torch.randn(2, 2, 2, 300, 16, generator=generator)
    lengths, padding = torch.tensor([300, 170]), torch.rand(2, 300, generator=generator) > 0.2
    launch = scores_pass_launch(300, q.device)
    assert launch == {"block_n": 128, "num_stages": 2, "num_splits": 3}
    ours, reference = torch.full((2, 4, 300), 5.0), torch.full((2, 4, 300), 5.0)
    out, _ = decode_attention(q, k, v, lengths, None, key_padding=padding, scores_out=ours, **launch)
    expected, _ = decode_attention_reference(q, k, v, lengths, None, key_padding=padding, scores_out=reference)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(out, expected)


def test_scores_in_the_models_dtype_are_the_float32_scores_rounded():
    """The selection op writes its scores in q's dtype (bfloat16 here): the kernel's, the reference's and the
    float32 scores rounded agree, -inf in the same places."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (x.bfloat16() for x in (torch.randn(2, 4, 1, 16, generator=generator),
                                      *torch.randn(2, 2, 2, 200, 16, generator=generator)))
    window = dict(scores_start=torch.tensor([0, 9]), scores_skip=(2, 4))
    lengths = torch.tensor([200, 150])
    ours, reference = (torch.empty(2, 4, 200, dtype=torch.bfloat16) for _ in range(2))
    full = torch.empty(2, 4, 200)
    out, _ = decode_attention(q, k, v, lengths, None, scores_out=ours, num_splits=2, block_n=32, **window)
    decode_attention_reference(q, k, v, lengths, None, scores_out=reference, **window)
    expected, _ = decode_attention_reference(q, k, v, lengths, None, scores_out=full, **window)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    assert torch.equal(reference, full.bfloat16())
    torch.testing.assert_close(ours, reference, atol=1e-2, rtol=1e-2)
    assert torch.equal(ours == float("-inf"), full == float("-inf"))
    with pytest.raises(ShapeError, match=r"scores_out must be a float32 \(or torch.bfloat16, q's dtype\) tensor"):
        decode_attention_reference(q, k, v, lengths, None, scores_out=ours.half())


def test_the_token_list_launch_gives_the_same_output(monkeypatch):
    """The launch the sparse layers use (128-token tiles, 2 stages, about 2 programs per SM, no split left
    empty) on a nominal 132-SM device, over lists of 300 positions (3 tiles, one partly -1)."""
    monkeypatch.setattr("sparsify.kernels.decode.INTERPRETER_MULTIPROCESSORS", 132)
    assert token_pass_launch(1, 8, 2048, torch.device("cpu")) == {"block_n": 128, "num_stages": 2, "num_splits": 16}
    assert token_pass_launch(8, 8, 2048, torch.device("cpu"))["num_splits"] == 4  # 5 wanted: 4 tiles each
    generator = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 4, 1, 16, generator=generator), *torch.randn(2, 2, 2, 700, 16, generator=generator)
    tokens = torch.stack([torch.randperm(700, generator=generator)[:300] for _ in range(4)]).view(2, 2, 300)
    tokens[1, :, 250:] = -1
    counts = torch.full((2, 2), 300)
    lists = dict(kv_token_indices=tokens.int(), kv_token_counts=counts.int())
    launch = token_pass_launch(2, 2, 300, q.device)
    assert launch == {"block_n": 128, "num_stages": 2, "num_splits": 3}
    out, _ = decode_attention(q, k, v, torch.tensor([700, 600]), None, **lists, **launch)
    expected, _ = decode_attention_reference(q, k, v, torch.tensor([700, 600]), None, **lists)
    torch.testing.assert_close(out, expected)


def test_with_the_budget_over_the_context_decode_equals_dense():
    model = tiny_model("llama", layers=6)
    compiled = sparsify.compile(model, lessismore(budget=PROMPT + 16))
    ids = torch.randint(0, 256, (1, PROMPT))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
        actual = compiled.generate(ids, max_new_tokens=12, do_sample=False)
    assert actual.tolist() == expected.tolist()
    assert compiled.sparsify.applied()[0] == {"lessismore"}


def test_the_graph_has_the_edges_the_policy_says():
    """6 layers, selection layers 2 and 4: layer 3 reads layer 2's set, layer 5 layer 4's; 0 and 1 stay dense."""
    model = tiny_model("llama", layers=6)
    compiled = sparsify.compile(model, lessismore(selection_layers=[2, 4]))
    with torch.no_grad():
        compiled.generate(torch.randint(0, 256, (1, PROMPT)), max_new_tokens=3, do_sample=False)
    decode = next(frame.last for frame in compiled.sparsify.frames if frame.last.annotations.attentions[0].phase
                  == "decode")
    assert [(e.producer, e.consumer) for e in decode.groups.edges] == [(2, 3), (4, 5)]
    ops = decode.rewrite.ops
    assert ops["sparsify.lessismore_select"] == 2 and ops["sparsify.token_decode"] == 2
    selects = [n for n in decode.gm.graph.nodes if n.target is torch.ops.sparsify.lessismore_select.default]
    readers = [n for n in decode.gm.graph.nodes if n.target is torch.ops.sparsify.token_decode.default]
    for select, reader in zip(selects, readers):  # the set flows from the selection node into its consumer
        assert select in _ancestors(reader)


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def test_64_decode_steps_do_not_recompile():
    model = tiny_model("llama", layers=4)
    compiled = sparsify.compile(model, lessismore())
    with torch.no_grad():
        compiled.generate(torch.randint(0, 256, (1, PROMPT)), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert compiled.sparsify.backend.compilations <= 3  # the prompt, the first decode step, symbolic decode


def test_a_left_padded_batch_gives_each_row_what_it_gives_alone():
    model = tiny_model("llama", layers=5)
    compiled = sparsify.compile(model, lessismore())
    torch.manual_seed(4)
    short, long = torch.randint(1, 256, (1, 30)), torch.randint(1, 256, (1, 40))
    batch = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1),
                      torch.ones(1, 40, dtype=torch.long)])
    with torch.no_grad():
        together = compiled.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                     pad_token_id=0)[:, 40:]
        alone = [compiled.generate(ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:] for ids in (short, long)]
    assert together.tolist() == torch.cat(alone).tolist()


def test_layers_the_model_does_not_have_are_refused_naming_the_field():
    model = tiny_model("llama", layers=4)
    with pytest.raises(PolicyError, match=r"selection_layers: layer 7 is out of range for a model with 4 layers"):
        sparsify.compile(model, lessismore(selection_layers=[2, 7]))
    with pytest.raises(PolicyError, match=r"selection_layers: \[1\] are also dense_layers"):
        sparsify.compile(model, lessismore(selection_layers=[1]))
    with pytest.raises(PolicyError, match="budget: 16 leaves no token to select"):
        sparsify.compile(model, lessismore(sink=12))
    with pytest.raises(PolicyError, match="Input should be 'unified' or 'per_kv_head'"):
        sparsify.compile(model, lessismore(selection="per_query_head"))
    with pytest.raises(PolicyError, match="selection_layers: none"):
        sparsify.compile(model, lessismore(selection_layers=[]))
    # Every problem on a line of its own, under the rule's path.
    with pytest.raises(PolicyError) as caught:
        sparsify.compile(model, lessismore(selection_layers=[9], sink=12))
    assert "rules[0].with.selection_layers: layer 9" in str(caught.value)
    assert "rules[0].with.budget: 16 leaves no token" in str(caught.value)


def test_a_set_gathered_over_ranks_is_one_per_row():
    scores = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="groups: 2 with heads_group 'tp'; a set gathered over ranks is one per row"):
        select_tokens(scores, torch.tensor([64]), torch.tensor([0]), 16, 4, 2, 2, 2, "tp")
