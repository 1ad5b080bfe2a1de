"""End to end: ``generate()`` on a random-weight model of Llama-3-8B's shape, as a user runs it.

bf16, B=1 (``--batch``), greedy. For each prompt length and implementation: two warm-up calls of
``generate(max_new_tokens=33)`` (``--new-tokens`` + 1), then ``--repeats`` timed ones, each timed by CUDA events
at every step (a logits processor records one whenever new logits exist): prefill = the call's start to the first
logits (median over calls), decode = one step's logits to the next (median over all steps; ``mean_ms`` their
mean), tokens/s = B * 1000 / decode. ``sparsify_<name>`` takes a preset or ``benchmarks/policies/<name>.yaml``.
The warm-up calls' extra time over a timed call is the
first (and second) call's cost: capture, rewrite, Inductor, CUDA graph recording. Implementations (row names
from shared/docs/benchmarks.md): ``hf_eager`` (transformers' SDPA, DynamicCache), ``torch_compile``
(``torch.compile(model.forward)``, as a user would write it; running out of memory is recorded as the row's ``error``), and
``sparsify_<policy>`` (``sparsify.compile(model, policy)``, a StaticCache so decode replays CUDA graphs). Also
each implementation's peak GPU memory, how many of the tokens it generates agree with ``hf_eager``'s, and with
``--profile``, the CUDA kernels of one prefill and 16 decode steps (``e2e-profile-<impl>-<N>.txt`` beside the
results).

    python -m benchmarks.e2e --seq 32768 --impls hf_eager torch_compile sparsify_dense sparsify_sink_window
    python -m benchmarks.e2e --merge e2e-32k e2e-128k     # one e2e.json from parts run in separate calls

A part (``--part NAME``) writes ``benchmarks/results/NAME.json``; ``--merge`` joins parts and computes the
ratios (hf_eager's time / each other's, per length and phase).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sparsify
from sparsify.state import state_of

from .common import results_dir, write_result

NEW_TOKENS = 32
SPARSIFY_PREFIX = "sparsify_"


LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rope_theta": 500000.0}


def random_llama(shape: dict, layers: int, max_len: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A random-weight Llama of ``shape`` (LlamaConfig fields), seeded 0 (the same weights in every process on the
    same kind of device), built on ``device`` in ``dtype``, eval mode, never stopping at an EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=max_len,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def llama3_8b_shaped(layers: int, max_len: int):
    """Random weights of Llama-3-8B's shape (hidden 4096, 32/8 heads, D=128, MLP 14336, vocab 128256), bf16, GPU."""
    return random_llama(LLAMA3_8B, layers, max_len)


def policy_of(impl_name: str) -> str:
    """The policy of a ``sparsify_<policy>`` row: a preset's name, or a file of ``benchmarks/policies``."""
    name = impl_name[len(SPARSIFY_PREFIX):]
    path = Path(__file__).resolve().parent / "policies" / f"{name}.yaml"
    return str(path) if path.is_file() else name


class Implementation:
    """How one row's generate() is called: the model to call and the cache it reuses between calls."""

    def __init__(self, name: str, model, prompt_len: int, new_tokens: int = NEW_TOKENS):
        self.name = name
        self.cache = None
        if name == "hf_eager":
            self.model = model
        elif name == "torch_compile":
            self.model = copy.copy(model)
            self.model.forward = torch.compile(model.forward)
        elif name.startswith(SPARSIFY_PREFIX):
            from transformers import StaticCache

            self.model = sparsify.compile(model, policy_of(name))
            # One preallocated cache, reset between calls: its buffers keep their addresses, so the decode step's
            # CUDA graph is recorded once.
            self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
        else:
            raise SystemExit(f"--impls: unknown {name!r}; allowed: hf_eager, torch_compile, sparsify_<policy>")

    def generate(self, ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
        if self.cache is not None:
            self.cache.reset()
            kwargs["past_key_values"] = self.cache
        with torch.no_grad():
            return self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       **kwargs)


class StepClock:
    """A logits processor that records a CUDA event whenever generate() has new logits: once after the prefill,
    then after every decode step. Nothing synchronises, so the timed loop runs as it would untimed."""

    def __init__(self):
        self.events: list[torch.cuda.Event] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        return scores


@dataclass(frozen=True)
class GenerateTiming:
    """One ``generate(max_new_tokens=new_tokens + 1)`` call: its whole time, the prefill (call start to the first
    logits) and each decode step (from one step's logits to the next: sampling plus one forward), in ms."""

    total_ms: float
    prefill_ms: float
    step_ms: list[float]
    tokens: torch.Tensor


def timed_generate(impl: Implementation, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> GenerateTiming:
    from transformers import LogitsProcessorList

    clock = StepClock()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    tokens = impl.generate(ids, new_tokens + 1, logits_processor=LogitsProcessorList([clock]))
    end.record()
    torch.cuda.synchronize()
    events = clock.events
    return GenerateTiming(start.elapsed_time(end), start.elapsed_time(events[0]),
                          [a.elapsed_time(b) for a, b in zip(events, events[1:])], tokens)


PROFILED_STEPS = 16


def profile_steps(impl: Implementation, ids: torch.Tensor, path) -> None:
    """CUDA kernels of a prefill and PROFILED_STEPS decode steps (generate(max_new_tokens=PROFILED_STEPS + 1)), as
    a table. Decode's kernels are told from prefill's by name and call count (PROFILED_STEPS calls a layer)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        impl.generate(ids, PROFILED_STEPS + 1)
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=80))


def measure(impl_name: str, model, ids: torch.Tensor, reference_tokens, profile: bool, repeats: int,
            new_tokens: int = NEW_TOKENS) -> tuple[list[dict], torch.Tensor | None]:
    """The rows of one implementation at one length, and the tokens its first call generated.

    Two warm-up calls, then ``repeats`` timed ones: prefill is their median, decode the median of all their steps
    (``mean_ms``: their mean, which counts a periodic step such as a rectification at its share).
    ``first_call_s`` is the first call's extra time over a timed call (capture, rewrite, Inductor, CUDA graph
    recording); ``second_call_s`` the second's (anything compiled again for a reused cache shows here)."""
    seq = ids.shape[1]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # What is held before this implementation starts (the model's weights; anything an earlier row left behind
    # would show here), so that a peak or an out-of-memory error can be told apart from leftovers.
    base = {"seq_len": seq, "impl": impl_name, "start_gib": torch.cuda.memory_allocated() / 2**30}
    try:
        impl = Implementation(impl_name, model, seq, new_tokens)
        first, second = timed_generate(impl, ids, new_tokens), timed_generate(impl, ids, new_tokens)
        timed = [timed_generate(impl, ids, new_tokens) for _ in range(repeats)]
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        message = str(error).splitlines()[0][:200]
        print(f"{impl_name} N={seq}: out of memory: {message}", flush=True)
        return [{**base, "case": case, "error": f"out of memory: {message}"} for case in ("prefill", "decode")], None
    prefill_ms = statistics.median(t.prefill_ms for t in timed)
    decode_ms = statistics.median(step for t in timed for step in t.step_ms)
    mean_step_ms = statistics.mean(step for t in timed for step in t.step_ms)
    typical_ms = statistics.median(t.total_ms for t in timed)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    agreement = None
    if reference_tokens is not None:
        agreement = (first.tokens[:, seq:] == reference_tokens[:, seq:]).float().mean().item()
    extra = {"first_call_s": (first.total_ms - typical_ms) / 1e3, "second_call_s": (second.total_ms - typical_ms) / 1e3,
             "peak_gib": peak_gib}
    if impl_name.startswith(SPARSIFY_PREFIX):
        methods, fallbacks = impl.model.sparsify.applied()
        extra["methods_applied"] = sorted(methods)
        # Every graph's (a decode step's, a rectification's...): Inductor may skip CUDA graphs for one of them.
        extra["compiled_by"] = sorted({variant.compiled_by for frame in impl.model.sparsify.frames
                                       for variant in frame.variants.values()})
        extra["graphs_compiled"] = impl.model.sparsify.backend.compilations
        state = state_of(impl.cache)
        # The last call's (each call starts a new sequence on the reset cache).
        extra["rectifications_per_call"] = state.recent.rectifications if state is not None else 0
    rows = [
        {**base, "case": "prefill", "ms": prefill_ms, **extra},
        {**base, "case": "decode", "ms": decode_ms, "mean_ms": mean_step_ms,
         "tokens_per_s": ids.shape[0] * 1e3 / decode_ms,
         "token_agreement_with_hf_eager": agreement},
    ]
    print(f"{impl_name:>24} N={seq:>6}: prefill {prefill_ms:9.1f} ms  decode {decode_ms:7.2f} ms/token  "
          f"first call +{extra['first_call_s']:.1f} s  second +{extra['second_call_s']:.1f} s  "
          f"start {base['start_gib']:.1f} GiB  peak {peak_gib:.1f} GiB  agreement {agreement}", flush=True)
    if profile:
        profile_steps(impl, ids, results_dir() / f"e2e-profile-{impl_name}-{seq}.txt")
    del impl
    torch._dynamo.reset()
    return rows, first.tokens


def ratios_of(rows: list[dict]) -> dict[str, float]:
    """hf_eager's time / each implementation's, per length and phase (> 1: faster than plain transformers), and
    torch_compile's first-call cost / each sparsify implementation's (> 1: sparsify compiles faster)."""
    reference = {(r["case"], r["seq_len"]): r["ms"] for r in rows if r["impl"] == "hf_eager" and "ms" in r}
    compile_cost = {r["seq_len"]: r["first_call_s"] for r in rows
                    if r["impl"] == "torch_compile" and r["case"] == "prefill" and "first_call_s" in r}
    ratios = {}
    for row in rows:
        key = (row["case"], row["seq_len"])
        if row["impl"] != "hf_eager" and "ms" in row and key in reference:
            ratios[f"{row['case']}@{row['seq_len']} hf_eager/{row['impl']}"] = reference[key] / row["ms"]
        if row["impl"].startswith(SPARSIFY_PREFIX) and row["case"] == "prefill" and row["seq_len"] in compile_cost:
            ratios[f"first_call@{row['seq_len']} torch_compile/{row['impl']}"] = (compile_cost[row["seq_len"]]
                                                                                 / row["first_call_s"])
    return ratios


def merge(parts: list[str]) -> None:
    """One e2e.json from parts run in separate calls. Each row keeps its part's name, and ratios are taken within
    a part only: two runs of the same implementation differ (eager's decode moved from 21 to 38 ms a token between
    two runs), so a ratio across runs would measure the runs, not the implementations."""
    rows, ratios, meta = [], {}, {}
    for part in parts:
        data = json.loads((results_dir() / f"{part}.json").read_text())
        rows += [{"part": part, **row} for row in data["rows"]]
        ratios |= {f"{part}: {key}": value for key, value in ratios_of(data["rows"]).items()}
        meta[part] = {key: data[key] for key in ("date", "device", "versions", "command") if key in data}
        meta[part] |= {key: data[key] for key in ("note",) if key in data}
    devices = sorted({entry["device"] for entry in meta.values()})
    path = write_result("e2e", rows, ratios, {"parts": meta, "layers": _layers_of(parts),
                                              "ratio_meaning": "hf_eager's time / this one's, in one run; > 1: faster",
                                              "measured_on": devices})
    print(f"wrote {path}")


def _layers_of(parts: list[str]) -> list[int]:
    return sorted({json.loads((results_dir() / f"{p}.json").read_text()).get("layers") for p in parts} - {None})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsify bench e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--impls", nargs="+", default=["hf_eager", "torch_compile", "sparsify_dense",
                                                        "sparsify_sink_window", "sparsify_delta"])
    parser.add_argument("--part", default="e2e", help="result name (a part to --merge later, or e2e itself)")
    parser.add_argument("--profile", action="store_true", help="also save each implementation's kernel profile")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the two warm-up calls")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generate() call (the same length)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="decode steps timed per call")
    parser.add_argument("--merge", nargs="+", metavar="PART", help="join parts into e2e.json and stop")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.merge:
        merge(args.merge)
        return
    if not torch.cuda.is_available():
        raise SystemExit("sparsify bench e2e needs a CUDA GPU")
    model = llama3_8b_shaped(args.layers, max(args.seq) + args.new_tokens + 64)
    rows = []
    generator = torch.Generator(device="cuda").manual_seed(0)
    for seq in args.seq:
        # Never the pad token (0): generate() would read it as padding and mask that key, and every implementation
        # would leave its causal fast path (at 128K, one such token made eager 3x slower and asked 32 GiB of mask).
        ids = torch.randint(1, model.config.vocab_size, (args.batch, seq), device="cuda", generator=generator)
        reference = None
        # hf_eager first: the others' tokens are compared with its tokens.
        for name in sorted(args.impls, key=lambda name: name != "hf_eager"):
            started = time.time()
            measured, tokens = measure(name, model, ids, reference, args.profile, args.repeats, args.new_tokens)
            if name == "hf_eager":
                reference = tokens
            rows += measured
            # After every implementation: a run stopped by a time limit keeps what it measured.
            path = write_result(args.part, rows, ratios_of(rows), {"layers": args.layers, "batch": args.batch,
                                                                   "new_tokens": args.new_tokens})
            print(f"  ({time.time() - started:.0f} s; wrote {path})", flush=True)


if __name__ == "__main__":
    main()
