"""Tensor and context parallelism on GPUs: a random-weight model of Llama-3-8B's shape split over N GPUs against
one GPU, and one attention layer's context-parallel prefill over N GPUs, sink + window against a dense ring.

**Tensor parallel** (cases ``prefill``, ``decode``). The model of ``benchmarks/e2e.py`` (hidden 4096, 32/8 heads,
D=128, MLP 14336, vocab 128256, ``--layers`` 32, random weights seeded 0, bf16, B=1), built whole on every rank
and split by ``sparsify.distributed.tensor_parallel`` (each rank holds 16/4 heads and half the MLP, about 8 of the
16 GB). Methods (``--impls``): ``dense`` (the model as transformers runs it: SDPA, a DynamicCache; e2e's
``hf_eager``) and ``sparsify_<policy>`` (``sparsify.compile(model, policy)``, a preset or
``benchmarks/policies/<policy>.yaml``, a StaticCache, as in e2e). For each prompt length (``--seq``, and
``--decode-seq``, whose calls also decode ``--new-tokens``), two warm-up calls of ``generate()`` then
``--repeats`` timed ones: prefill = the call's start to the first logits, decode = one step's logits to the next
(median over all steps), tokens/s = 1000 / decode. Rows ``<method>_tp<N>``; ``--part tp1`` runs the same on one
GPU in one process (``dense_tp1``, ...), the baseline of the ratios ``tp1/tpN``.

**Output check against one GPU.** Every TP part saves, beside its results (``tp-<part>[-<tag>]-logits.pt``, about
0.25 MB a row in bf16), the prefill's last-position logits and the generated tokens of its first call; ``--merge``
compares each ``tpN`` row with the ``tp1`` row of the same method and length: ``logits_max_abs_diff_vs_tp1``,
``top1_agrees_with_tp1`` (the share of batch rows whose argmax agrees) and, on decode rows,
``token_agreement_with_tp1`` (the share of generated tokens equal). Saved, not recomputed on rank 0: the whole
model would fit beside rank 0's shard (16 + 8 GB of an H200's 141), but rank 0 would run every one-GPU prefill and
decode again inside the TP run while the other ranks wait, and the tp1 part measures them anyway. A ``tp1`` part must
have been run (on the same kind of GPU, with the same versions and settings) for the columns to appear.

**Context parallel** (case ``cp_prefill``): one attention layer, not the whole model (whole-model CP prefill at
256K is heavy, and the attention is what differs; the rest of a layer is split by position either way). Each rank
holds its contiguous slice of q (B, 32, N/R, 128), k and v (B, 8, N/R, 128), bf16, from seeded generators; rows
``dense_ring_cp<N>`` (``sparsify.context_parallel.ring_attention``: exact causal, every rank's K/V round the ring)
and ``sparsify_sink_window_cp<N>`` (``layout_attention`` over ``plan_kv_fetch`` of a sink 64 + window 2048 layout,
128 x 64 blocks; the plan is built once per forward, outside the timed calls: its ``plan_ms``). Columns:
``kv_bytes_received`` (the max over ranks; ``kv_bytes_per_rank`` each rank's), ``kv_share_of_ring`` (that max over
the ring's) and ``max_abs_diff_sampled_rows``: each rank's first and last 64 query rows against float32 attention
over the whole sequence's keys under the same token rule (causal; sink + window).

**Timing.** Every rank takes part in every timed region: a barrier, then CUDA events on each rank around the call
(``time.perf_counter`` on the CPU, for ``--tiny``). Each timed call's value is **the max over ranks** (the call is
done when the slowest rank is); a row reports the median over calls (CP rows also ``ms_per_rank``, each rank's own
median). A rank that fails under several ranks stops the run (torchrun ends the others): results are written after
every row, so what finished is kept; on one process an out-of-memory error is recorded as the row's ``error``.

    python -m sparsify bench tp --part tp1                                          # one GPU: dense_tp1, ...
    torchrun --standalone --nproc-per-node 2 -m sparsify bench tp                   # tp2 and cp2 parts
    python -m sparsify bench tp --merge                                             # tp.json / tp.md

Parts write ``benchmarks/results/tp-<part>[-<tag>].json``; ``--part`` picks which (``tp1`` in one process,
``tpN``/``cpN`` under N ranks, both by default there), ``--tag`` names runs split by length (each command of a
session may be limited in time: ``--seq 32768 --decode-seq --tag 32k``, then ``--seq 131072 --tag 128k``).
``--merge`` joins parts (default: every ``tp-*.json`` there); each keeps its own date, device, versions and command,
and a ratio or check between two parts is computed only where both ran on the same device with the same versions
and settings (model, layers, dtype, the method's policy; new tokens for decode), else it is listed under
``not_compared``. Targets (``targets`` in the JSON, and the markdown): TP=2 prefill at least 1.7x one GPU for the
same method; CP sink_window at least 10x faster than the dense ring, each rank receiving under 10% of its KV.

``--tiny``: a 2-layer model of width 64 (4/2 heads of 16, vocab 256; float32 on the CPU), prompts of 256 tokens,
4 new tokens, policies scaled down (sink 16 + window 32, the cost model off), and CP over 4096 tokens (sink 64 + window
256, 4/2 heads of 16): the whole benchmark in about a minute on the CPU with gloo
(``TRITON_INTERPRET=1 python -m torch.distributed.run --standalone --nproc-per-node 2 -m sparsify bench tp --tiny``),
or on GPUs before a long run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .common import invocation, results_dir, write_result
from .e2e import LLAMA3_8B, SPARSIFY_PREFIX, policy_of, random_llama

NAME = "tp"
DENSE = "dense"
TINY_MODEL = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rope_theta": 10000.0}
# One attention layer of context parallelism: the model's heads, and the sink + window of the sink_window preset.
CP_SHAPE = {"heads": 32, "kv_heads": 8, "head_dim": 128, "sink": 64, "window": 2048, "block_m": 128, "block_n": 64}
TINY_CP_SHAPE = {"heads": 4, "kv_heads": 2, "head_dim": 16, "sink": 64, "window": 256, "block_m": 128, "block_n": 64}
CP_SAMPLED_ROWS = 64  # the first and last rows of each rank's slice checked against float32 attention
# --tiny: the presets' methods at a scale that 256-token prompts leave sparse (sink 16 + window 32 on every layer).
TINY_SINK_WINDOW = {"use": "sink_window", "with": {"sink": 16, "window": 32}}
TINY_POLICIES = {
    "sparsify_dense": "dense",
    "sparsify_sink_window": {"rules": [{"when": {"phase": "prefill"}, **TINY_SINK_WINDOW}]},
    "sparsify_delta": {"rules": [{"when": {"phase": "prefill"}, "use": "delta",
                                  "with": {"gamma": 16, "base": TINY_SINK_WINDOW}}]},
}
DEFAULTS = {  # by --tiny
    False: {"seq": [32768, 131072], "decode_seq": [131072], "cp_seq": [262144], "new_tokens": 32, "layers": 32,
            "repeats": 3, "cp_runs": 20},
    True: {"seq": [256], "decode_seq": [256], "cp_seq": [4096], "new_tokens": 4, "layers": 2, "repeats": 1,
           "cp_runs": 3},
}
WARMUP_CALLS = 2  # generate(): the first captures and compiles, the second may compile again for the reused cache
CP_WARMUP = 3
# The targets: TP=N prefill at least 1.7x one GPU for the same method; CP sink_window at least 10x the dense
# ring's speed, each rank receiving under 10% of the KV the ring moves.
TP_PREFILL_SPEEDUP = 1.7
CP_SPEEDUP = 10.0
CP_KV_SHARE = 0.10


# -- ranks and clocks ----------------------------------------------------------------------------------------------


def launched_ranks() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def say(message: str) -> None:
    if rank() == 0:
        print(message, flush=True)


class Clock:
    """Marks and elapsed times: CUDA events on the GPU (nothing synchronises between marks), ``perf_counter`` on
    the CPU. ``line_up()`` starts a timed region on every rank together: a barrier, then the device drained."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def line_up(self) -> None:
        if dist.is_initialized():
            # NCCL's barrier on this rank's own GPU (without device_ids it guesses, and warns).
            dist.barrier(**({"device_ids": [torch.cuda.current_device()]} if self.cuda else {}))
        self.sync()


def _collective_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def max_over_ranks(values: list[float]) -> list[float]:
    """Each value's maximum over the ranks (the same list on every rank); the values themselves on one process."""
    if not dist.is_initialized() or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def per_rank(value: float) -> list[float]:
    """``value`` of every rank, by rank (every rank gets the list)."""
    if not dist.is_initialized():
        return [value]
    mine = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


# -- tensor parallel -----------------------------------------------------------------------------------------------


def prompt(seq: int, vocab: int, device: str) -> torch.Tensor:
    """(1, seq) token ids from a CPU generator seeded by the length (the same on every device, rank and part),
    never the pad token 0 (generate() would mask it and leave the causal fast path)."""
    return torch.randint(1, vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)


class Implementation:
    """One method's generate(): the model as it is (``dense``), or compiled by sparsify with a StaticCache reset
    between calls (its buffers keep their addresses)."""

    def __init__(self, method: str, model, prompt_len: int, new_tokens: int, policy, compile_options: dict):
        import sparsify

        self.method = method
        self.cache = None
        if method == DENSE:
            self.model = model
        else:
            from transformers import StaticCache

            self.model = sparsify.compile(model, policy, **compile_options)
            self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **kwargs):
        if self.cache is not None:
            self.cache.reset()
            kwargs["past_key_values"] = self.cache  # e2e's way; transformers 5.17 (the GPU machine's) has no `cache`
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            return self.model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


class StepClock:
    """A logits processor marking the clock whenever generate() has new logits: after the prefill, then after every
    decode step. Nothing synchronises, so the timed loop runs as it would untimed."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock.mark())
        return scores


def timed_generate(impl: Implementation, ids: torch.Tensor, new_tokens: int, clock: Clock):
    """One ``generate(max_new_tokens=new_tokens + 1)`` on every rank together: ``(total_ms, prefill_ms, step_ms,
    output)``, each time the max over ranks."""
    from transformers import LogitsProcessorList

    steps = StepClock(clock)
    clock.line_up()
    start = clock.mark()
    output = impl.generate(ids, new_tokens + 1, logits_processor=LogitsProcessorList([steps]))
    end = clock.mark()
    clock.sync()
    marks = steps.marks
    mine = [clock.ms(start, end), clock.ms(start, marks[0]), *(clock.ms(a, b) for a, b in itertools.pairwise(marks))]
    total, prefill, *step = max_over_ranks(mine)
    return total, prefill, step, output


def measure_tp(method: str, model, ids: torch.Tensor, new_tokens: int, ranks: int, clock: Clock, policy,
               compile_options: dict, repeats: int) -> tuple[list[dict], dict | None]:
    """The rows of one method at one length (prefill; decode too when ``new_tokens``), and what the first call
    gave (the last position's logits, the generated tokens) for the check against one GPU."""
    seq = ids.shape[1]
    cuda = clock.cuda
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = {"seq_len": seq, "impl": f"{method}_tp{ranks}", "method": method, "ranks": ranks}
    if cuda:
        base["start_gib"] = max_over_ranks([torch.cuda.memory_allocated() / 2**30])[0]
    try:
        impl = Implementation(method, model, seq, new_tokens, policy, compile_options)
        calls = [timed_generate(impl, ids, new_tokens, clock) for _ in range(WARMUP_CALLS + repeats)]
    except torch.OutOfMemoryError as error:
        if ranks > 1:
            raise  # one rank out of memory alone would leave the others waiting in a collective
        torch.cuda.empty_cache()
        message = str(error).splitlines()[0][:200]
        say(f"{method} N={seq}: out of memory: {message}")
        cases = ("prefill", "decode") if new_tokens else ("prefill",)
        return [{"case": case, **base, "error": f"out of memory: {message}"} for case in cases], None
    first, second, timed = calls[0], calls[1], calls[WARMUP_CALLS:]
    typical_ms = statistics.median(call[0] for call in timed)
    prefill_ms = statistics.median(call[1] for call in timed)
    extra = {"first_call_s": (first[0] - typical_ms) / 1e3, "second_call_s": (second[0] - typical_ms) / 1e3}
    if cuda:
        extra["peak_gib"] = max_over_ranks([torch.cuda.max_memory_allocated() / 2**30])[0]
    if method != DENSE:
        methods, fallbacks = impl.model.sparsify.applied()
        extra["methods_applied"] = sorted(methods)
        extra["fallbacks"] = sorted(fallbacks)
    rows = [{"case": "prefill", **base, "ms": prefill_ms, **extra}]
    line = f"{base['impl']:>28} N={seq:>6}: prefill {prefill_ms:9.1f} ms"
    if new_tokens:
        steps = [step for call in timed for step in call[2]]
        decode_ms = statistics.median(steps)
        rows.append({"case": "decode", **base, "ms": decode_ms, "mean_ms": statistics.mean(steps),
                     "tokens_per_s": ids.shape[0] * 1e3 / decode_ms})
        line += f"  decode {decode_ms:7.2f} ms/token"
    say(line + f"  first call +{extra['first_call_s']:.1f} s")
    output = first[3]
    outputs = {"logits": output.logits[0].to(model.dtype).cpu(), "tokens": output.sequences[:, seq:].cpu()}
    del impl, calls
    torch._dynamo.reset()
    return rows, outputs


def run_tp(args, part: str, ranks: int, mesh, device: str, dtype: torch.dtype, clock: Clock) -> None:
    from sparsify.distributed import tensor_parallel

    shape = TINY_MODEL if args.tiny else LLAMA3_8B
    lengths = sorted(set(args.seq) | set(args.decode_seq))
    model = random_llama(shape, args.layers, max(lengths) + args.new_tokens + 64, device, dtype)
    if mesh is not None:
        model = tensor_parallel(model, mesh)
    name = part_name(part, args.tag)
    extra = {"part": part, "ranks": ranks, "settings": tp_settings(args, shape, dtype),
             "policies": {method: describe_policy(policy) for method, policy in args.policies.items()},
             "new_tokens": args.new_tokens, "repeats": args.repeats, "command": command(ranks)}
    rows, outputs = [], {}
    for method in args.impls:
        for seq in lengths:
            started = time.time()
            new_tokens = args.new_tokens if seq in args.decode_seq else 0
            measured, output = measure_tp(method, model, prompt(seq, shape["vocab_size"], device), new_tokens, ranks,
                                          clock, args.policies.get(method), args.compile_options, args.repeats)
            rows += measured
            if output is not None:
                outputs[f"{method}@{seq}"] = output
            if rank() == 0:  # after every row: a run stopped by a time limit keeps what it measured
                path = write_result(name, rows, within_part_ratios(rows), extra)
                torch.save(outputs, path.with_name(f"{name}-logits.pt"))
                say(f"  ({time.time() - started:.0f} s; wrote {path})")
    del model


# -- context parallel ----------------------------------------------------------------------------------------------


def cp_inputs(seq: int, shape: dict, split, device: str, dtype: torch.dtype):
    """This rank's q (1, H, L_r, D) and the whole sequence's k, v (1, Hkv, N, D) (every rank draws the same, for
    the check), from generators seeded by the length (and the rank, for q)."""
    generator = torch.Generator(device=device).manual_seed(seq)
    full_k, full_v = (torch.randn(1, shape["kv_heads"], seq, shape["head_dim"], device=device, dtype=dtype,
                                  generator=generator) for _ in range(2))
    generator = torch.Generator(device=device).manual_seed(seq + 1 + rank())
    q = torch.randn(1, shape["heads"], split.lengths[rank()], shape["head_dim"], device=device, dtype=dtype,
                    generator=generator)
    return q, full_k, full_v


def sampled_rows_error(out: torch.Tensor, q: torch.Tensor, full_k: torch.Tensor, full_v: torch.Tensor,
                       start: int, mask) -> float:
    """Max abs difference of ``out``'s first and last ``CP_SAMPLED_ROWS`` rows (this rank's, at positions
    ``start + row``) from float32 attention over every key of the sequence that ``mask`` (a TokenMask) shows them,
    one KV head's group at a time (at 256K a group's scores take 0.5 GB)."""
    length, seq = q.shape[2], full_k.shape[2]
    rows = torch.cat([torch.arange(min(CP_SAMPLED_ROWS, length)),
                      torch.arange(max(length - CP_SAMPLED_ROWS, CP_SAMPLED_ROWS), length)]).to(q.device)
    visible = mask.visible((start + rows)[:, None], torch.arange(seq, device=q.device)[None, :], seq)
    group = q.shape[1] // full_k.shape[1]
    worst = 0.0
    for head in range(full_k.shape[1]):
        heads = slice(head * group, (head + 1) * group)
        scores = q[:, heads][:, :, rows].float() @ full_k[:, head, None].float().transpose(-1, -2)
        scores = (scores / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
        expected = torch.softmax(scores, dim=-1) @ full_v[:, head, None].float()
        worst = max(worst, (out[:, heads][:, :, rows].float() - expected).abs().max().item())
        del scores, expected
    return worst


def time_cp(fn, clock: Clock, runs: int) -> tuple[float, list[float], object]:
    """(median over calls of the max over ranks, each rank's own median, the last call's result) of ``fn()``
    after ``CP_WARMUP`` calls; calls over a second are timed 3 times (decided on the max over ranks, so every rank
    stops at the same call)."""
    for _ in range(CP_WARMUP):
        result = fn()
    clock.sync()
    samples = []
    for _ in range(runs):
        clock.line_up()
        start = clock.mark()
        result = fn()
        end = clock.mark()
        clock.sync()
        samples.append(clock.ms(start, end))
        if len(samples) == 3 and min(max_over_ranks(samples)) > 1000:
            break
    worst = max_over_ranks(samples)
    return statistics.median(worst), per_rank(statistics.median(samples)), result


def run_cp(args, part: str, ranks: int, device: str, dtype: torch.dtype, clock: Clock) -> None:
    from sparsify.context_parallel import SequenceSplit, layout_attention, plan_kv_fetch, ring_attention
    from sparsify.kernels.layout import TokenMask, sink_window_layout

    shape = TINY_CP_SHAPE if args.tiny else CP_SHAPE
    name = part_name(part, args.tag)
    extra = {"part": part, "ranks": ranks, "scope": "one attention layer", "dtype": str(dtype).removeprefix("torch."),
             "cp_shape": shape, "runs": args.cp_runs, "command": command(ranks)}
    rows = []
    for seq in args.cp_seq:
        split = SequenceSplit.even(seq, ranks, multiple=math.lcm(shape["block_m"], shape["block_n"]))
        start = split.start(rank())
        q, full_k, full_v = cp_inputs(seq, shape, split, device, dtype)
        k, v = (t[:, :, start:split.end(rank())].contiguous() for t in (full_k, full_v))
        clock.sync()
        planned = time.perf_counter()
        layout = sink_window_layout(seq, seq, shape["sink"], shape["window"], shape["block_m"], shape["block_n"],
                                    device=device)
        plan = plan_kv_fetch(layout, split)
        clock.sync()
        plan_ms = max_over_ranks([(time.perf_counter() - planned) * 1e3])[0]
        calls = {"dense_ring": functools.partial(ring_attention, q, k, v, split),
                 "sparsify_sink_window": functools.partial(layout_attention, q, k, v, plan)}
        cases = [("dense_ring", TokenMask(causal=True), {}),
                 ("sparsify_sink_window", TokenMask(causal=True, sink=shape["sink"], window=shape["window"]),
                  {"plan_ms": plan_ms})]
        ring_bytes = None
        for method, mask, more in cases:
            started = time.time()
            with torch.no_grad():
                ms, ms_per_rank, result = time_cp(calls[method], clock, args.cp_runs)
                error = max_over_ranks([sampled_rows_error(result.out, q, full_k, full_v, start, mask)])[0]
            received = [int(b) for b in per_rank(float(result.kv_bytes_received))]
            ring_bytes = max(received) if ring_bytes is None else ring_bytes
            rows.append({"case": "cp_prefill", "seq_len": seq, "impl": f"{method}_cp{ranks}", "method": method,
                         "ranks": ranks, "ms": ms, "ms_per_rank": [round(t, 3) for t in ms_per_rank],
                         "kv_bytes_received": max(received), "kv_bytes_per_rank": received,
                         "kv_share_of_ring": max(received) / ring_bytes if ring_bytes else None,
                         "max_abs_diff_sampled_rows": error, **more})
            say(f"{rows[-1]['impl']:>28} N={seq:>6}: {ms:9.2f} ms  KV received {max(received):,} B "
                f"(per rank {received})  sampled rows off by {error:.2e}")
            if rank() == 0:
                path = write_result(name, rows, within_part_ratios(rows), extra)
                say(f"  ({time.time() - started:.0f} s; wrote {path})")
            del result
        del calls, q, k, v, full_k, full_v, plan, layout


# -- results: names, settings, ratios, merge -----------------------------------------------------------------------


def part_name(part: str, tag: str | None) -> str:
    return f"{NAME}-{part}" + (f"-{tag}" if tag else "")


def command(ranks: int) -> str:
    """The command line that ran this part, as a user would type it again (under torchrun: the launcher's)."""
    line = invocation().replace("-m sparsify.__main__ ", "-m sparsify ")
    if ranks > 1:
        line = f"torchrun --standalone --nproc-per-node {ranks} " + line.removeprefix("python ")
    return line


def tp_settings(args, shape: dict, dtype: torch.dtype) -> dict:
    """What two TP parts must share for their rows to be compared (besides device and versions)."""
    import transformers

    return {"model": shape, "layers": args.layers, "dtype": str(dtype).removeprefix("torch."), "batch": 1,
            "weights_seed": 0, "prompt": "torch.randint(1, vocab, (1, N), generator seeded N)",
            "transformers": transformers.__version__, "inductor": args.inductor,
            "cost_model_fallback": not args.tiny}


def describe_policy(policy) -> object:
    """A policy as it can be compared between parts: a preset's name, a file's text, or the dict itself."""
    if isinstance(policy, str) and policy.endswith((".yaml", ".yml", ".toml")) and Path(policy).is_file():
        return Path(policy).read_text()
    return policy


def within_part_ratios(rows: list[dict]) -> dict[str, float]:
    """Within one part: dense's time / each sparsify method's per case and length (TP), the ring's time / the
    layout's and the ring's KV bytes / the layout's (CP). > 1: the sparse method faster (or moving less)."""
    timed = {(r["case"], r["seq_len"], r["method"]): r for r in rows if "ms" in r}
    ratios = {}
    for (case, seq, method), row in timed.items():
        if case in ("prefill", "decode") and method != DENSE and (case, seq, DENSE) in timed:
            dense = timed[case, seq, DENSE]
            ratios[f"{case}@{seq} {dense['impl']}/{row['impl']}"] = dense["ms"] / row["ms"]
        if case == "cp_prefill" and method != "dense_ring" and (case, seq, "dense_ring") in timed:
            ring = timed[case, seq, "dense_ring"]
            ratios[f"{case}@{seq} {ring['impl']}/{row['impl']}"] = ring["ms"] / row["ms"]
            if row["kv_bytes_received"]:
                ratios[f"cp_kv_bytes@{seq} {ring['impl']}/{row['impl']}"] = (ring["kv_bytes_received"]
                                                                           / row["kv_bytes_received"])
    return ratios


def incompatibility(a: dict, b: dict, method: str, case: str) -> str | None:
    """Why rows of ``method`` in parts ``a`` and ``b`` (their JSON) cannot be compared, or None."""
    for key in ("device", "versions", "settings"):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)} vs {b.get(key)}"
    if a.get("policies", {}).get(method) != b.get("policies", {}).get(method):
        return f"the policy of {method} differs"
    if case == "decode" and a.get("new_tokens") != b.get("new_tokens"):
        return f"new_tokens: {a.get('new_tokens')} vs {b.get('new_tokens')}"
    return None


def logits_check(outputs: dict, reference: dict, case: str) -> dict:
    """The columns comparing one row's first-call outputs with the one-GPU row's."""
    if case == "decode":  # the tokens generated (the first from the prefill's logits, then one a step)
        tokens, expected = outputs["tokens"], reference["tokens"]
        length = min(tokens.shape[1], expected.shape[1])
        return {"token_agreement_with_tp1": (tokens[:, :length] == expected[:, :length]).float().mean().item()}
    logits, expected = outputs["logits"].float(), reference["logits"].float()
    return {"logits_max_abs_diff_vs_tp1": (logits - expected).abs().max().item(),
            "top1_agrees_with_tp1": (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()}


def merge(names: list[str]) -> Path:
    """One tp.json from parts run in separate commands (see the module's docstring)."""
    folder = results_dir()
    names = names or sorted(path.stem for path in folder.glob(f"{NAME}-*.json"))
    if not names:
        raise SystemExit(f"sparsify bench tp --merge: no {NAME}-*.json parts in {folder}; run the parts first")
    parts, outputs = {}, {}
    for name in names:
        path = folder / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"sparsify bench tp --merge: no {path}; parts there: "
                             f"{', '.join(sorted(p.stem for p in folder.glob(f'{NAME}-*.json'))) or 'none'}")
        parts[name] = json.loads(path.read_text())
        logits = folder / f"{name}-logits.pt"
        outputs[name] = torch.load(logits, weights_only=True) if logits.is_file() else {}
    rows, owner = [], {}
    for name, data in parts.items():
        for row in data["rows"]:
            key = (row["case"], row["seq_len"], row["impl"])
            if key in owner:
                raise SystemExit(f"sparsify bench tp --merge: {owner[key]} and {name} both have {row['impl']} "
                                 f"{row['case']} at {row['seq_len']}; merge one of them")
            owner[key] = name
            rows.append({"part": name, **row})
    ratios, not_compared, targets = {}, [], {}
    for data in parts.values():
        ratios |= within_part_ratios(data["rows"])
    by_key = {(row["case"], row["seq_len"], row["impl"]): row for row in rows}
    for row in rows:
        if row["case"] not in ("prefill", "decode") or row["ranks"] == 1:
            continue
        reference_impl = f"{row['method']}_tp1"
        reference = by_key.get((row["case"], row["seq_len"], reference_impl))
        what = f"{row['case']}@{row['seq_len']} {row['impl']}"
        if reference is None:
            not_compared.append(f"{what}: no {reference_impl} row in the parts merged")
            continue
        why = incompatibility(parts[row["part"]], parts[reference["part"]], row["method"], row["case"])
        if why:
            not_compared.append(f"{what} vs {reference['part']}: {why}")
            continue
        mine = outputs[row["part"]].get(f"{row['method']}@{row['seq_len']}")
        theirs = outputs[reference["part"]].get(f"{row['method']}@{row['seq_len']}")
        if mine is not None and theirs is not None:
            row |= logits_check(mine, theirs, row["case"])
        else:
            not_compared.append(f"{what}: no saved logits (a {row['part']}-logits.pt or "
                                f"{reference['part']}-logits.pt entry) to check the outputs")
        if "ms" in row and "ms" in reference:
            key = f"{row['case']}@{row['seq_len']} {reference_impl}/{row['impl']}"
            ratios[key] = reference["ms"] / row["ms"]
            if row["case"] == "prefill":
                targets[f"{key} >= {TP_PREFILL_SPEEDUP}"] = {"value": ratios[key],
                                                             "met": ratios[key] >= TP_PREFILL_SPEEDUP}
    for key, value in ratios.items():
        if key.startswith("cp_prefill@"):
            targets[f"{key} >= {CP_SPEEDUP}"] = {"value": value, "met": value >= CP_SPEEDUP}
    for row in rows:
        if row["case"] == "cp_prefill" and row["method"] != "dense_ring" and row.get("kv_share_of_ring") is not None:
            share = row["kv_share_of_ring"]
            targets[f"cp_kv_share@{row['seq_len']} {row['impl']} < {CP_KV_SHARE}"] = {"value": share,
                                                                                    "met": share < CP_KV_SHARE}
    meta = {}
    for name, data in parts.items():
        meta[name] = {key: data[key] for key in ("date", "device", "versions", "command", "note") if key in data}
    path = write_result(NAME, rows, ratios, {
        "parts": meta, "targets": targets, "not_compared": not_compared,
        "ratio_meaning": "the first's time (or KV bytes) / the second's, rows of compatible runs only; > 1: the "
                         "second faster (tp1/tpN: the speedup of N GPUs)",
        "measured_on": sorted({entry["device"] for entry in meta.values()}), "command": command(1)})
    markdown = path.with_suffix(".md")
    lines = ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {key} | {entry['value']:.3f} | {'yes' if entry['met'] else 'no'} |"
              for key, entry in targets.items()]
    lines += [f"- not compared: {line}" for line in not_compared]
    markdown.write_text(markdown.read_text() + "\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


# -- the command ---------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="sparsify bench tp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", help="prompt lengths timed (default 32768 131072)")
    parser.add_argument("--decode-seq", type=int, nargs="*", help="lengths whose calls also decode "
                        "--new-tokens (default 131072; none: prefill only)")
    parser.add_argument("--cp-seq", type=int, nargs="+", help="context-parallel lengths (default 262144)")
    parser.add_argument("--new-tokens", type=int, help="decode steps timed per call (default 32)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 32)")
    parser.add_argument("--impls", nargs="+", default=[DENSE, "sparsify_sink_window", "sparsify_delta"],
                        help="TP methods: dense, sparsify_<policy> (CP rows are always dense_ring and "
                             "sparsify_sink_window)")
    parser.add_argument("--part", nargs="+", help="tp1 (one process), tpN and/or cpN (under N ranks; default "
                        "both there)")
    parser.add_argument("--tag", help="added to the part's file name (tp-<part>-<tag>), for runs split by length")
    parser.add_argument("--repeats", type=int, help="timed generate() calls after 2 warm-up calls (default 3)")
    parser.add_argument("--cp-runs", type=int, help="timed context-parallel calls (default 20)")
    parser.add_argument("--inductor", choices=("auto", "on", "off"), default="auto",
                        help="sparsify.compile's inductor option (auto: on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available (cpu: --tiny only)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small model and small lengths: a smoke run "
                        "(the CPU with gloo, or GPUs)")
    parser.add_argument("--merge", nargs="*", metavar="PART", help="join parts (default: every tp-*.json in "
                        "benchmarks/results) into tp.json and stop")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.tiny].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("seq", "decode_seq", "cp_seq"):
        bad = [n for n in getattr(args, name) if n < 1]
        if bad:
            parser.error(f"--{name.replace('_', '-')}: lengths must be at least 1, got {bad}")
    for name in ("new_tokens", "layers", "repeats", "cp_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    return args, parser


def parts_to_run(args, parser, ranks: int) -> list[str]:
    """The parts this launch runs, checked against the number of ranks it was launched with."""
    def launch(count: int) -> str:
        return f"torchrun --standalone --nproc-per-node {count} -m sparsify bench tp"

    parts = args.part or ([f"tp{ranks}", f"cp{ranks}"] if ranks > 1 else None)
    if parts is None:
        parser.error(f"one process (WORLD_SIZE 1) runs the one-GPU baseline: --part tp1; the tensor- and "
                     f"context-parallel parts run under several ranks: {launch(2)}")
    for part in parts:
        kind, count = part[:2], part[2:]
        if kind not in ("tp", "cp") or not count.isdigit():
            parser.error(f"--part {part}: allowed: tp1, tpN, cpN (N the number of ranks launched, {ranks})")
        if part == "tp1" and ranks > 1:
            parser.error(f"--part tp1 is the one-GPU baseline: run it in one process (python -m sparsify bench tp "
                         f"--part tp1), not under torchrun (WORLD_SIZE {ranks})")
        if kind == "cp" and int(count) < 2:
            parser.error(f"--part {part}: context parallelism needs at least 2 ranks: {launch(2)} --part cp2")
        if part != "tp1" and int(count) != ranks:
            parser.error(f"--part {part} needs {count} ranks, but this launch has WORLD_SIZE {ranks}: "
                         f"{launch(int(count))} --part {part}")
    shape = TINY_CP_SHAPE if args.tiny else CP_SHAPE
    multiple = math.lcm(shape["block_m"], shape["block_n"])
    short = [n for n in args.cp_seq if n <= (ranks - 1) * multiple]
    if any(part.startswith("cp") for part in parts) and short:
        parser.error(f"--cp-seq {short}: {ranks} ranks need more than {(ranks - 1) * multiple} tokens (slices at "
                     f"multiples of the layout's {multiple}-token blocks)")
    return parts


def resolve_policies(args, parser) -> dict:
    """Each sparsify method's policy (checked now, before minutes of model building)."""
    import sparsify
    from sparsify.errors import SparsifyError

    policies = {}
    for method in args.impls:
        if method == DENSE:
            continue
        if not method.startswith(SPARSIFY_PREFIX):
            parser.error(f"--impls: unknown {method!r}; allowed: dense, sparsify_<policy>")
        if args.tiny:
            if method not in TINY_POLICIES:
                parser.error(f"--impls {method} with --tiny; allowed: dense, {', '.join(TINY_POLICIES)} (scaled "
                             "down for 256-token prompts)")
            policies[method] = TINY_POLICIES[method]
        else:
            policies[method] = policy_of(method)
        try:
            sparsify.Policy.load(policies[method])
        except SparsifyError as error:
            parser.error(f"--impls {method}: {error}")
    return policies


def main(argv: list[str] | None = None) -> None:
    args, parser = parse(argv)
    ranks = launched_ranks()
    if args.merge is not None:
        if ranks > 1:
            parser.error(f"--merge: run it in one process, not under torchrun (WORLD_SIZE {ranks})")
        merge(args.merge)
        return
    parts = parts_to_run(args, parser, ranks)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.tiny:
        parser.error("the benchmark needs CUDA GPUs (an 8B-shaped model at 128K tokens); --tiny runs a small model "
                     "on the CPU")
    if device == "cuda":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if not torch.cuda.is_available() or torch.cuda.device_count() < local_ranks:
            parser.error(f"--device cuda: {local_ranks} ranks on this host need as many GPUs, "
                         f"{torch.cuda.device_count()} visible")
    args.policies = resolve_policies(args, parser)
    args.compile_options = {"inductor": {"auto": None, "on": True, "off": False}[args.inductor]}
    if args.tiny:
        args.compile_options["cost_model_fallback"] = False  # follow the scaled-down policies at 256 tokens
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu":
        torch.set_num_threads(1)  # one core a rank, on a machine shared with others
    from sparsify.distributed import join_launched_ranks, leave_launched_group

    mesh = join_launched_ranks(device)
    if dist.is_initialized():
        # NCCL's point-to-point ops need every rank in the group's first call: warm the group with a collective.
        max_over_ranks([0.0])
    clock = Clock(device)
    clean = False
    try:
        for part in parts:
            say(f"part {part_name(part, args.tag)}: {ranks} rank(s), {device}, {str(dtype).removeprefix('torch.')}")
            if part.startswith("tp"):
                run_tp(args, part, ranks, mesh if part != "tp1" else None, device, dtype, clock)
            else:
                run_cp(args, part, ranks, device, dtype, clock)
        clean = True
    finally:
        leave_launched_group(clean)


if __name__ == "__main__":
    main()
