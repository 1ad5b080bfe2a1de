"""GPU correctness in bf16: the kernel's error against a float32 reference must be no worse than 2x that of dense
SDPA in bf16 against the same reference. Writes benchmarks/results/gpu_correctness.json.

    python -m benchmarks.gpu_correctness
"""

from __future__ import annotations

import torch

from sparsify.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference
from sparsify.kernels.layout import block_topk_layout, causal_layout, dense_layout, sink_window_layout

from .common import write_result


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def main(argv=None) -> None:
    device = torch.device("cuda")
    rows, ratios = [], {}
    for seq, head_dim, heads, kv_heads in ((4096, 128, 32, 8), (3001, 64, 9, 3), (2048, 128, 8, 8)):
        generator = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(1, heads, seq, head_dim, device=device, generator=generator)
        k, v = (torch.randn(1, kv_heads, seq, head_dim, device=device, generator=generator) for _ in range(2))
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        layouts = {
            "causal": causal_layout(seq, seq, 128, 64, device=device),
            "bidirectional": dense_layout(seq, seq, 128, 64, device=device),
            "sink_window_512": sink_window_layout(seq, seq, 64, 512, 128, 64, device=device),
            "topk_10pct": block_topk_layout(q, k, density=0.1, block_m=128, block_n=64),
        }
        for case, layout in layouts.items():
            expected, expected_lse = block_sparse_attention_reference(q, k, v, layout)
            ours, lse = block_sparse_attention(qb, kb, vb, layout)
            mask = layout.to_dense_mask()
            sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
            ours_error, sdpa_error = relative_error(ours, expected), relative_error(sdpa, expected)
            lse_error = (lse - expected_lse).abs().max().item()
            name = f"{case}@{seq}/D{head_dim}/{heads}:{kv_heads}"
            rows.append({"case": name, "impl": "sparsify", "rel_error": ours_error, "lse_max_abs": lse_error})
            rows.append({"case": name, "impl": "sdpa", "rel_error": sdpa_error})
            ratios[f"{name} error sparsify/sdpa"] = ours_error / sdpa_error
            print(f"{name:>40}: sparsify {ours_error:.2e}  sdpa {sdpa_error:.2e}  lse {lse_error:.1e}", flush=True)
            assert ours_error <= 2 * sdpa_error, name
    write_result("gpu_correctness", rows, ratios)


if __name__ == "__main__":
    main()
