"""Does Delta's correction fit a model? Layer by layer, with the dense model's own inputs (so errors do not
compound), how far the sparse base's output is from dense, how far the corrected output is, and how alike the
shifts of neighbouring rows are — the assumption the correction rests on.

For each attention layer that the Delta policies make sparse (layers 3 and up, as in
``benchmarks/policies/delta-w*.yaml``) and each window, on one prompt per task as the eval harness generates them
(needle at half depth, seed 0: ``niah_single`` is the fidelity prompt, essays around the needle; ``passkey``
hides its key in a repeated filler sentence), with sink 64 and gamma 64: the base as masked SDPA under sparsify's
token rule, the correction by sparsify's reference implementation:

* ``shift[j] = O_dense[j] - O_sparse[j]`` (what the window misses at row ``j``);
* ``base_error`` / ``delta_error``: relative error ``||O - O_dense|| / ||O_dense||`` of the base and of the
  corrected output ``O_sparse[j] + shift[i]`` (``i`` the group's strided row), over the rows the correction
  changes: neither strided (exact anyway) nor in the exact tail;
* ``base_bias`` / ``delta_bias``: the part of that error all rows share, the distribution shift the method is
  meant to remove: ``||mean over rows of (O - O_dense)||`` per head, over the root-mean-square norm of
  ``O_dense``'s rows, averaged over heads;
* ``cos_shift_dK``: mean cosine between ``shift[j]`` and ``shift[j - K]`` for rows ``K`` after a strided row.
  Adding a neighbour's shift of equal norm reduces a row's error only when their cosine exceeds 0.5
  (``||a - b||^2 = 2 - 2 cos`` against ``||a||^2 = 1``).

Rows: one per task, length and window, each number the mean over layers; ``layers`` in the JSON keeps every layer.
Ratios: mean ``delta_error / base_error`` and ``delta_bias / base_bias`` over layers (< 1: the correction helps).

    python -m benchmarks.delta_shift --tasks niah_single passkey --lengths 2000 4000 --windows 256 1024
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from sparsify.evaluation.runner import prompt_ids, sample_rng
from sparsify.evaluation.tasks import TASKS
from sparsify.kernels.block_sparse_attention import DeltaCorrection
from sparsify.kernels.delta import delta_correction_reference
from sparsify.kernels.layout import TokenMask
from sparsify.models import DEFAULT_MODEL, load_model
from sparsify.methods.delta import delta_tail

from .common import relative_error, write_result

SINK, GAMMA, FIRST_SPARSE_LAYER, COSINE_DISTANCES = 64, 64, 3, (1, 8, 63)


def relative_bias(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """(B, H, rows, D) -> the norm of the error's mean over rows, relative to ``expected``'s RMS row norm."""
    bias = (actual - expected).mean(dim=2).norm(dim=-1)
    scale = expected.square().sum(dim=-1).mean(dim=2).sqrt()
    return (bias / scale).mean().item()


def layer_numbers(query, key, value, scaling: float, window: int) -> dict[str, float]:
    """One layer's numbers (see the module's docstring); ``query`` (B, H, N, D), ``key``/``value`` (B, H_kv, N, D)."""
    length = query.shape[2]
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    positions = torch.arange(length, device=query.device)
    mask = TokenMask(causal=True, sink=SINK, window=window).visible(positions[:, None], positions, length)
    sparse = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    tail = delta_tail(length, GAMMA, -1)
    exact_rows = torch.cat([dense[:, :, ::GAMMA], dense[:, :, length - tail:]], dim=2)
    corrected = delta_correction_reference(sparse, DeltaCorrection(exact_rows, GAMMA, tail))
    rows = positions[:length - tail]
    offset = rows % GAMMA
    rows, offset = rows[offset != 0], offset[offset != 0]
    expected = dense[:, :, rows]
    numbers = {"base_error": relative_error(sparse[:, :, rows], expected),
               "delta_error": relative_error(corrected[:, :, rows], expected),
               "base_bias": relative_bias(sparse[:, :, rows], expected),
               "delta_bias": relative_bias(corrected[:, :, rows], expected)}
    shift = dense - sparse
    for distance in COSINE_DISTANCES:
        picked = rows[offset == distance]
        cosine = F.cosine_similarity(shift[:, :, picked], shift[:, :, picked - distance], dim=-1)
        numbers[f"cos_shift_d{distance}"] = cosine.mean().item()
    return numbers


def measure(model, tokenizer, task: str, length: int, windows: list[int]) -> list[dict]:
    """Run the dense model once on ``task``'s prompt of ``length`` tokens, measuring every sparse layer."""
    from transformers import AttentionInterface

    sample = TASKS.get(task).generate(tokenizer, length, sample_rng(0, "fidelity", length), 0.5)
    ids = prompt_ids(tokenizer, sample, model.device)
    rows = []

    def dense_attention_that_measures(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if module.layer_idx >= FIRST_SPARSE_LAYER:
            for window in windows:
                rows.append({"task": task, "seq_len": ids.shape[1], "window": window, "layer": module.layer_idx,
                             **layer_numbers(query, key, value, scaling, window)})
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("sparsify_delta_shift", dense_attention_that_measures)
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "sparsify_delta_shift"
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.config._attn_implementation = implementation
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "passkey"], choices=TASKS.names())
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, device=args.device)
    rows, layers, ratios = [], [], {}
    for task in args.tasks:
        for length in args.lengths:
            measured = measure(model, tokenizer, task, length, args.windows)
            layers += measured
            for window in args.windows:
                mine = [row for row in measured if row["window"] == window]
                row = {"task": task, "seq_len": mine[0]["seq_len"], "window": window}
                row |= {key: statistics.mean(layer[key] for layer in mine)
                        for key in mine[0] if key not in (*row, "layer")}
                rows.append(row)
                name = f"{task}@{length} window {window}"
                for quantity in ("error", "bias"):
                    ratios[f"{name} delta_{quantity}/base_{quantity}"] = statistics.mean(
                        layer[f"delta_{quantity}"] / layer[f"base_{quantity}"] for layer in mine)
                print(f"{name}: delta/base error {ratios[f'{name} delta_error/base_error']:.3f}, bias "
                      f"{ratios[f'{name} delta_bias/base_bias']:.3f}; mean cos(shift) "
                      + ", ".join(f"d{d} {row[f'cos_shift_d{d}']:.2f}" for d in COSINE_DISTANCES), flush=True)
    write_result("delta_shift", rows, ratios, {"model": args.model, "sink": SINK, "gamma": GAMMA, "layers": layers})


if __name__ == "__main__":
    main()
