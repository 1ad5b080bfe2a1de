"""Prefill benchmark: the block-sparse kernel vs FlexAttention (same block mask, compiled) vs dense SDPA.

By default bf16, B=1, 32 query heads / 8 KV heads, D=128 (``--dtype``, ``--batch``, ``--heads``, ``--kv-heads``,
``--head-dim`` change them; a case's row names the shape when it is not the default). Cases (names from
shared/docs/benchmarks.md): ``causal`` (full causal layout), ``sink_window_2048`` (sink 64 + window 2048),
``topk_10pct``, ``topk_5pct`` and ``topk_3pct`` (block top-k over 128 x 128 blocks, FlexAttention's, for both:
sparsify runs the fastest config of those tiles on the calibration's scattered problem). Effective TFLOP/s count
4*D FLOPs per (query, key) pair in the blocks an implementation visits.

    python -m benchmarks.prefill --seq 8192 32768 131072
    python -m benchmarks.prefill --seq 65536 --cases topk_5pct --head-dim 64 --dtype float16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch
from torch.nn.attention.flex_attention import flex_attention

from sparsify.kernels.block_sparse_attention import block_sparse_attention
from sparsify.kernels.layout import block_topk_layout, causal_layout, sink_window_layout
from sparsify.passes.cost_model import load_ceilings

from .common import time_ms, write_result

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOPK_DENSITIES = {"topk_10pct": 0.10, "topk_5pct": 0.05, "topk_3pct": 0.03}


def visited_pairs(layout, batch: int, heads: int) -> float:
    """(query, key) pairs in the visited blocks, over every batch row and query head (a layout's batch and head
    dimensions may be 1, shared by all)."""
    blocks = (layout.kv_num_blocks + layout.full_kv_num_blocks).sum().item()
    rows, lists = layout.kv_num_blocks.shape[:2]
    return blocks * layout.block_m * layout.block_n * (batch / rows) * (heads / lists)


def _topk_builder(q, k, density: float, block_m: int, block_n: int):
    return block_topk_layout(q, k, density=density, block_m=block_m, block_n=block_n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--cases", nargs="+", default=["causal", "sink_window_2048", "topk_10pct", "topk_3pct"],
                        choices=["causal", "sink_window_2048", *TOPK_DENSITIES])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--part", default="prefill", help="result name (prefill itself, or a part beside it)")
    args = parser.parse_args(argv)
    batch, heads, kv_heads, head_dim, dtype = args.batch, args.heads, args.kv_heads, args.head_dim, DTYPES[args.dtype]
    shape = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": args.dtype}
    default = {name: parser.get_default(name) for name in shape}
    suffix = "" if shape == default else f" B={batch} {heads}/{kv_heads} D={head_dim} {args.dtype}"
    device = torch.device("cuda")
    # Each block mask's mask_mod closes over different constants; give FlexAttention room to compile each.
    torch._dynamo.config.recompile_limit = 64
    ceilings = load_ceilings(device, head_dim)
    config = ceilings.config_for(head_dim)
    flex = torch.compile(flex_attention, dynamic=False)
    rows, ratios, layout_ms = [], {}, {}
    for seq in args.seq:
        generator = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=generator)
        k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=generator)
                for _ in range(2))
        sdpa_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                    enable_gqa=True))
        dense_flops = 4 * head_dim * batch * heads * seq * (seq + 1) / 2
        for case in args.cases:
            builders = {
                "causal": lambda bm, bn: causal_layout(seq, seq, bm, bn, device=device),
                "sink_window_2048": lambda bm, bn: sink_window_layout(seq, seq, 64, 2048, bm, bn, device=device),
                **{name: functools.partial(_topk_builder, q, k, density) for name, density in TOPK_DENSITIES.items()},
            }
            build = builders[case]
            # Block top-k selects blocks, so both kernels get the same 128x128 blocks; token-exact layouts use
            # each implementation's own best block size.
            ours_config = ceilings.config_for(head_dim, (128, 128), "scattered") if case in TOPK_DENSITIES else config
            layout = build(ours_config.block_m, ours_config.block_n)
            layout_ms[f"{case}@{seq}"] = time_ms(lambda: build(ours_config.block_m, ours_config.block_n), runs=10)
            flex_layout = layout if (layout.block_m, layout.block_n) == (128, 128) else build(128, 128)
            block_mask = flex_layout.to_block_mask()
            ours_ms = time_ms(lambda: block_sparse_attention(q, k, v, layout, config=ours_config))
            flex_ms = time_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
            for impl, ms, pairs, density in (
                ("sparsify", ours_ms, visited_pairs(layout, batch, heads), layout.density()),
                ("flex", flex_ms, visited_pairs(flex_layout, batch, heads), flex_layout.density()),
            ):
                rows.append({"case": case + suffix, "seq_len": seq, "impl": impl, "ms": ms,
                             "tflops": 4 * head_dim * pairs / ms / 1e9, "density": density})
            rows.append({"case": case + suffix, "seq_len": seq, "impl": "sdpa", "ms": sdpa_ms,
                         "tflops": dense_flops / sdpa_ms / 1e9})
            ratios[f"{case}{suffix}@{seq} sdpa/sparsify"] = sdpa_ms / ours_ms
            ratios[f"{case}{suffix}@{seq} flex/sparsify"] = flex_ms / ours_ms
            print(f"{case + suffix:>18} N={seq:>6}: sparsify {ours_ms:8.3f} ms  flex {flex_ms:8.3f} ms  "
                  f"sdpa {sdpa_ms:8.3f} ms  config {ours_config}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    extra = {"shape": shape, "layout_build_ms": layout_ms, "kernel_config": dataclasses.asdict(config),
             "calibration": dataclasses.asdict(ceilings)}
    path = write_result(args.part, rows, ratios, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
