"""ReSA end to end: decode ms per token of ``generate()`` under ``sparsify.compile(model, "resa")`` against
``sparsify.compile(model, "dense")``, rectification included, on a random-weight model of Llama-3-8B's shape.

bf16, 32 layers, a StaticCache (decode replays CUDA graphs), greedy, as ``benchmarks/e2e.py`` measures (two
warm-up calls, then ``--repeats`` timed ones; every step timed by CUDA events). A row's ``ms`` is the mean step
over the timed calls, so the every-32nd step that re-encodes 32 tokens densely counts at its share
(``median_step_ms`` beside it is a plain step). Rows (names from shared/docs/benchmarks.md): case ``e2e_b<B>``,
impls ``dense``, ``resa`` (the preset: 10% of the blocks) and ``resa_4k`` (``benchmarks/policies/resa-4k.yaml``:
a 4096-token budget, as ``sparsify bench decode``). ``bytes_bound``: a step's bytes under dense over its bytes
under the method (weights + K/V read + the summaries; a rectification's dense chunk at its share), the speedup a
memory-bound step allows.

    python -m benchmarks.resa_e2e --cases 131072x1 65536x4
"""

from __future__ import annotations

import argparse
import math

import torch

from sparsify.policy import Policy

from .common import write_result
from .e2e import llama3_8b_shaped, measure, policy_of

POLICIES = {"dense": "sparsify_dense", "resa": "sparsify_resa", "resa_4k": "sparsify_resa-4k"}


def resa_params(impl: str):
    """The ReSA parameters of a row's policy (its one decode rule), as the run uses them."""
    policy = Policy.load(policy_of(POLICIES[impl]))
    spec, = [rule.spec for rule in policy.rules if rule.spec.name == "resa"]
    return spec.params


def step_gbytes(model, impl: str, seq: int, batch: int) -> float:
    """The bytes one decode step must read (GB): every weight but the embedding (a gather of B rows), and per layer
    the K/V a step attends to; for resa also both summaries of every block, and a rectification's dense chunk
    (weights + all K/V once, replacing a step) at its share of ``rectify_every`` steps."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * head_dim * 2  # K and V, bf16
    dense = weights + per_token * seq
    if impl == "dense":
        return dense / 1e9
    params = resa_params(impl)
    blocks = -(-seq // params.block_size)
    kept = max(math.ceil(blocks * params.sparse_ratio), min(blocks, params.min_blocks))
    sparse = weights + per_token * (kept * params.block_size + blocks)  # summaries: two D-vectors a block, as K/V
    every = params.rectify_every
    return (((every - 1) * sparse + dense) / every if every else sparse) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["131072x1", "65536x4"], help="LENGTHxBATCH")
    parser.add_argument("--impls", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--new-tokens", type=int, default=96, help="decode steps a call times (3 rectifications)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--part", default="resa-e2e")
    parser.add_argument("--profile", action="store_true",
                        help="also save each row's kernel profile (e2e-profile-sparsify_<impl>-<N>.txt)")
    args = parser.parse_args(argv)
    cases = []
    for case in args.cases:
        try:
            seq, batch = (int(x) for x in case.split("x"))
        except ValueError:
            parser.error(f"--cases: {case!r} is not LENGTHxBATCH (e.g. 131072x1)")
        cases.append((seq, batch))
    model = llama3_8b_shaped(args.layers, max(seq for seq, _ in cases) + args.new_tokens + 64)
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, ratios = [], {}
    for seq, batch in cases:
        ids = torch.randint(1, model.config.vocab_size, (batch, seq), device="cuda", generator=generator)
        reference, timed = None, {}
        for impl in sorted(args.impls, key=lambda name: name != "dense"):  # dense first: the others compare to it
            measured, tokens = measure(POLICIES[impl], model, ids, reference, args.profile, args.repeats,
                                       args.new_tokens)
            reference = tokens if impl == "dense" else reference
            prefill, decode = measured
            row = {"case": f"e2e_b{batch}", "seq_len": seq, "impl": impl}
            if "error" in decode:
                rows.append({**row, "error": decode["error"]})
                continue
            timed[impl] = decode["mean_ms"]
            rows.append({**row, "ms": decode["mean_ms"], "median_step_ms": decode["ms"],
                         "tokens_per_s": batch * 1e3 / decode["mean_ms"], "prefill_ms": prefill["ms"],
                         "bytes_gb": step_gbytes(model, impl, seq, batch), "peak_gib": prefill["peak_gib"],
                         "first_call_s": prefill["first_call_s"],
                         "rectifications_per_call": prefill.get("rectifications_per_call"),
                         "methods_applied": prefill.get("methods_applied"),
                         "compiled_by": prefill.get("compiled_by"), "graphs_compiled": prefill.get("graphs_compiled"),
                         "token_agreement_with_dense": decode["token_agreement_with_hf_eager"]})
            if impl != "dense" and "dense" in timed:
                key = f"e2e_b{batch}@{seq}"
                bound = step_gbytes(model, "dense", seq, batch) / step_gbytes(model, impl, seq, batch)
                ratios[f"{key} dense/{impl}"] = timed["dense"] / timed[impl]
                ratios[f"{key} bytes bound dense/{impl}"] = bound
                ratios[f"{key} share of the bound {impl}"] = timed["dense"] / timed[impl] / bound
            path = write_result(args.part, rows, ratios,
                                {"layers": args.layers, "new_tokens": args.new_tokens, "ratio_meaning":
                                 "dense's ms per token / the method's (> 1: faster); bytes bound: the same ratio of "
                                 "the bytes a step reads; share: the speedup over the bound"})
            print(f"  wrote {path}", flush=True)


if __name__ == "__main__":
    main()
