"""Prefill benchmark: the block-sparse kernel vs FlexAttention (same block mask, compiled) vs dense SDPA.

bf16, B=1, 32 query heads / 8 KV heads, D=128. Cases (names from shared/docs/benchmarks.md): ``causal`` (full
causal layout), ``sink_window_2048`` (sink 64 + window 2048), ``topk_10pct`` and ``topk_3pct`` (block top-k).
Effective TFLOP/s count 4*D FLOPs per (query, key) pair in the blocks an implementation visits.

    python benchmarks/prefill.py --seq 8192 32768 131072
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.nn.attention.flex_attention import flex_attention

from sparsify.kernels.block_sparse_attention import block_sparse_attention
from sparsify.kernels.layout import block_topk_layout, causal_layout, sink_window_layout
from sparsify.passes.cost_model import load_ceilings

from .common import time_ms, write_result

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def visited_pairs(layout) -> float:
    blocks = (layout.kv_num_blocks + layout.full_kv_num_blocks).sum().item()
    heads = layout.kv_num_blocks.shape[1]
    return blocks * layout.block_m * layout.block_n * (HEADS / heads)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--cases", nargs="+", default=["causal", "sink_window_2048", "topk_10pct", "topk_3pct"])
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    # Each block mask's mask_mod closes over different constants; give FlexAttention room to compile each.
    torch._dynamo.config.recompile_limit = 64
    ceilings = load_ceilings(device, HEAD_DIM)
    config = ceilings.config_for(HEAD_DIM)
    flex = torch.compile(flex_attention, dynamic=False)
    rows, ratios, layout_ms = [], {}, {}
    for seq in args.seq:
        generator = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(1, HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
        k, v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
                for _ in range(2))
        sdpa_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                    enable_gqa=True))
        dense_flops = 4 * HEAD_DIM * HEADS * seq * (seq + 1) / 2
        for case in args.cases:
            builders = {
                "causal": lambda bm, bn: causal_layout(seq, seq, bm, bn, device=device),
                "sink_window_2048": lambda bm, bn: sink_window_layout(seq, seq, 64, 2048, bm, bn, device=device),
                "topk_10pct": lambda bm, bn: block_topk_layout(q, k, density=0.10, block_m=bm, block_n=bn),
                "topk_3pct": lambda bm, bn: block_topk_layout(q, k, density=0.03, block_m=bm, block_n=bn),
            }
            build = builders[case]
            # Block top-k selects blocks, so both kernels get the same 128x128 blocks; token-exact layouts use
            # each implementation's own best block size.
            ours_config = ceilings.config_for(HEAD_DIM, (128, 128)) if case.startswith("topk") else config
            layout = build(ours_config.block_m, ours_config.block_n)
            layout_ms[f"{case}@{seq}"] = time_ms(lambda: build(ours_config.block_m, ours_config.block_n), runs=10)
            flex_layout = layout if (layout.block_m, layout.block_n) == (128, 128) else build(128, 128)
            block_mask = flex_layout.to_block_mask()
            ours_ms = time_ms(lambda: block_sparse_attention(q, k, v, layout, config=ours_config))
            flex_ms = time_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
            for impl, ms, pairs, density in (
                ("sparsify", ours_ms, visited_pairs(layout), layout.density()),
                ("flex", flex_ms, visited_pairs(flex_layout), flex_layout.density()),
            ):
                rows.append({"case": case, "seq_len": seq, "impl": impl, "ms": ms,
                             "tflops": 4 * HEAD_DIM * pairs / ms / 1e9, "density": density})
            rows.append({"case": case, "seq_len": seq, "impl": "sdpa", "ms": sdpa_ms,
                         "tflops": dense_flops / sdpa_ms / 1e9})
            ratios[f"{case}@{seq} sdpa/sparsify"] = sdpa_ms / ours_ms
            ratios[f"{case}@{seq} flex/sparsify"] = flex_ms / ours_ms
            print(f"{case:>18} N={seq:>6}: sparsify {ours_ms:8.3f} ms  flex {flex_ms:8.3f} ms  sdpa {sdpa_ms:8.3f} ms",
                  flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    extra = {"layout_build_ms": layout_ms, "kernel_config": dataclasses.asdict(config),
             "calibration": dataclasses.asdict(ceilings)}
    path = write_result("prefill", rows, ratios, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
