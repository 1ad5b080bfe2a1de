"""LessIsMore (``sparsify/methods/lessismore.py``): the rank-major unification, the token set, the selection
layer's scores from the decode kernel's pass, the cross-layer graph edges, and decode through generate()."""

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyError
from sparsify.kernels.decode import decode_attention, decode_attention_reference, scores_pass_launch
from sparsify.methods.lessismore import select_tokens, unify_rank_major

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


def test_the_set_is_sink_unified_middle_and_recent_tokens():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 64, generator=generator)
    lengths, starts = torch.tensor([64, 50]), torch.tensor([0, 6])
    tokens = select_tokens(scores, lengths, starts, budget=16, recent=4, sink=2, groups=1)
    assert tokens.shape == (2, 1, 16)
    for b, (length, start) in enumerate(zip(lengths.tolist(), starts.tolist())):
        chosen = tokens[b, 0].tolist()
        assert chosen[:2] == [start, start + 1] and chosen[-4:] == list(range(length - 4, length))
        middle = scores[b, :, start + 2:length - 4]
        rankings = (middle.argsort(-1, descending=True) + start + 2).tolist()
        assert chosen[2:-4] == rank_major_definition(rankings, 10)
    fits = select_tokens(scores, torch.tensor([20, 64]), torch.tensor([10, 0]), 16, 4, 2, 1)
    assert fits[0, 0].tolist() == list(range(10, 26))  # 10 real tokens: all of them (past the length: ignored)


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
    assert (ours[1, :, 20:] == 5.0).all()  # past the length: left as they were


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
        select_tokens(scores, torch.tensor([64]), torch.tensor([0]), 16, 4, 2, 2, "tp")
