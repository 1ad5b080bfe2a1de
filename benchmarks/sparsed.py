"""SparseD speed: the attention of one layer over a whole denoising run, against dense bidirectional SDPA at every
step and against FlexAttention over the same cached masks.

bf16, B=1, 32 query heads / 8 KV heads, D=128, the sequence a prompt plus ``--gen`` generated tokens. One layer's
steps are timed apart (CUDA events, median after warm-up) and summed over the run, as the run executes them:
``end = int(steps * dense_fraction) + 1`` dense steps (SDPA) before the switch; the switch step (SDPA, plus the
pattern build: two log-sum-exp passes, the tile scores, the top-k and the layout); then ``steps - end - 1`` sparse
steps (sparsify's block-sparse kernel over the built pattern, or FlexAttention with the same blocks). Every layer
of a model runs this, so a layer's ratio is the model's attention ratio. The pattern is built from this step's q and
k; on random inputs the scores are meaningless but the amount of work (``keep_ratio`` of the blocks in each of the
two selections) is what a real model's would be.

Rows (names from shared/docs/benchmarks.md): case ``run``, impls ``sparsed``, ``sdpa``, ``flex``, with
``steps_ms`` (each kind of step) beside; ``correctness``: bf16 errors of the sparse step and of the tile scores
against float32 references at 4K. ``--sweep``: also case ``sweep`` rows at the longest length, the sparse step
under every launch config of 128 x 64 and 128 x 128 tiles (warps, stages, pointer or TMA loads), at the
``keep_ratio`` and with every block kept (a dense bidirectional pass through the kernel).

    python -m benchmarks.sparsed --seq 16384 32768 65536 --steps 256 [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
from torch.nn.attention.flex_attention import flex_attention

import sparsify  # noqa: F401  (registers torch.ops.sparsify)
from sparsify.kernels import block_sparse_attention as block_kernels
from sparsify.kernels import sparsed as pattern_kernels
from sparsify.kernels.block_sparse_attention import KernelConfig
from sparsify.methods import METHODS
from sparsify.methods.sparsed import SparseDParams, state_layout, switch_step
from sparsify.passes.cost_model import load_ceilings
from sparsify.state import StateSize

from .common import relative_error, time_ms, write_result

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


class Layer:
    """One layer's q, k, v (B=1) and its SparseD state, with a clock set by the caller."""

    def __init__(self, seq: int, gen: int, params: SparseDParams, config: KernelConfig, device):
        generator = torch.Generator(device=device).manual_seed(seq)
        self.q = torch.randn(1, HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
        self.k, self.v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16,
                                      generator=generator) for _ in range(2))
        self.params, self.config, self.seq, self.prompt = params, config, seq, seq - gen
        size = StateSize(1, seq, KV_HEADS, HEAD_DIM, HEADS)
        # The method's state tensors, in its order: clock, built, full_counts, full_indices, tail_counts, tail_indices.
        self.state = [torch.zeros(spec.shape(size), dtype=spec.dtype, device="cpu" if spec.host else device)
                      for spec in METHODS.get("sparsed").state_specs(params)]
        self.clock = self.state[0]
        self.scale = HEAD_DIM ** -0.5

    def at(self, step: int, steps: int) -> None:
        self.clock[:] = torch.tensor([step, steps, self.prompt])

    def build(self):
        p = self.params
        torch.ops.sparsify.sparsed_pattern(self.q, self.k, self.v, *self.state, p.dense_fraction, p.keep_ratio,
                                           p.block_size, self.scale)

    def attention(self):
        c = self.config
        return torch.ops.sparsify.sparsed_attention(self.q, self.k, self.v, *self.state, self.params.dense_fraction,
                                                    self.params.block_size, self.scale, c.num_warps, c.num_stages,
                                                    c.use_tma)

    def layout(self):
        return state_layout(*self.state[2:], self.seq, self.params.block_size)


def correctness(params: SparseDParams, config: KernelConfig, device) -> dict:
    """bf16 errors at 4K: the sparse step against the float32 reference over the same layout, and the tile scores
    kernel against its float32 reference."""
    layer = Layer(4096, 512, params, config, device)
    steps = 100
    layer.at(switch_step(steps, params.dense_fraction), steps)
    layer.build()
    layer.at(steps - 1, steps)
    ours = layer.attention()
    layout = layer.layout()
    expected, _ = block_kernels.block_sparse_attention_reference(layer.q.float(), layer.k.float(), layer.v.float(),
                                                                 layout, layer.scale)
    lse = torch.logsumexp(torch.matmul(layer.q.float(), layer.k.float().repeat_interleave(4, 1).transpose(-1, -2))
                          * layer.scale, -1)
    gen_start = pattern_kernels.generation_start_block(layer.prompt, params.block_size) * params.block_size
    scores, _ = pattern_kernels.tile_scores(layer.q, layer.k, lse, None, gen_start, params.block_size, layer.scale)
    reference, _ = pattern_kernels.tile_scores_reference(layer.q, layer.k, lse, None, gen_start, params.block_size,
                                                         layer.scale)
    return {"sparse_step_vs_reference": relative_error(ours, expected),
            "tile_scores_vs_reference": relative_error(scores, reference),
            "density": layout.density()}


def sweep(seq: int, gen: int, params: SparseDParams, device) -> list[dict]:
    """The sparse step at ``seq`` under each launch config, at ``params.keep_ratio`` and at keep 1 (``sweep``
    rows, each with its config and the SDPA dense step of the same inputs)."""
    rows = []
    for keep in (params.keep_ratio, 1.0):
        kept_params = dataclasses.replace(params, keep_ratio=keep)
        layer = Layer(seq, gen, kept_params, KernelConfig(params.block_size, 64), device)
        steps = 256
        layer.at(switch_step(steps, params.dense_fraction), steps)
        layer.build()
        layout = layer.layout()
        full, partial = layout.block_masks()
        visited = torch.nn.functional.pad(full | partial, (0, full.shape[-1] % 2))
        layouts = {64: layout,  # the same kept blocks as one 128-key kernel block each
                   128: pattern_kernels.kernel_layout(visited.view(*visited.shape[:-1], -1, 2).any(-1), seq,
                                                      params.block_size, 128, -(-seq // 128))}
        sdpa_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            layer.q, layer.k, layer.v, scale=layer.scale, enable_gqa=True))
        for block_n, tiles in layouts.items():
            for warps, stages, tma in itertools.product((4, 8), (2, 3, 4), (False, True)):
                config = KernelConfig(params.block_size, block_n, warps, stages, tma)
                ms = time_ms(lambda: block_kernels.block_sparse_attention(layer.q, layer.k, layer.v, tiles,
                                                                          layer.scale, config=config))
                rows.append({"case": "sweep", "seq_len": seq, "impl": "sparsed", "keep_ratio": keep,
                             "density": tiles.density(), **dataclasses.asdict(config), "ms": ms,
                             "sdpa_ms": sdpa_ms})
                print(f"sweep keep {keep} {config}: {ms:.2f} ms (SDPA {sdpa_ms:.2f})", flush=True)
        del layer, layouts, layout
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--gen", type=int, default=1024, help="generated tokens (the rest is prompt)")
    parser.add_argument("--dense-fraction", type=float, default=0.2)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="also time every launch config at the longest length")
    args = parser.parse_args(argv)
    if args.sweep and args.block_size != 128:
        parser.error(f"--sweep: --block-size {args.block_size}; allowed: 128 (the sweep's tiles are 128 x 64 and "
                     "128 x 128)")
    device = torch.device("cuda")
    params = SparseDParams(args.dense_fraction, args.keep_ratio, args.block_size)
    flex = torch.compile(flex_attention, dynamic=False)
    end = switch_step(args.steps, params.dense_fraction)
    sparse_steps = args.steps - end - 1
    rows, ratios, parts = [], {}, {}
    # The launch config sparsify.compile would run: the device's calibration on the scattered problem
    config = load_ceilings(device, HEAD_DIM).config_for(HEAD_DIM, METHODS.get("sparsed").kernel_blocks(params),
                                                        METHODS.get("sparsed").calibration_problem)
    print(f"launch config {config}", flush=True)
    errors = correctness(params, config, device)
    print(f"bf16 errors {errors}", flush=True)
    for seq in args.seq:
        layer = Layer(seq, args.gen, params, config, device)
        layer.at(0, args.steps)
        dense_ms = time_ms(layer.attention)                          # a step before the switch: SDPA
        layer.at(end, args.steps)
        build_ms = time_ms(layer.build, warmup=1, runs=5)            # the switch step's extra work
        layer.at(end + 1, args.steps)
        sparse_ms = time_ms(layer.attention)
        block_mask = layer.layout().to_block_mask()
        flex_ms = time_ms(lambda: flex(layer.q, layer.k, layer.v, block_mask=block_mask, scale=layer.scale,
                                       enable_gqa=True))
        density = layer.layout().density()
        runs = {"sparsed": end * dense_ms + dense_ms + build_ms + sparse_steps * sparse_ms,
                "sdpa": args.steps * dense_ms,
                "flex": end * dense_ms + dense_ms + build_ms + sparse_steps * flex_ms}
        parts[str(seq)] = {"dense_step": dense_ms, "build": build_ms, "sparse_step": sparse_ms,
                           "flex_step": flex_ms, "density": density}
        rows += [{"case": "run", "seq_len": seq, "impl": impl, "ms": ms} for impl, ms in runs.items()]
        ratios[f"run@{seq} sdpa/sparsed"] = runs["sdpa"] / runs["sparsed"]
        ratios[f"run@{seq} flex/sparsed"] = runs["flex"] / runs["sparsed"]
        ratios[f"step@{seq} flex/sparsed"] = flex_ms / sparse_ms
        print(f"N={seq:>6}: run sparsed {runs['sparsed']:9.1f} ms  sdpa {runs['sdpa']:9.1f}  flex {runs['flex']:9.1f}"
              f"  steps {parts[str(seq)]}", flush=True)
        del layer, block_mask
        torch.cuda.empty_cache()
    if args.sweep:
        rows += sweep(max(args.seq), args.gen, params, device)
    extra = {"steps": args.steps, "switch_step": end, "gen_tokens": args.gen, "params": vars(args),
             "steps_ms": parts, "bf16_rel_errors_4096": errors, "launch_config": dataclasses.asdict(config),
             "how": "one layer's steps timed apart (median, CUDA events) and summed: switch_step dense steps, the "
                    "switch step (dense + build), then the sparse steps",
             "ratio_meaning": "other's time / sparsed's (> 1: sparsed faster)"}
    print(f"wrote {write_result('sparsed', rows, ratios, extra)}")


if __name__ == "__main__":
    main()
