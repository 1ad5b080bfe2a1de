"""GPU correctness in bf16: each kernel's error against a float32 reference must be no worse than 2x that of dense
SDPA in bf16 against the same reference: the block-sparse prefill kernel per layout, and the split-KV decode
kernel (a batch with per-row lengths and left padding). Writes benchmarks/results/gpu_correctness.json.

    python -m benchmarks.gpu_correctness
"""

from __future__ import annotations

import torch

from sparsify.kernels.block_sparse_attention import (KernelConfig, block_sparse_attention,
                                                      block_sparse_attention_reference)
from sparsify.kernels.decode import decode_attention, decode_attention_reference
from sparsify.kernels.layout import block_topk_layout, causal_layout, dense_layout, sink_window_layout

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
    decode_rows(device, rows, ratios)
    write_result("gpu_correctness", rows, ratios)


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
