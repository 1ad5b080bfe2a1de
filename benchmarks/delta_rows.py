"""Delta's strided rows (``sparsify.row_attention``) by dtype and tile size, against dense causal SDPA and
FlexAttention on the same inputs; and a float32 prefill forward of a SmolLM2-shaped model, dense against the base
and ``delta``.

Cases: ``rows_smollm2`` (9 query / 3 KV heads, D=64, 7501 tokens) and ``rows_llama3`` (32/8, D=128, 32771
tokens), odd lengths on purpose, in bfloat16 and float32. The rows are Delta's defaults (gamma 64, default tail).
Impls: ``sparsify`` (the tiles ``row_launch`` picks for the dtype), ``sparsify_<M>x<N>`` (the other choice: the
base's tiles or 128x128), ``flex`` (FlexAttention over the same rows, each key up to its row's position), ``sdpa``
(dense causal attention over every row, what Delta replaces). Every sparsify output is checked against the PyTorch
reference on the same inputs. ``model_forward``: one float32 prefill of a random-weight SmolLM2-shaped Llama at 7501
tokens, impls ``dense`` (transformers' SDPA), ``base`` (sink 64 + window 256) and ``delta`` (that base, gamma 64),
layers 0-2 dense in both, as ``benchmarks/policies/delta-w256*.yaml``.

    python -m benchmarks.delta_rows
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import sparsify
from sparsify.kernels.delta import packed_rows_layout, row_attention
from sparsify.methods.delta import row_launch
from sparsify.passes.cost_model import load_ceilings

from .common import relative_error, time_ms, write_result

SHAPES = {"rows_smollm2": (9, 3, 64, 7501), "rows_llama3": (32, 8, 128, 32771)}
GAMMA = 64


def rows_case(name: str, dtype: torch.dtype, flex, device) -> tuple[dict[str, float], dict[str, float]]:
    """Times (ms) and reference errors of one shape and dtype."""
    heads, kv_heads, dim, length = SHAPES[name]
    generator = torch.Generator(device=device).manual_seed(length)
    q = torch.randn(1, heads, length, dim, device=device, generator=generator).to(dtype)
    # K/V as a model holds them: (B, L, H, D) memory seen as (B, H, L, D).
    k, v = (torch.randn(1, length, kv_heads, dim, device=device, generator=generator).to(dtype).transpose(1, 2)
            for _ in range(2))
    ops, scale = torch.ops.sparsify, dim ** -0.5
    rows = ops.delta_rows(length, GAMMA, -1, True, device)
    chosen = row_launch(load_ceilings(device, dim).config_for(dim), dtype)
    other = (dataclasses.replace(chosen, block_m=128, block_n=128, num_warps=8) if dtype == torch.float32
             else load_ceilings(device, dim).config_for(dim))
    times, errors = {}, {}
    expected = row_attention(q[:, :, rows], k, v, packed_rows_layout(rows, heads // kv_heads, length, 128, 128),
                             scale).float()
    for impl, tile in (("sparsify", chosen), (f"sparsify_{other.block_m}x{other.block_n}", other)):
        layout = ops.row_layout(rows, length, length, heads // kv_heads, tile.block_m, tile.block_n)
        launch = (tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.use_tma)

        def call(layout=layout, launch=launch):
            return ops.row_attention(q, k, v, rows, *layout, scale, *launch)

        errors[impl] = relative_error(call(), expected)
        times[impl] = time_ms(call)
    positions = rows.to(torch.int32)

    def up_to_own_position(b, h, q_idx, kv_idx):
        return kv_idx <= positions[q_idx]

    block_mask = create_block_mask(up_to_own_position, None, None, rows.shape[0], length, device=device)
    picked = q[:, :, rows].contiguous()
    errors["flex"] = relative_error(flex(picked, k, v, block_mask=block_mask, scale=scale, enable_gqa=True), expected)
    times["flex"] = time_ms(lambda: flex(picked, k, v, block_mask=block_mask, scale=scale, enable_gqa=True))
    # Dense SDPA with K/V repeated per query head: its GQA path is not on every backend in float32.
    k_full, v_full = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    times["sdpa"] = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full,
                                                                                     is_causal=True))
    return times, errors


def model_forward(device, length: int = 7501) -> dict[str, float]:
    """Prefill forward times (ms) of a random-weight SmolLM2-shaped Llama in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, length), device=device)
    window = {"use": "sink_window", "with": {"sink": 64, "window": 256}}
    policies = {"base": window, "delta": {"use": "delta", "with": {"gamma": GAMMA, "base": window}}}
    runners = {"dense": model, **{name: sparsify.compile(
        model, {"rules": [{"when": {"layers": "0-2"}, "use": "dense"}, {"when": {"phase": "prefill"}, **rule}]},
        cost_model_fallback=False) for name, rule in policies.items()}}
    with torch.no_grad():
        return {name: time_ms(lambda runner=runner: runner(ids), runs=10) for name, runner in runners.items()}


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device("cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    rows, ratios, extra = [], {}, {"rel_error_vs_reference": {}}
    for name, (heads, kv_heads, dim, length) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            times, errors = rows_case(name, dtype, flex, device)
            kind = str(dtype).removeprefix("torch.")
            label = f"{name}/{kind}@{length}"
            extra["rel_error_vs_reference"][label] = errors
            rows += [{"case": name, "seq_len": length, "dtype": kind, "impl": impl, "ms": ms}
                     for impl, ms in times.items()]
            ratios |= {f"{label} {impl}/sparsify": ms / times["sparsify"] for impl, ms in times.items()
                       if impl != "sparsify"}
            print(f"{label}: " + "  ".join(f"{impl} {ms:.3f} ms" for impl, ms in times.items()) + f"  errors {errors}",
                  flush=True)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            assert all(error < tolerance for impl, error in errors.items() if impl != "flex"), (label, errors)
            torch.cuda.empty_cache()
    forward = model_forward(device)
    rows += [{"case": "model_forward", "seq_len": 7501, "dtype": "float32", "impl": impl, "ms": ms}
             for impl, ms in forward.items()]
    ratios |= {"model_forward@7501 dense/delta": forward["dense"] / forward["delta"],
               "model_forward@7501 delta/base": forward["delta"] / forward["base"]}
    print("model forward:", forward, flush=True)
    extra["ratio_meaning"] = "X/sparsify: X's time over the chosen tiles' (> 1: ours faster)"
    print(f"wrote {write_result('delta_rows', rows, ratios, extra)}")


if __name__ == "__main__":
    main()
