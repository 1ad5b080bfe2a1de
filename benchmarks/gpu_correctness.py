"""GPU correctness in bf16: each kernel's error against a float32 reference must be no worse than 2x that of dense
SDPA in bf16 against the same reference: the block-sparse prefill kernel per layout (a model's own sliding window
as the kernel's hard limit among them), block top-k over the shifted rows of a left-padded batch, exact attention
under a model's sliding window (``sparsify.attention``, prefill and decode), and the split-KV decode kernel (a
batch with per-row lengths and left padding; over ReSA's block lists from each padded row's own offset and over
LessIsMore's token lists; a rectification's 32-token chunk), and ReSA's selection kernels against their
references. Also: the plan ops build their layouts without a host
synchronisation. Writes benchmarks/results/gpu_correctness.json.

    python -m benchmarks.gpu_correctness
"""

from __future__ import annotations

import torch

from sparsify.kernels.block_sparse_attention import (KernelConfig, block_sparse_attention,
                                                      block_sparse_attention_reference)
from sparsify.kernels.block_bounds import (block_bounds, block_bounds_reference, select_top_blocks,
                                           select_top_blocks_reference, update_summaries)
from sparsify.kernels.decode import decode_attention, decode_attention_reference
from sparsify.kernels.layout import block_topk_layout, causal_layout, dense_layout, sink_window_layout

from sparsify.methods.resa import resa_summaries

from .common import relative_error, write_result


def main(argv=None) -> None:
    device = torch.device("cuda")
    rows, ratios = [], {}
    for seq, head_dim, heads, kv_heads in ((4096, 128, 32, 8), (3001, 64, 9, 3), (2048, 128, 8, 8)):
        generator = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(1, heads, seq, head_dim, device=device, generator=generator)
        k, v = (torch.randn(1, kv_heads, seq, head_dim, device=device, generator=generator) for _ in range(2))
        qb = q.bfloat16()
        # K/V as a model holds them: (B, L, H, D) memory seen as (B, H, L, D), so strided rows.
        kb, vb = (t.transpose(1, 2).contiguous().transpose(1, 2).bfloat16() for t in (k, v))
        layouts = {
            "causal": causal_layout(seq, seq, 128, 64, device=device),
            "bidirectional": dense_layout(seq, seq, 128, 64, device=device),
            "sink_window_512": sink_window_layout(seq, seq, 64, 512, 128, 64, device=device),
            "topk_10pct": block_topk_layout(q, k, density=0.1, block_m=128, block_n=64),
            # A model window of 1024 as the kernel's limit: the sink is cut off beyond it (Mistral + sink_window).
            "sink_window_512_limit_1024": sink_window_layout(seq, seq, 64, 512, 128, 64, limit=1024, device=device),
        }
        for case, layout in layouts.items():
            expected, expected_lse = block_sparse_attention_reference(q, k, v, layout)
            mask = layout.to_dense_mask()
            sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
            sdpa_error = relative_error(sdpa, expected)
            name = f"{case}@{seq}/D{head_dim}/{heads}:{kv_heads}"
            rows.append({"case": name, "impl": "sdpa", "rel_error": sdpa_error})
            for use_tma in (False, True):
                config = KernelConfig(128, 64, 8, 3, use_tma=use_tma)
                ours, lse = block_sparse_attention(qb, kb, vb, layout, config=config)
                ours_error = relative_error(ours, expected)
                finite = torch.isfinite(expected_lse)
                lse_error = (lse[finite] - expected_lse[finite]).abs().max().item()
                impl = "sparsify_tma" if use_tma else "sparsify"
                rows.append({"case": name, "impl": impl, "rel_error": ours_error, "lse_max_abs": lse_error})
                ratios[f"{name} error {impl}/sdpa"] = ours_error / sdpa_error
                print(f"{name:>40} {impl:>12}: {ours_error:.2e} (sdpa {sdpa_error:.2e}), lse {lse_error:.1e}",
                      flush=True)
                assert ours_error <= 2 * sdpa_error and lse_error < 0.05, (name, impl)
    padded_topk_rows(device, rows, ratios)
    model_window_rows(device, rows, ratios)
    decode_rows(device, rows, ratios)
    listed_decode_rows(device, rows, ratios)
    chunk_and_selection_rows(device, rows, ratios)
    plans_without_sync(device, rows)
    write_result("gpu_correctness", rows, ratios)


def _check(name: str, ours: torch.Tensor, sdpa: torch.Tensor, expected: torch.Tensor, rows: list, ratios: dict,
           baseline: str = "sdpa") -> None:
    """Ours no worse than 2x the ``baseline`` computation in bf16 (SDPA, or the plain reference in bf16), both
    against the float32 reference."""
    sdpa_error, ours_error = relative_error(sdpa, expected), relative_error(ours, expected)
    rows.append({"case": name, "impl": baseline, "rel_error": sdpa_error})
    rows.append({"case": name, "impl": "sparsify", "rel_error": ours_error})
    ratios[f"{name} error sparsify/{baseline}"] = ours_error / sdpa_error
    print(f"{name:>40} {'sparsify':>12}: {ours_error:.2e} ({baseline} {sdpa_error:.2e})", flush=True)
    assert ours_error <= 2 * sdpa_error, name


def padded_topk_rows(device: torch.device, rows: list, ratios: dict) -> None:
    """Block top-k over a left-padded batch's rows shifted to start at 0 (zeros after each row's tokens), as the
    rewrite runs it: each row's real queries against a float32 reference of the same layout, and against SDPA
    under that layout's mask."""
    seq, heads, kv_heads, head_dim, lengths = 4096, 32, 8, 128, [4096, 3001, 1500]
    generator = torch.Generator(device=device).manual_seed(7)
    q = torch.randn(len(lengths), heads, seq, head_dim, device=device, generator=generator)
    k, v = (torch.randn(len(lengths), kv_heads, seq, head_dim, device=device, generator=generator) for _ in range(2))
    for row, n in enumerate(lengths):
        q[row, :, n:], k[row, :, n:], v[row, :, n:] = 0, 0, 0
    layout = block_topk_layout(q, k, density=0.1, block_m=128, block_n=64,
                               lengths=torch.tensor(lengths, device=device))
    expected, _ = block_sparse_attention_reference(q, k, v, layout)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ours, _ = block_sparse_attention(qb, kb, vb, layout, config=KernelConfig(128, 64, 8, 3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=layout.to_dense_mask(),
                                                            enable_gqa=True)
    real = torch.cat([torch.arange(n, device=device) + row * seq for row, n in enumerate(lengths)])

    def real_rows(x):
        return x.transpose(1, 2).reshape(-1, heads, head_dim)[real]

    _check(f"topk_10pct_padded_rows@{seq}/B{len(lengths)}", real_rows(ours), real_rows(sdpa), real_rows(expected),
           rows, ratios)


def model_window_rows(device: torch.device, rows: list, ratios: dict) -> None:
    """``sparsify.attention`` with a model's sliding window (Mistral's): the prefill through the block-sparse kernel
    over the window's blocks, and a decode step with the window as key padding, against SDPA with the windowed mask
    materialised."""
    seq, heads, kv_heads, head_dim, window = 4096, 32, 8, 128, 1024
    generator = torch.Generator(device=device).manual_seed(11)
    q = torch.randn(1, heads, seq, head_dim, device=device, generator=generator)
    k, v = (torch.randn(1, kv_heads, seq, head_dim, device=device, generator=generator) for _ in range(2))
    positions, keys = torch.arange(seq, device=device)[:, None], torch.arange(seq, device=device)[None, :]
    visible = (keys <= positions) & (positions - keys < window)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    scale = head_dim ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible, enable_gqa=True)
    ours = torch.ops.sparsify.attention(qb, kb, vb, None, None, None, True, scale, [], window)
    _check(f"model_window_{window}_prefill@{seq}", ours, sdpa, expected, rows, ratios)
    last = q[:, :, -1:]
    ours = torch.ops.sparsify.attention(last.bfloat16(), kb, vb, None, None, None, True, scale, [], window)
    _check(f"model_window_{window}_decode@{seq}", ours, sdpa[:, :, -1:], expected[:, :, -1:], rows, ratios)


def listed_decode_rows(device: torch.device, rows: list, ratios: dict) -> None:
    """The decode kernel over lists: ReSA's blocks from each left-padded row's own first token (block offsets),
    and LessIsMore's token positions, against the float32 reference of the same lists, beside that reference run
    in bf16."""
    capacity, heads, kv_heads, head_dim, batch = 32768, 32, 8, 128, 4
    generator = torch.Generator(device=device).manual_seed(13)
    q = torch.randn(batch, heads, 1, head_dim, device=device, generator=generator)
    k, v = (torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=generator) for _ in range(2))
    lengths = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 5, 1000, 4097], dtype=torch.int32, device=device)
    padding = torch.arange(capacity, device=device)[None, :] >= offsets[:, None]
    scores = torch.rand(batch, kv_heads, capacity // 16, device=device, generator=generator)
    blocks = scores.topk(256, dim=-1).indices.sort(-1).values.to(torch.int32)
    tokens = torch.rand(batch, kv_heads, capacity, device=device, generator=generator).topk(4096, dim=-1)
    tokens = tokens.indices.sort(-1).values.to(torch.int32)
    for name, lists in (("blocks_256x16_offsets", dict(kv_block_indices=blocks, block_size=16, block_offsets=offsets,
                                                      kv_block_counts=torch.full((batch, kv_heads), 256, dtype=torch.int32,
                                                                                 device=device))),
                        ("tokens_4096", dict(kv_token_indices=tokens,
                                             kv_token_counts=torch.full((batch, kv_heads), 4096, dtype=torch.int32,
                                                                        device=device)))):
        expected, _ = decode_attention_reference(q, k, v, lengths, None, key_padding=padding, **lists)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        ours, _ = decode_attention(qb, kb, vb, lengths, None, key_padding=padding, **lists)
        reference_bf16, _ = decode_attention_reference(qb, kb, vb, lengths, None, key_padding=padding, **lists)
        _check(f"decode_{name}@{capacity}/B{batch}", ours, reference_bf16, expected, rows, ratios,
               baseline="reference_bf16")


def chunk_and_selection_rows(device: torch.device, rows: list, ratios: dict) -> None:
    """A rectification's chunk (32 new tokens over a 32K static cache with left padding) through the split-KV
    kernel, against the float32 reference beside SDPA's bf16 error; and ReSA's selection kernels (block bounds,
    sorted top blocks, summary update) equal to their PyTorch references on the same bf16 summaries."""
    capacity, heads, kv_heads, head_dim, batch, chunk = 32768, 32, 8, 128, 2, 32
    generator = torch.Generator(device=device).manual_seed(17)
    q = torch.randn(batch, heads, chunk, head_dim, device=device, generator=generator)
    k, v = (torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=generator) for _ in range(2))
    lengths = torch.tensor([capacity, 20000], dtype=torch.int32, device=device)
    padding = torch.arange(capacity, device=device)[None, :] >= torch.tensor([[0], [300]], device=device)
    expected, _ = decode_attention_reference(q, k, v, lengths, None, key_padding=padding)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ours, _ = decode_attention(qb, kb, vb, lengths, None, key_padding=padding)
    position = lengths[:, None].long() - chunk + torch.arange(chunk, device=device)
    visible = (torch.arange(capacity, device=device) <= position[..., None]) & padding[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible[:, None], enable_gqa=True)
    _check(f"decode_chunk_{chunk}@{capacity}/B{batch}", ours, sdpa, expected, rows, ratios)

    n_blocks, starts = capacity // 16, torch.tensor([0, 300], device=device)
    kmin, kmax = (torch.zeros(batch, kv_heads, n_blocks, head_dim, device=device, dtype=torch.bfloat16)
                  for _ in range(2))
    update_summaries(kmin, kmax, kb, lengths.long(), starts, capacity, 16)
    # The op's PyTorch path, on the CPU: over the keys' whole length, so the blocks before each row's last agree.
    ref_min, ref_max = torch.zeros_like(kmin, device="cpu"), torch.zeros_like(kmax, device="cpu")
    resa_summaries(ref_min, ref_max, torch.empty(batch, 1, capacity, 0), kb.cpu(), None, starts.cpu(), 16)
    in_use = -(-(lengths.long() - starts) // 16)
    for row in range(batch):
        used = int(in_use[row])
        assert torch.equal(kmin[row, :, :used - 1].cpu(), ref_min[row, :, :used - 1]), "summary kmin"
        assert torch.equal(kmax[row, :, :used - 1].cpu(), ref_max[row, :, :used - 1]), "summary kmax"
    # The query heads as a decode step has them: the kernel takes each KV group's mean itself.
    query, scale = qb[:, :, 0], head_dim ** -0.5
    scores = block_bounds(query, kmin, kmax, in_use, 1, scale)
    torch.testing.assert_close(scores, block_bounds_reference(query, kmin, kmax, in_use, 1, scale), atol=1e-3,
                               rtol=1e-4)
    keep = torch.minimum(in_use, torch.tensor(256, device=device))
    same = (select_top_blocks(scores, keep, 256) == select_top_blocks_reference(scores, keep, 256)).float().mean()
    rows.append({"case": f"resa_selection@{capacity}/B{batch}", "impl": "sparsify", "equal_to_reference": same.item()})
    print(f"{'resa selection':>40}: summaries equal, bounds close, top blocks {same.item():.4f} equal", flush=True)
    assert same.item() >= 0.99


def plans_without_sync(device: torch.device, rows: list) -> None:
    """Each plan op under ``torch.cuda.set_sync_debug_mode("error")``: building a layout never waits for the GPU."""
    q = torch.randn(2, 8, 4096, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 4096, 128, device=device, dtype=torch.bfloat16)
    starts = torch.tensor([0, 700], device=device)
    plans = {
        "sink_window_layout": lambda: torch.ops.sparsify.sink_window_layout(4096, 4096, 64, 512, 128, 64, 1024,
                                                                             device),
        "block_topk_layout": lambda: torch.ops.sparsify.block_topk_layout(q, k, 0.1, 128, 64, 1, True, None),
        "block_topk_layout (padded rows)": lambda: torch.ops.sparsify.block_topk_layout(q, k, 0.1, 128, 64, 1, True,
                                                                                         starts),
        "delta_rows + row_layout": lambda: torch.ops.sparsify.row_layout(
            torch.ops.sparsify.delta_rows(4096, 64, -1, True, device), 4096, 4096, 4, 128, 128),
    }
    for name, build in plans.items():
        build()  # warm-up: first calls may allocate or compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            build()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append({"case": f"plan without host sync: {name}", "impl": "sparsify", "ok": True})
        print(f"{name:>40}: no host synchronisation", flush=True)


def decode_rows(device: torch.device, rows: list, ratios: dict) -> None:
    """The decode kernel on caches as transformers holds them, rows of different lengths, the first row padded."""
    for capacity, head_dim, heads, kv_heads, batch in ((32768, 128, 32, 8, 2), (4133, 64, 9, 3, 3)):
        generator = torch.Generator(device=device).manual_seed(capacity)
        q = torch.randn(batch, heads, 1, head_dim, device=device, generator=generator)
        k, v = (torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=generator) for _ in range(2))
        lengths = torch.tensor([capacity - 7 * row for row in range(batch)], device=device)
        padding = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        padding[0, :100] = False
        expected, expected_lse = decode_attention_reference(q, k, v, lengths, None, key_padding=padding)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        visible = (torch.arange(capacity, device=device)[None, :] < lengths[:, None]) & padding
        sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible[:, None, None],
                                                                enable_gqa=True)
        ours, lse = decode_attention(qb, kb, vb, lengths, None, key_padding=padding)
        name = f"decode@{capacity}/D{head_dim}/{heads}:{kv_heads}/B{batch}"
        sdpa_error, ours_error = relative_error(sdpa, expected), relative_error(ours, expected)
        lse_error = (lse - expected_lse).abs().max().item()
        rows.append({"case": name, "impl": "sdpa", "rel_error": sdpa_error})
        rows.append({"case": name, "impl": "sparsify", "rel_error": ours_error, "lse_max_abs": lse_error})
        ratios[f"{name} error sparsify/sdpa"] = ours_error / sdpa_error
        print(f"{name:>40} {'sparsify':>12}: {ours_error:.2e} (sdpa {sdpa_error:.2e}), lse {lse_error:.1e}",
              flush=True)
        assert ours_error <= 2 * sdpa_error and lse_error < 0.05, name


if __name__ == "__main__":
    main()
