"""Delta Attention benchmark: one attention call of ``delta(sink_window 64+2048, gamma 64)`` against dense causal
SDPA and against its base (sink + window alone), on the same inputs.

bf16, B=1, 32 query heads / 8 KV heads, D=128. Rows (names from shared/docs/benchmarks.md): case ``delta``,
impls ``delta`` (the correction fused into the base kernel's epilogue, as the rewrite emits it), ``base`` and
``sdpa``; plus ``delta_unfused`` (base, then the separate correction pass) to measure the fusion, and ``flex``
(FlexAttention over the base's mask). Each delta call includes what the rewritten graph runs per attention:
the strided rows' kernel and the corrected base; the per-forward plans (the sink+window layout, the row list and
the rows' layout, shared by all layers) are built once, outside the timing, and their build time is reported.
``profile`` gives each kernel's CUDA time in one delta call (torch.profiler).

    python -m benchmarks.delta --seq 32768 131072
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

import sparsify  # noqa: F401  (registers torch.ops.sparsify)
from sparsify.kernels.block_sparse_attention import KernelConfig
from sparsify.kernels.layout import sink_window_layout
from sparsify.methods.delta import row_launch
from sparsify.passes.cost_model import load_ceilings

from .common import time_ms, write_result

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SINK, WINDOW, GAMMA = 64, 2048, 64


def kernel_profile(fn) -> dict[str, float]:
    """CUDA time per kernel name (ms) of one call of ``fn``, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" or getattr(event, "device_time_total", 0) > 0:
            times[event.key] = round(times.get(event.key, 0.0) + event.device_time_total / 1000, 4)
    return dict(sorted(times.items(), key=lambda item: -item[1]))


class DeltaCall:
    """One attention call of delta(sink_window SINK + ``window``, gamma 64) as the rewritten graph runs it, on
    fixed q, k, v, with the per-forward plans built once: ``base``, ``strided_rows``, ``delta`` (fused, as the
    rewrite emits it) and ``delta_unfused`` (base, then the separate correction pass)."""

    def __init__(self, q, k, v, config: KernelConfig, window: int):
        self.q, self.k, self.v, self.ops = q, k, v, torch.ops.sparsify
        self.launch = (config.block_m, config.block_n)
        self.mask = (True, SINK, window, q.shape[-1] ** -0.5)
        self.tuning = (config.num_warps, config.num_stages, config.use_tma)
        tile = row_launch(config, q.dtype)
        self.row_tiles = (tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.use_tma)
        length, group = q.shape[2], q.shape[1] // k.shape[1]
        self.plans = {"sink_window_layout": lambda: self.ops.sink_window_layout(length, length, SINK, window,
                                                                                 *self.launch, 0, q.device),
                      "delta_rows": lambda: self.ops.delta_rows(length, GAMMA, -1, True, q.device),
                      "row_layout": lambda: self.ops.row_layout(self.rows, length, length, group,
                                                                *self.row_tiles[:2])}
        self.layout = self.plans["sink_window_layout"]()
        self.rows = self.plans["delta_rows"]()
        self.row_layout = self.plans["row_layout"]()

    def base(self):
        return self.ops.block_sparse_attention(self.q, self.k, self.v, *self.layout, *self.launch, *self.mask,
                                               *self.tuning)[0]

    def strided_rows(self):
        return self.ops.row_attention(self.q, self.k, self.v, self.rows, *self.row_layout, self.mask[-1],
                                      *self.row_tiles)

    def fused_base(self, row_out):
        return self.ops.block_sparse_attention_delta(self.q, self.k, self.v, *self.layout, *self.launch, *self.mask,
                                                     *self.tuning, row_out, GAMMA, -1)

    def correction(self, sparse_out, row_out):
        return self.ops.delta_correction(sparse_out, row_out, GAMMA, -1)

    def delta(self):
        return self.fused_base(self.strided_rows())

    def delta_unfused(self):
        return self.correction(self.base(), self.strided_rows())


def bf16_error(device, config: KernelConfig, seq: int = 4096) -> dict[str, float]:
    """Relative error in bf16 on the GPU against the float32 CPU path (the reference implementation), for delta
    fused and unfused (window 512), beside dense SDPA's own bf16 error against float32: delta's must be no worse
    than 2x."""
    generator = torch.Generator().manual_seed(seq)
    q = torch.randn(1, HEADS, seq, HEAD_DIM, generator=generator)
    k, v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, generator=generator) for _ in range(2))

    def error(actual, expected):
        return ((actual.float().cpu() - expected).norm() / expected.norm()).item()

    expected = DeltaCall(q, k, v, config, 512).delta_unfused()
    qb, kb, vb = (t.to(device, torch.bfloat16) for t in (q, k, v))
    on_gpu = DeltaCall(qb, kb, vb, config, 512)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    errors = {"sdpa": error(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                                            enable_gqa=True), dense),
              "delta": error(on_gpu.delta(), expected), "delta_unfused": error(on_gpu.delta_unfused(), expected)}
    assert max(errors["delta"], errors["delta_unfused"]) <= 2 * errors["sdpa"], errors
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch._dynamo.config.recompile_limit = 64
    config = load_ceilings(device, HEAD_DIM).config_for(HEAD_DIM)
    flex = torch.compile(flex_attention, dynamic=False)
    errors = bf16_error(device, config)
    print("bf16 relative error:", errors, flush=True)
    rows, ratios = [], {}
    extra = {"kernel_config": dataclasses.asdict(config),
             "row_kernel_config": dataclasses.asdict(row_launch(config, torch.bfloat16)),
             "bf16_rel_error_4096_window_512": errors, "plan_build_ms": {}, "parts_ms": {}, "profile": {},
             "strided_share_of_dense_pairs": {}}
    for seq in args.seq:
        generator = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(1, HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
        k, v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
                for _ in range(2))
        call = DeltaCall(q, k, v, config, WINDOW)
        extra["plan_build_ms"][str(seq)] = {name: time_ms(build, runs=10) for name, build in call.plans.items()}
        block_mask = sink_window_layout(seq, seq, SINK, WINDOW, 128, 128, device=device).to_block_mask()
        timed = {
            "sdpa": time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True)),
            "base": time_ms(call.base),
            "delta": time_ms(call.delta),
            "delta_unfused": time_ms(call.delta_unfused),
            "flex": time_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)),
        }
        row_out, sparse_out = call.strided_rows(), call.base()
        extra["parts_ms"][str(seq)] = {
            "row_attention": time_ms(call.strided_rows),
            "correction_pass": time_ms(lambda: call.correction(sparse_out, row_out)),
            "fused_base_without_rows": time_ms(lambda: call.fused_base(row_out)),
        }
        extra["profile"][str(seq)] = kernel_profile(call.delta)
        # Dense work of the strided and tail rows relative to dense causal attention (about 1/gamma).
        extra["strided_share_of_dense_pairs"][str(seq)] = (call.rows + 1).sum().item() / (seq * (seq + 1) / 2)
        for impl, ms in timed.items():
            rows.append({"case": "delta", "seq_len": seq, "impl": impl, "ms": ms})
        ratios[f"delta@{seq} sdpa/delta"] = timed["sdpa"] / timed["delta"]
        ratios[f"delta@{seq} delta/base"] = timed["delta"] / timed["base"]
        ratios[f"delta@{seq} delta_unfused/delta"] = timed["delta_unfused"] / timed["delta"]
        ratios[f"delta@{seq} flex/base"] = timed["flex"] / timed["base"]
        print(f"N={seq:>6}: " + "  ".join(f"{impl} {ms:8.3f} ms" for impl, ms in timed.items())
              + "  parts " + str(extra["parts_ms"][str(seq)]), flush=True)
        del q, k, v, call, row_out, sparse_out
        torch.cuda.empty_cache()
    extra["ratio_meaning"] = ("sdpa/delta: speedup over dense (> 1 faster); delta/base: delta's time over its base's "
                              "(the cost of the correction); delta_unfused/delta: > 1 means fusing helps; "
                              "flex/base: FlexAttention's time over our base kernel's")
    path = write_result("delta", rows, ratios, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
