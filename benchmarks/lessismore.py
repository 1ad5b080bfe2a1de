"""LessIsMore decode benchmark: the attention of one decode step summed over all 32 layers, as the policy sets the
layers (dense, selection, sparse), against dense SDPA in every layer; and end to end, ms per token of
``generate()`` on a random-weight Llama-3-8B-shaped model.

bf16, 32 query heads / 8 KV heads, D=128, a full cache of ``seq`` tokens. The step: layers 0-1 dense SDPA, the
selection layers (2 and 11 of 32, the method's default) ``sparsify.lessismore_select`` (full attention, and the
token set from the same pass's scores), every other layer ``sparsify.token_decode`` over the latest selection's
``--budget`` tokens. Every layer reads one shared cache (32 layers of 128K at B=8 would not fit): the bytes and
the kernels are a real step's. Timed as one replayed CUDA graph per step, as generate() runs decode under sparsify.
Rows (names from shared/docs/benchmarks.md): case ``step_b1`` / ``step_b8``, impls ``lessismore`` and ``dense``;
``parts_ms``: one selection layer and one sparse layer alone. ``--e2e``: case ``e2e`` (ms per token of
generate(), ``benchmarks/e2e.py``'s measurement, B=1), impls ``lessismore`` and ``dense``.

    python -m benchmarks.lessismore --seq 32768 131072 --batch 1 8 --e2e 131072
"""

from __future__ import annotations

import argparse

import torch

import sparsify  # noqa: F401  (registers torch.ops.sparsify)
from sparsify.methods import METHODS
from sparsify.methods.lessismore import LessIsMoreParams

from .common import decode_inputs, time_ms, write_result
from .decode import graphed

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32


def roles(params: LessIsMoreParams) -> list[str]:
    """Each layer's role under the method's defaults for a model of LAYERS layers."""
    bound = METHODS.get("lessismore").for_model(params, LAYERS)
    return ["dense" if layer in bound.dense_layers else "selection" if layer in bound.selection_layers
            else "sparse" for layer in range(LAYERS)]


class Step:
    """One decode step's attention over all layers on q (B, Hq, 1, D) and one cache k, v (B, Hkv, L, D)."""

    def __init__(self, q, k, v, params: LessIsMoreParams):
        self.q, self.k, self.v, self.params = q, k, v, params
        self.ops = torch.ops.sparsify
        self.scale = HEAD_DIM ** -0.5
        self.offset = torch.tensor(k.shape[2] - 1, device=q.device)  # the new token's position
        self.starts = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
        self.roles = roles(params)

    def dense(self):
        return torch.nn.functional.scaled_dot_product_attention(self.q, self.k, self.v, enable_gqa=True)

    def select(self):
        p = self.params
        return self.ops.lessismore_select(self.q, self.k, self.v, self.offset, None, self.starts, p.budget,
                                          p.recent, p.sink, p.selection == "per_kv_head", self.scale)

    def sparse(self, tokens, counts):
        return self.ops.token_decode(self.q, self.k, self.v, self.offset, None, tokens, counts, self.scale)

    def lessismore(self):
        tokens = counts = None
        for role in self.roles:
            if role == "dense":
                self.dense()
            elif role == "selection":
                _, tokens, counts = self.select()
            else:
                self.sparse(tokens, counts)

    def all_dense(self):
        for _ in self.roles:
            self.dense()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--e2e", type=int, nargs="*", default=[], metavar="SEQ",
                        help="also generate() end to end at these lengths (B=1)")
    parser.add_argument("--e2e-repeats", type=int, default=3,
                        help="timed generate() calls after the two warm-up calls (ms: the mean of their steps)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    params = LessIsMoreParams(budget=args.budget)
    rows, ratios, parts = [], {}, {}
    for seq in args.seq:
        for batch in args.batch:
            q, k, v = decode_inputs(batch, seq, HEADS, KV_HEADS, HEAD_DIM, device)
            step = Step(q, k, v, params)
            _, tokens, counts = step.select()
            timed = {"lessismore": time_ms(graphed(step.lessismore)), "dense": time_ms(graphed(step.all_dense))}
            case = f"step_b{batch}"
            parts[f"{case}@{seq}"] = {"selection_layer": time_ms(graphed(step.select)),
                                      "sparse_layer": time_ms(graphed(lambda: step.sparse(tokens, counts))),
                                      "dense_layer": time_ms(graphed(step.dense))}
            rows += [{"case": case, "seq_len": seq, "impl": impl, "ms": ms} for impl, ms in timed.items()]
            ratios[f"{case}@{seq} dense/lessismore"] = timed["dense"] / timed["lessismore"]
            print(f"{case} N={seq:>6}: " + "  ".join(f"{impl} {ms:8.3f} ms" for impl, ms in timed.items())
                  + f"  parts {parts[f'{case}@{seq}']}", flush=True)
            del q, k, v, step, tokens, counts
            torch.cuda.empty_cache()
    extra = {"budget": args.budget, "roles": roles(params), "parts_ms": parts,
             "ratio_meaning": "dense's time / lessismore's (> 1: lessismore faster)"}
    if args.e2e:
        from .e2e import llama3_8b_shaped, measure

        model = llama3_8b_shaped(LAYERS, max(args.e2e) + 128)
        generator = torch.Generator(device="cuda").manual_seed(0)
        for seq in args.e2e:
            ids = torch.randint(1, model.config.vocab_size, (1, seq), device="cuda", generator=generator)
            timed = {}
            for impl in ("dense", "lessismore"):
                (prefill, decode), _ = measure(f"sparsify_{impl}", model, ids, None, False, args.e2e_repeats)
                if "error" in decode:
                    rows.append({"case": "e2e", "seq_len": seq, "impl": impl, "error": decode["error"]})
                    continue
                timed[impl] = decode["mean_ms"]
                rows.append({"case": "e2e", "seq_len": seq, "impl": impl, "ms": decode["mean_ms"],
                             "median_step_ms": decode["ms"], "tokens_per_s": 1e3 / decode["mean_ms"],
                             "prefill_ms": prefill["ms"], "methods_applied": prefill.get("methods_applied")})
            if len(timed) == 2:
                ratios[f"e2e@{seq} dense/lessismore"] = timed["dense"] / timed["lessismore"]
            write_result("lessismore", rows, ratios, extra)
    path = write_result("lessismore", rows, ratios, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
