"""SparseD (``sparsify/methods/sparsed.py``, ``kernels/sparsed.py``) and the diffusion runtime
(``sparsify/diffusion.py``): the pattern against its definition computed densely, the tile-score kernel against
its reference, the step switch, compile counts, and the loop under the dense policy against the uncompiled model."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig

import sparsify
from sparsify.diffusion import MaskedDiffusionLM, generate, transfer_counts
from sparsify.errors import PolicyError, ShapeError, StateError
from sparsify.kernels import sparsed as kernels
from sparsify.methods.sparsed import switch_step
from sparsify.state import DIFFUSION_CLOCK, SequenceState, StateLayout, StateSize

PROMPT, GEN = 150, 64


def tiny_diffusion_lm(seed: int = 0, layers: int = 2) -> MaskedDiffusionLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         mask_token_id=95, attn_implementation="sdpa")
    return MaskedDiffusionLM(config).eval()


def sparsed(**params):
    return {"rules": [{"when": {"phase": "diffusion"}, "use": "sparsed", "with": {"block_size": 32, **params}}]}


def dense_definition(q, k, prompt_tokens, block_size, keep_ratio, scale):
    """The pattern from the whole N x N softmax: tile means over each tile's pairs, top-k per query block over all
    key blocks (kept among the prompt's), OR top-k over the generation blocks of the softmax over generation keys."""
    logits = torch.matmul(q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2))
    logits = logits * scale
    length = q.shape[2]
    blocks = -(-length // block_size)
    gen_block = -(-prompt_tokens // block_size)

    def tile_means(p):
        return torch.stack([torch.stack([p[..., i * block_size:(i + 1) * block_size,
                                           j * block_size:(j + 1) * block_size].mean((-1, -2))
                                         for j in range(blocks)], -1) for i in range(blocks)], -2)

    def top(scores, count):
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(count, -1).indices, True)

    kept = top(tile_means(torch.softmax(logits, -1)), min(blocks, int(blocks * keep_ratio) + 1))
    if gen_block < blocks:
        kept[..., gen_block:] = False
        n_gen = blocks - gen_block
        p_gen = torch.softmax(logits[..., gen_block * block_size:], -1)  # renormalised over generation keys
        gen = torch.stack([torch.stack([p_gen[..., i * block_size:(i + 1) * block_size,
                                              j * block_size:(j + 1) * block_size].mean((-1, -2))
                                        for j in range(n_gen)], -1) for i in range(blocks)], -2)
        kept[..., gen_block:] |= top(gen, min(n_gen, int(n_gen * keep_ratio) + 1))
    return kept


@pytest.mark.parametrize("length,prompt,block", [(150, 100, 16), (130, 130, 32), (97, 20, 16), (64, 0, 16)])
def test_pattern_equals_its_dense_definition_with_isolation(length, prompt, block):
    torch.manual_seed(length)
    q, k = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16)
    scale = 16 ** -0.5
    lse = torch.logsumexp(torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * scale, -1)
    gen_start = kernels.generation_start_block(prompt, block) * block
    has_gen = gen_start < length
    lse_gen = torch.logsumexp(torch.matmul(q, k.repeat_interleave(2, 1)[:, :, gen_start:].transpose(-1, -2)) * scale,
                              -1) if has_gen else None
    scores, scores_gen = kernels.tile_scores_reference(q, k, lse, lse_gen, gen_start, block, scale)
    kept = kernels.select_blocks(scores, scores_gen, gen_start // block, 0.3)
    assert torch.equal(kept, dense_definition(q, k, prompt, block, 0.3, scale))


@pytest.mark.parametrize("length,dim,block", [(150, 16, 16), (200, 64, 32), (77, 24, 16)])
def test_tile_score_kernel_equals_reference(length, dim, block):
    torch.manual_seed(dim)
    q, k = torch.randn(1, 4, length, dim), torch.randn(1, 2, length, dim)
    scale = dim ** -0.5
    lse = torch.logsumexp(torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * scale, -1)
    gen_start = 2 * block
    lse_gen = torch.logsumexp(torch.matmul(q, k.repeat_interleave(2, 1)[:, :, gen_start:].transpose(-1, -2)) * scale,
                              -1)
    expected, expected_gen = kernels.tile_scores_reference(q, k, lse, lse_gen, gen_start, block, scale)
    got, got_gen = kernels.tile_scores(q, k, lse, lse_gen, gen_start, block, scale)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_gen, expected_gen, rtol=1e-4, atol=1e-6)


def test_tile_scores_reject_bad_shapes():
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 3, 40, 16)
    with pytest.raises(ShapeError, match="multiple of Hkv"):
        kernels.tile_scores_reference(q, k, torch.zeros(1, 4, 40), None, 0, 16, 0.25)
    with pytest.raises(ShapeError, match="block_size"):
        kernels.tile_scores_reference(q, k[:, :2], torch.zeros(1, 4, 40), None, 0, 24, 0.25)


def test_kernel_layout_visits_exactly_the_kept_blocks():
    torch.manual_seed(0)
    kept = torch.rand(1, 2, 5, 5) < 0.4
    layout = kernels.kernel_layout(kept, 150, 32, 16, width=10)           # 150 = 4 blocks of 32 and a tail
    visible = layout.to_dense_mask()
    tokens = kept.repeat_interleave(32, -1).repeat_interleave(32, -2)[..., :150, :150]
    assert torch.equal(visible, tokens)
    assert layout.kv_indices.shape == layout.full_kv_indices.shape  # the kernel reads both lists with one stride
    with pytest.raises(ShapeError, match="width"):
        kernels.kernel_layout(torch.ones(1, 1, 5, 5, dtype=torch.bool), 150, 32, 16, width=4)


def test_the_kernel_refuses_lists_of_different_widths():
    """The kernel walks the partial and full lists with one set of strides: lists of two widths are refused, not
    read wrongly."""
    from sparsify.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference
    from sparsify.kernels.layout import dense_layout

    layout = dense_layout(64, 64, 32, 16)
    narrow = dataclasses.replace(layout, kv_indices=layout.kv_indices[..., :1])
    q = k = v = torch.randn(1, 2, 64, 16)
    for attend in (block_sparse_attention, block_sparse_attention_reference):
        with pytest.raises(ShapeError, match="one shape"):
            attend(q, k, v, narrow)


def test_with_keep_ratio_one_the_sparse_steps_equal_dense():
    model = tiny_diffusion_lm()
    prompt = torch.randint(0, 90, (1, PROMPT))
    expected = generate(model, prompt, gen_length=GEN, steps=16, block_length=32)
    fast = sparsify.compile(model, sparsed(keep_ratio=1.0), cost_model_fallback=False)
    assert torch.equal(fast.generate_diffusion(prompt, gen_length=GEN, steps=16, block_length=32), expected)
    assert fast.sparsify.applied()[0] == {"sparsed"}


def test_dense_policy_loop_equals_the_uncompiled_model():
    model = tiny_diffusion_lm(1)
    prompt = torch.randint(0, 90, (2, 40))
    expected = model.generate_diffusion(prompt, gen_length=32, steps=8)
    assert torch.equal(sparsify.compile(model, "dense").generate_diffusion(prompt, gen_length=32, steps=8), expected)


def test_switch_at_end_and_100_steps_compile_at_most_twice():
    """Steps up to the switch are exact dense attention; the first sparse step differs; one graph serves all 100
    steps (the clock is a host tensor the ops read, not a guard)."""
    model = tiny_diffusion_lm(2)
    prompt = torch.randint(0, 90, (1, PROMPT))
    steps, fraction = 100, 0.2
    end = switch_step(steps, fraction)
    dense_logits, sparse_logits = [], []
    generate(model, prompt, gen_length=100, steps=steps,
             observer=lambda step, x, logits: dense_logits.append(logits))
    fast = sparsify.compile(model, sparsed(keep_ratio=0.2, dense_fraction=fraction), cost_model_fallback=False)
    frames_before = counters["stats"]["unique_graphs"]
    state = fast.sparsify.sequence_state(1, PROMPT + 100, torch.device("cpu"), torch.float32)
    x = torch.cat([prompt, torch.full((1, 100), model.config.mask_token_id)], 1)
    for step in range(steps):  # the dense run's first input at every step: only attention differs
        state.set_clock(step, steps, PROMPT)
        sparse_logits.append(fast(x, sparsify_state=state).logits)
    first = dense_logits[0]
    for step in range(end + 1):
        torch.testing.assert_close(sparse_logits[step], first, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sparse_logits[end + 1], first, rtol=1e-4, atol=1e-5)
    assert fast.sparsify.backend.compilations <= 2
    assert counters["stats"]["unique_graphs"] - frames_before <= 2


def test_a_sparse_step_without_a_built_pattern_is_refused():
    model = tiny_diffusion_lm(3)
    fast = sparsify.compile(model, sparsed(), cost_model_fallback=False)
    state = fast.sparsify.sequence_state(1, 96, torch.device("cpu"), torch.float32)
    state.set_clock(50, 100, 32)  # past the switch at 21, never built
    with pytest.raises(StateError, match="never built"):
        fast(torch.randint(0, 90, (1, 96)), sparsify_state=state)


def test_a_new_request_rebuilds_its_pattern():
    """Two generate_diffusion calls with different prompts: the second gives what it gives on a fresh compile."""
    model = tiny_diffusion_lm(4)
    first, second = torch.randint(0, 90, (1, PROMPT)), torch.randint(0, 90, (1, PROMPT))
    fast = sparsify.compile(model, sparsed(keep_ratio=0.2), cost_model_fallback=False)
    fast.generate_diffusion(first, gen_length=GEN, steps=8)
    again = fast.generate_diffusion(second, gen_length=GEN, steps=8)
    fresh = sparsify.compile(model, sparsed(keep_ratio=0.2), cost_model_fallback=False)
    assert torch.equal(again, fresh.generate_diffusion(second, gen_length=GEN, steps=8))


def test_sparsed_stays_off_causal_models_with_its_reason():
    from conftest import tiny_model

    fast = sparsify.compile(tiny_model(), {"rules": [{"use": "sparsed"}]})  # no phase condition
    fast(torch.randint(0, 100, (1, 64)))
    methods, reasons = fast.sparsify.applied()
    assert "sparsed" not in methods
    assert any("sparsed serves phases diffusion, not prefill" in reason for reason in reasons)


def test_bad_parameters_name_the_field():
    with pytest.raises(PolicyError, match="block_size"):
        sparsify.compile(tiny_diffusion_lm(), sparsed(block_size=48))
    with pytest.raises(PolicyError, match="keep_ratio"):
        sparsify.compile(tiny_diffusion_lm(), sparsed(keep_ratio=0.0))
    with pytest.raises(PolicyError, match="dense_fraction"):
        sparsify.compile(tiny_diffusion_lm(), sparsed(dense_fraction=1.0))


def test_loop_arguments_are_checked():
    model = tiny_diffusion_lm()
    prompt = torch.randint(0, 90, (1, 8))
    with pytest.raises(ShapeError, match="block_length"):
        generate(model, prompt, gen_length=30, block_length=16)
    with pytest.raises(ShapeError, match="multiple of the number of blocks"):
        generate(model, prompt, gen_length=32, block_length=16, steps=5)
    with pytest.raises(ValueError, match="remasking"):
        generate(model, prompt, gen_length=16, steps=4, remasking="greedy")


def test_transfer_counts_follow_the_linear_schedule():
    masked = torch.ones(2, 10, dtype=torch.bool)
    masked[1, :3] = False
    counts = transfer_counts(masked, 4)
    assert counts.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


def test_the_clock_is_one_host_tensor_for_every_layer():
    layout = StateLayout(((("sparsed.clock", DIFFUSION_CLOCK),), (("sparsed.clock", DIFFUSION_CLOCK),)))
    state = SequenceState(layout, StateSize(batch=2, capacity=8), torch.device("cpu"))
    state.set_clock(3, 10, 5)
    assert state.layer(0)[0] is state.layer(1)[0] is state.clock
    assert state.clock.tolist() == [[3, 10, 5], [3, 10, 5]]
    state.repeat_rows(2)
    assert state.layer(0)[0] is state.layer(1)[0] is state.clock and state.clock.shape == (4, 3)


def test_the_preset_serves_both_its_block_sizes():
    """The preset's two rules give sparsed two parameter sets (block 128 from 4K tokens, 32 below): each keeps its
    own state, so a short sequence runs on 32-token blocks."""
    model = tiny_diffusion_lm(5)
    prompt = torch.randint(0, 90, (1, PROMPT))
    fast = sparsify.compile(model, "sparsed", cost_model_fallback=False)
    fast.generate_diffusion(prompt, gen_length=GEN, steps=16)
    layout = fast.sparsify.backend.state_layout
    assert layout.prefixes[0] == ("sparsed", "sparsed#2")
    assert fast.sparsify.applied()[0] == {"sparsed"}


def test_the_benchmark_sweep_refuses_block_sizes_its_tiles_do_not_fit(capsys):
    from benchmarks import sparsed as bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--sweep", "--block-size", "32"])
    assert exit_info.value.code == 2
    assert "--sweep: --block-size 32; allowed: 128" in capsys.readouterr().err


def test_the_per_step_fidelity_plot_is_drawn(tmp_path):
    from sparsify.evaluation import plots

    runs = [{"seq_len": length, "agreement": 0.5, "kl_by_step": [0.0] * 4 + [0.01] * 4,
             "argmax_agreement_by_step": [1.0] * 4 + [0.9] * 4} for length in (2048, 2048, 4096)]
    path = plots.diffusion_steps(runs, 3, tmp_path / "steps.png", "sparsed")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
