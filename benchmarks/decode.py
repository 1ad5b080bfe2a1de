"""ReSA decode attention benchmark: one decode step's attention of one layer (summary update + block selection +
sparse split-KV decode, as the rewritten graph runs them) against dense SDPA decode and FlexAttention decode on
the same KV cache.

bf16, 32 query heads / 8 KV heads, D=128, a full cache of ``seq`` tokens, the new token's K/V already in it.
ReSA keeps a 4K-token budget (``--budget``: 256 blocks of 16 at any length; ``sparse_ratio`` = budget / length).
Rows (names from shared/docs/benchmarks.md): case ``b1`` / ``b8`` (the batch), impls ``resa`` (the three ops),
``sdpa`` (``scaled_dot_product_attention`` over the whole cache) and ``flex`` (FlexAttention's decode kernel over
a block mask of exactly the blocks ReSA selected, built outside the timing: attention alone); plus
``flex_dense`` (FlexAttention with no mask). Every call is timed as a replayed CUDA graph (as generate() runs a
decode step under sparsify) and, in ``eager_ms``, launched one op at a time. Each row has the bytes it must
read (``gbytes``: K/V of the tokens it attends to, plus for resa the summaries the selection scores) and the
share of the device's copy bandwidth that reaches (``copy_bw_share``, from a timed device-to-device copy).
``parts_ms``: resa's three ops alone, and ``resa_budget`` (the blocks each row keeps: one node per forward for
all its layers, so not in a layer's step).

Checked in the same run: resa's output over the selected blocks against the float32 reference, and against
FlexAttention over the same blocks; with every block kept, against dense attention in float32, no worse than 2x
SDPA's bf16 error.

    python -m benchmarks.decode --seq 32768 131072 --batch 1 8
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import sparsify  # noqa: F401  (registers torch.ops.sparsify)
from sparsify.kernels.decode import decode_attention_reference
from sparsify.methods.resa import selection_width

from .common import decode_inputs, relative_error, time_ms, write_result

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BLOCK_SIZE, MIN_BLOCKS, LOCAL_BLOCKS = 16, 16, 1


class ResaStep:
    """One layer's decode step under resa on a full cache: q (B, Hq, 1, D), k and v (B, Hkv, L, D), summaries built
    once as a prefill builds them; ``update``, ``select`` and ``attend`` are the graph's three ops."""

    def __init__(self, q, k, v, sparse_ratio: float):
        self.q, self.k, self.v, self.ops = q, k, v, torch.ops.sparsify
        batch, kv_heads, length, dim = k.shape
        self.ratio, self.scale = sparse_ratio, dim ** -0.5
        self.starts = self.ops.resa_row_starts(k, None)
        n_blocks = -(-length // BLOCK_SIZE)
        self.kmin, self.kmax = (k.new_zeros(batch, kv_heads, n_blocks, dim) for _ in range(2))
        self.ops.resa_summaries(self.kmin, self.kmax, k.new_empty(batch, 1, length, 0), k, None, self.starts,
                                BLOCK_SIZE)
        self.offset = torch.tensor(length - 1, device=q.device)  # the new token's position: a static cache's view
        self.width = selection_width(n_blocks, sparse_ratio, MIN_BLOCKS, LOCAL_BLOCKS)
        self.in_use, self.keep = self.budget()
        self.indices = self.select()
        self.counts = self.keep[:, None].expand(batch, kv_heads)

    def budget(self):
        """Blocks in use and kept per row: once per forward in the graph, for all its layers (timed apart)."""
        return self.ops.resa_budget(self.q, self.k, self.offset, self.starts, BLOCK_SIZE, self.ratio, MIN_BLOCKS,
                                    LOCAL_BLOCKS)

    def update(self):
        self.ops.resa_summaries(self.kmin, self.kmax, self.q, self.k, self.offset, self.starts, BLOCK_SIZE)

    def select(self):
        return self.ops.resa_select(self.q, self.kmin, self.kmax, self.in_use, self.keep, self.ratio, MIN_BLOCKS,
                                    LOCAL_BLOCKS, self.scale)

    def attend(self, indices):
        return self.ops.block_decode(self.q, self.k, self.v, self.offset, None, self.starts, indices, self.keep,
                                     BLOCK_SIZE, self.scale)

    def step(self):
        self.update()
        return self.attend(self.select())

    def block_mask(self) -> BlockMask:
        """FlexAttention's block mask of the selected blocks, for :meth:`flex`'s layout (each (row, KV head) a batch
        entry of one KV head), as full blocks (the kernel skips the mask function inside them); the mask function
        says the same per key, for FlexAttention's unfused path."""
        batch, kv_heads, n_blocks = *self.counts.shape, self.kmin.shape[2]
        counts = self.counts.reshape(batch * kv_heads, 1, 1)
        # One column per cache block, as BlockMask wants; past a row's count the entries are never read.
        indices = self.indices.new_zeros(batch * kv_heads, 1, 1, n_blocks)
        indices[..., :self.width] = self.indices.reshape(batch * kv_heads, 1, 1, -1).clamp(max=n_blocks - 1)
        chosen = torch.zeros(batch * kv_heads, n_blocks + 1, dtype=torch.bool, device=self.q.device)
        chosen.scatter_(1, self.indices.reshape(batch * kv_heads, -1).long(), True)

        def selected(b, h, q_idx, kv_idx):
            return chosen[b, kv_idx // BLOCK_SIZE]

        return BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
                                        BLOCK_SIZE=(128, BLOCK_SIZE), mask_mod=selected,
                                        seq_lengths=(1, self.k.shape[2]))

    def flex(self, flex_attention_fn, block_mask: BlockMask | None):
        """FlexAttention over the same cache, each (row, KV head) a batch entry whose G query heads share one KV
        head: the layout in which its decode kernel serves GQA with a different block list per KV head (with
        ``enable_gqa`` over (B, Hkv) heads it takes one list for all heads). Views, no copies."""
        batch, q_heads, _, dim = self.q.shape
        kv_heads, length = self.k.shape[1], self.k.shape[2]
        q = self.q.reshape(batch * kv_heads, q_heads // kv_heads, 1, dim)
        k, v = (t.reshape(batch * kv_heads, 1, length, t.shape[-1]) for t in (self.k, self.v))
        out = flex_attention_fn(q, k, v, block_mask=block_mask, enable_gqa=True)
        return out.reshape(batch, q_heads, 1, -1)

    def gbytes(self) -> float:
        """What a step must read: the summaries (both, all blocks) and the K/V of the selected blocks."""
        summaries = 2 * self.kmin.numel() * self.kmin.element_size()
        selected = self.counts.sum().item() * BLOCK_SIZE * 2 * HEAD_DIM * self.k.element_size()
        return (summaries + selected) / 1e9


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as capture requires): a callable that
    replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 2 GiB (read + write), the bandwidth a memory-bound kernel can reach."""
    source = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / ms / 1e6


def accuracy(device, flex) -> dict[str, float]:
    """At 8K, B=2: resa over a 10% selection against the float32 reference over the same blocks; FlexAttention over
    the same blocks against resa; with every block kept, resa against dense attention in float32, beside SDPA's
    bf16 error (resa's must be no worse than 2x)."""
    generator = torch.Generator(device=device).manual_seed(8192)
    q = torch.randn(2, HEADS, 1, HEAD_DIM, device=device, generator=generator)
    k, v = (torch.randn(2, KV_HEADS, 8192, HEAD_DIM, device=device, generator=generator) for _ in range(2))
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    sparse = ResaStep(qb, kb, vb, 0.1)
    lengths = torch.full((2,), 8192, device=device)
    expected, _ = decode_attention_reference(q, k, v, lengths, HEAD_DIM ** -0.5, kv_block_indices=sparse.indices,
                                             kv_block_counts=sparse.counts, block_size=BLOCK_SIZE)
    ours = sparse.step()
    same_blocks = sparse.flex(flex, sparse.block_mask())
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    every_block = ResaStep(qb, kb, vb, 1.0).step()
    # The selection on the GPU (its kernels) against the reference ops on the CPU, from the same summaries.
    on_cpu = torch.ops.sparsify.resa_select(qb.cpu(), sparse.kmin.cpu(), sparse.kmax.cpu(), sparse.in_use.cpu(),
                                            sparse.keep.cpu(), 0.1, MIN_BLOCKS, LOCAL_BLOCKS, sparse.scale)
    same_selection = (sparse.select().cpu() == on_cpu).float().mean().item()
    errors = {"resa_vs_reference_same_blocks": relative_error(ours, expected),
              "flex_vs_resa_same_blocks": relative_error(same_blocks, ours),
              "resa_all_blocks_vs_dense": relative_error(every_block, dense),
              "sdpa_vs_dense": relative_error(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb,
                                                                                              enable_gqa=True), dense)}
    errors["selection_equal_to_reference"] = same_selection
    assert same_selection >= 0.99, errors
    assert errors["resa_all_blocks_vs_dense"] <= 2 * errors["sdpa_vs_dense"], errors
    assert errors["resa_vs_reference_same_blocks"] <= 2 * errors["sdpa_vs_dense"], errors
    assert errors["flex_vs_resa_same_blocks"] < 2e-2, errors
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=int, default=4096, help="tokens resa attends to (a multiple of 16)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch._dynamo.config.recompile_limit = 64  # FlexAttention compiles once per shape and mask
    flex = torch.compile(flex_attention, dynamic=False)
    errors = accuracy(device, flex)
    bandwidth = copy_bandwidth(device)
    print(f"bf16 errors {errors}; copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows, ratios = [], {}
    extra = {"copy_bandwidth_gb_s": bandwidth, "bf16_rel_errors_8192_b2": errors, "budget_tokens": args.budget,
             "block_size": BLOCK_SIZE, "parts_ms": {}}
    for seq in args.seq:
        for batch in args.batch:
            q, k, v = decode_inputs(batch, seq, HEADS, KV_HEADS, HEAD_DIM, device)
            step = ResaStep(q, k, v, args.budget / seq)
            mask = step.block_mask()
            calls = {
                "resa": step.step,
                "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "flex": lambda: step.flex(flex, mask),
                "flex_dense": lambda: step.flex(flex, None),
            }
            dense_gbytes = 2 * k.numel() * k.element_size() / 1e9
            gbytes = {"resa": step.gbytes(), "sdpa": dense_gbytes, "flex_dense": dense_gbytes,
                      "flex": step.gbytes() - 2 * step.kmin.numel() * step.kmin.element_size() / 1e9}
            case = f"b{batch}"
            timed = {}
            for impl, call in calls.items():
                row = {"case": case, "seq_len": seq, "impl": impl, "gbytes": gbytes[impl]}
                try:
                    row["eager_ms"] = time_ms(call)
                    timed[impl] = row["ms"] = time_ms(graphed(call))
                except Exception as error:  # FlexAttention may not compile or capture a case: say so, go on
                    if not impl.startswith("flex"):
                        raise
                    rows.append({**row, "error": str(error).splitlines()[0]})
                    continue
                row["copy_bw_share"] = gbytes[impl] / (timed[impl] / 1e3) / bandwidth
                rows.append(row)
            indices = step.indices
            extra["parts_ms"][f"{case}@{seq}"] = {
                "resa_summaries": time_ms(graphed(step.update)),
                "resa_select": time_ms(graphed(step.select)),
                "block_decode": time_ms(graphed(lambda: step.attend(indices))),
                "resa_budget_once_per_forward": time_ms(graphed(step.budget)),
            }
            for other in sorted(set(timed) - {"resa"}):
                ratios[f"{case}@{seq} {other}/resa"] = timed[other] / timed["resa"]
            # What resa's bytes allow: dense SDPA's bytes over resa's, at equal bandwidth.
            ratios[f"{case}@{seq} bytes bound sdpa/resa"] = dense_gbytes / gbytes["resa"]
            print(f"{case} N={seq:>6}: " + "  ".join(f"{impl} {ms:8.4f} ms" for impl, ms in timed.items())
                  + f"  parts {extra['parts_ms'][f'{case}@{seq}']}  sdpa/resa {timed['sdpa'] / timed['resa']:.2f}"
                  f" (bytes bound {dense_gbytes / gbytes['resa']:.1f})", flush=True)
            del q, k, v, step, mask, calls
            torch.cuda.empty_cache()
    extra["ratio_meaning"] = ("other's time / resa's (> 1: resa faster); bytes bound: dense SDPA's bytes / resa's "
                              "(the speedup at equal bandwidth)")
    path = write_result("decode", rows, ratios, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
