"""sparsify.export: the exported program holds sparsify ops, round-trips through .pt2, and runs in a fresh process."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model

import sparsify
from sparsify.errors import PolicyError


def op_targets(program):
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def test_export_rewrites_attention_and_round_trips_in_a_fresh_process(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 32))
    # return_dict=False: transformers' output classes cannot be deserialised from a .pt2 in another process.
    program = sparsify.export(model, (ids,), "dense", kwargs={"use_cache": False, "return_dict": False})
    targets = op_targets(program)
    assert targets.count("sparsify.dense_attention.default") == 3
    assert not any("scaled_dot_product" in t for t in targets)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        torch.testing.assert_close(program.module()(ids, use_cache=False, return_dict=False)[0], expected,
                                   atol=1e-5, rtol=1e-5)
    path = tmp_path / "model.sparse.pt2"
    torch.export.save(program, path)
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, sparsify
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert any(str(n.target) == "sparsify.dense_attention.default" for n in program.graph.nodes)
        out = program.module()(io["ids"], use_cache=False, return_dict=False)[0]
        torch.testing.assert_close(out, io["expected"], atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


class CausalStack(torch.nn.Module):
    """Three causal self-attention layers calling SDPA with is_causal (as HF does outside export)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim + 2 * dim * kv_heads // heads) for _ in range(3))

    def forward(self, x):
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        for layer in self.layers:
            q, k, v = layer(x).split([dim, head_dim * self.kv_heads, head_dim * self.kv_heads], dim=-1)
            q = q.view(batch, length, self.heads, head_dim).transpose(1, 2)
            k, v = (t.view(batch, length, self.kv_heads, head_dim).transpose(1, 2) for t in (k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + out.transpose(1, 2).reshape(batch, length, dim)
        return x


def test_export_with_a_sparse_method_shows_the_plan_and_kernel_nodes_and_saves(tmp_path):
    torch.manual_seed(0)
    model = CausalStack().eval()
    x = torch.randn(1, 40, 32)
    policy = {"rules": [{"when": {"layers": "1-"}, "use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    program = sparsify.export(model, (x,), policy, cost_model_fallback=False)
    targets = op_targets(program)
    assert targets.count("sparsify.block_sparse_attention.default") == 2
    assert targets.count("sparsify.sink_window_layout.default") == 1  # one plan node, shared by both layers
    assert targets.count("sparsify.dense_attention.default") == 1
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), compiled(x), atol=1e-5, rtol=1e-5)
        assert (program.module()(x) - model(x)).abs().max() > 1e-3
    path = tmp_path / "stack.sparse.pt2"
    torch.export.save(program, path)  # the plan is a node, not a tensor attribute: the program saves
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(path).module()(x), compiled(x), atol=1e-5, rtol=1e-5)


def test_export_of_hf_models_checks_their_materialised_mask():
    """Under export, transformers passes its causal mask as a tensor: the sparse method applies, behind a check of
    the mask on every call."""
    model = tiny_model("llama")
    policy = {"rules": [{"use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    ids = torch.randint(0, 256, (1, 40))
    program = sparsify.export(model, (ids,), policy, kwargs={"use_cache": False}, cost_model_fallback=False)
    targets = op_targets(program)
    assert targets.count("sparsify.block_sparse_attention.default") == 3
    assert targets.count("sparsify.mask_is_causal.default") == 1
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    with torch.no_grad():
        exported = program.module()(ids, use_cache=False)
        torch.testing.assert_close(exported.logits, compiled(ids).logits, atol=1e-5, rtol=1e-5)


def test_export_refuses_length_rules_on_dynamic_lengths():
    policy = {"rules": [{"when": {"min_seq_len": 1024}, "use": "sink_window"}]}
    dynamic = {"x": {1: torch.export.Dim("seq", min=2, max=4096)}}
    with pytest.raises(PolicyError, match=r"rules\[0\].when: min_seq_len/max_seq_len cannot be decided"):
        sparsify.export(CausalStack().eval(), (torch.randn(1, 32, 32),), policy, dynamic_shapes=dynamic)


def test_a_dynamic_length_export_refuses_the_cost_models_choice_by_length():
    """compile() re-decides per call and a static export decides for its length; a program exported for every
    length cannot choose dense at short ones, so the default cost_model_fallback=True is refused there."""
    torch.manual_seed(0)
    model = CausalStack().eval()
    policy = {"rules": [{"use": "sink_window", "with": {"sink": 2, "window": 8}}]}
    x = torch.randn(1, 40, 32)
    dynamic = {"x": {1: torch.export.Dim("seq", min=2, max=4096)}}
    with pytest.raises(PolicyError, match=r"^cost_model_fallback: True cannot be honoured in an export whose key "
                                          r"length is dynamic .* pass cost_model_fallback=False"):
        sparsify.export(model, (x,), policy, dynamic_shapes=dynamic)

    everywhere = sparsify.export(model, (x,), policy, dynamic_shapes=dynamic, cost_model_fallback=False)
    assert op_targets(everywhere).count("sparsify.block_sparse_attention.default") == 3
    compiled = sparsify.compile(model, policy, cost_model_fallback=False)
    with torch.no_grad():
        for length in (24, 40):
            x = torch.randn(1, length, 32)
            torch.testing.assert_close(everywhere.module()(x), compiled(x), atol=1e-5, rtol=1e-5)

    static = sparsify.export(model, (x,), policy)  # 40 keys: the cost model keeps them dense, as compile() does
    assert "sparsify.block_sparse_attention.default" not in op_targets(static)
    assert op_targets(sparsify.export(model, (x,), "dense", dynamic_shapes=dynamic)).count(
        "sparsify.dense_attention.default") == 3  # nothing to decide by length: accepted
